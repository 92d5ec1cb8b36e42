"""`qzoom bench zoomworld`: the default model on the ZoomWorld test split, plain and with Q-Zoom.

* baseline: the plain model (HF `generate`, greedy) at every budget in `BUDGETS`;
* Q-Zoom at the low budgets `QZOOM_BUDGETS`: the global view at b visual tokens and, where the gate fires,
  a crop re-encoded at the same b (crop_min_pixels = crop_max_pixels = b * FACTOR**2).

Per configuration: accuracy (overall, per family, per kind), mean visual tokens the model actually read, and
mean latency per sample (wall clock per batch, from PIL images to decoded answers, preprocessing included as
Q-Zoom's crop re-encoding is, divided by the batch size). For Q-Zoom also the zoom rate, the twig's boxes on
detail questions (the gated run's box where it zoomed, else one run with gate_threshold=0 on those samples:
the pipeline only makes a box when it zooms): box hit rate (>= 50% of the target plate covered; a box covering the
whole image always hits), mean IoU with the target plate (a sample without a box, an empty mask, counts 0; how many
had none is reported), box area / target area (mean and median) and the boxes' mean share of the image; and the
gate's decisions against need.

Writes a JSON report, a Markdown table (`.md`) and a Pareto plot (`.png`, drawn with PIL) side by side: by default
in `./qzoom-bench/` of the current directory (`default_out`), never in `benchmarks/results/` (whose committed files
the README links) unless `out` points there.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from qzoom_adapters.recipes.data import chunks
from qzoom_adapters.recipes.models import batch_to
from qzoom_adapters.recipes.progress import progress

from qzoom_adapters.benchmarks.plots import line_plot
from qzoom_adapters.benchmarks.provenance import git_commit, machine

from .generator import split
from .model import BUDGETS, FACTOR
from .scoring import box_metrics, exact_match, mean_or_none, score

QZOOM_BUDGETS = (64, 128, 256)
QUICK = {"n": 8, "baseline": (64, 256), "qzoom": (64,)}  # a smoke run for tests
RESULTS_OUT = Path(__file__).resolve().parents[1] / "results" / "zoomworld_bench.json"  # the committed results
MAX_NEW_TOKENS = 8  # answers are a code, a count or a colour


def default_out() -> Path:
    """Where a run without an explicit `out` writes: `./qzoom-bench/zoomworld_bench.json` in the current directory.
    Only an explicit `out` (e.g. `RESULTS_OUT`) replaces the committed results in benchmarks/results/."""
    return Path.cwd() / "qzoom-bench" / RESULTS_OUT.name


# --- measuring ------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def view_inputs(spec, processor, samples, budget: int, device) -> dict:
    """Left-padded processor inputs of `samples` with every image at `budget` visual tokens, on `device`."""
    inputs = spec.chat_inputs(processor, [s.image for s in samples], [s.question for s in samples],
                              pixels=budget * FACTOR**2)
    return batch_to(inputs, device)


@torch.no_grad()
def plain_answers(model, processor, spec, samples, budget: int, batch_size: int, device,
                  max_new_tokens: int = MAX_NEW_TOKENS, bar=None) -> tuple[list[str], list[int], float]:
    """The plain model's greedy answers at `budget`: (answers, visual tokens per sample, seconds in all).
    `bar`: a progress bar advanced by each batch's samples."""
    answers, tokens, seconds = [], [], 0.0
    for chunk in chunks(samples, batch_size):
        _sync(device)
        t0 = time.perf_counter()
        inputs = view_inputs(spec, processor, chunk, budget, device)
        S = inputs["input_ids"].shape[1]
        seq = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
        answers += processor.tokenizer.batch_decode(seq[:, S:], skip_special_tokens=True)
        _sync(device)
        seconds += time.perf_counter() - t0
        tokens += (inputs["input_ids"] == spec.image_token_id).sum(dim=1).tolist()
        if bar is not None:
            bar.update(len(chunk))
    return answers, tokens, seconds


def run_baseline(model, processor, spec, samples, budget: int, batch_size: int, device,
                 bar=None) -> tuple[dict, list[bool]]:
    """The plain model at `budget`: (result row, per-sample correctness)."""
    answers, tokens, seconds = plain_answers(model, processor, spec, samples, budget, batch_size, device, bar=bar)
    result = score(samples, [{"answer": a} for a in answers])
    row = {"budget": budget, "accuracy": result["accuracy"], "visual_tokens": mean_or_none(tokens),
           "latency_s": seconds / len(samples)}
    return row, [exact_match(a, s.answer) for a, s in zip(answers, samples)]


def _zoom_batches(zoom, spec, processor, samples, budget: int, batch_size: int, device,
                  bar=None) -> tuple[list, float]:
    """Q-Zoom outputs for `samples` with the global view at `budget`, and the seconds they took."""
    outs, seconds = [], 0.0
    for chunk in chunks(samples, batch_size):
        _sync(device)
        t0 = time.perf_counter()
        inputs = view_inputs(spec, processor, chunk, budget, device)
        outs += zoom.generate_from_inputs(inputs, [s.image for s in chunk], max_new_tokens=MAX_NEW_TOKENS)
        _sync(device)
        seconds += time.perf_counter() - t0
        if bar is not None:
            bar.update(len(chunk))
    return outs, seconds


def gate_stats(samples, fired: list[bool], baseline_correct: list[bool] | None) -> dict:
    """The gate's decisions against need: how often it fires on detail questions (all of them, and those the
    baseline at the same budget gets wrong) and how often it skips global ones."""
    detail = [f for s, f in zip(samples, fired) if s.family == "detail"]
    glob = [f for s, f in zip(samples, fired) if s.family == "global"]
    wrong = None if baseline_correct is None else [
        f for s, f, ok in zip(samples, fired, baseline_correct) if s.family == "detail" and not ok]
    return {"fire_rate_detail_baseline_wrong": None if wrong is None else mean_or_none(wrong),
            "detail_baseline_wrong": None if wrong is None else len(wrong),
            "fire_rate_detail": mean_or_none(detail), "skip_rate_global": mean_or_none(not f for f in glob)}


@torch.no_grad()
def run_qzoom(zoom, processor, samples, budget: int, batch_size: int, device,
              baseline_correct: list[bool] | None = None, bar=None) -> dict:
    """Q-Zoom at `budget` (global view and crop): its result row. `bar` counts the gated run's samples and
    then those of the box-only run on the skipped detail questions."""
    spec, pixels = zoom.spec, budget * FACTOR**2
    # copies with this run's settings (`with_config`: same model and adapters); the caller's zoom is left as it is
    gated = zoom.with_config(crop_min_pixels=pixels, crop_max_pixels=pixels)
    outs, seconds = _zoom_batches(gated, spec, processor, samples, budget, batch_size, device, bar)
    fired = [o.gate_prob is None or o.gate_prob >= gated.config.gate_threshold for o in outs]
    boxes = [o.bbox for o in outs]
    # the pipeline makes a box only when it zooms: the twig's box for the skipped detail questions
    skipped = [i for i, (s, f) in enumerate(zip(samples, fired)) if s.family == "detail" and not f]
    if skipped:
        if bar is not None:
            bar.total += len(skipped)
            bar.refresh()
        forced, _ = _zoom_batches(gated.with_config(gate_threshold=0.0), spec, processor, [samples[i] for i in skipped],
                                  budget, batch_size, device, bar)
        for i, o in zip(skipped, forced):
            boxes[i] = o.bbox
    result = score(samples, [{"answer": o.text, "box": b} for o, b in zip(outs, boxes)])
    boxes_quality = box_metrics(samples, boxes)  # IoU (no box = 0), box area / target area; detail_without_box
    return {"budget": budget, "accuracy": result["accuracy"], "visual_tokens": mean_or_none(o.visual_tokens for o in outs),
            "latency_s": seconds / len(samples), "zoom_rate": mean_or_none(o.zoomed for o in outs),
            "box_hit_rate": result["box_hit_rate"], "boxes_scored": result["boxes_scored"], **boxes_quality,
            "box_area_fraction": mean_or_none((b[2] - b[0]) * (b[3] - b[1]) / (s.image.width * s.image.height)
                                       for s, b in zip(samples, boxes) if s.family == "detail" and b is not None),
            "gate_threshold": gated.config.gate_threshold, "gate": gate_stats(samples, fired, baseline_correct)}


# --- metadata --------------------------------------------------------------------------------
def metadata(model_dir: Path, n: int, batch_size: int, device: torch.device) -> dict:
    """Where the numbers come from: commit, machine, versions, run size and the model folder's record.json."""
    import transformers

    record = model_dir / "record.json"
    return {"git_commit": git_commit(), "machine": machine(device),
            "torch": torch.__version__, "transformers": transformers.__version__, "n": n, "split": "test",
            "batch_size": batch_size, "max_new_tokens": MAX_NEW_TOKENS, "model_dir": str(model_dir),
            "record": json.loads(record.read_text()) if record.is_file() else None}


# --- report ----------------------------------------------------------------------------------------
def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


COLUMNS = ("method", "budget", "visual tokens", "accuracy", "detail", "global", "latency (ms/sample)", "zoom rate",
           "box hit (detail)", "box IoU (detail)", "box / target area: mean", "box / target area: median",
           "no box (detail)", "box / image area", "gate fires: detail, baseline wrong", "gate fires: detail",
           "gate skips: global")


def _no_box(r: dict) -> str:
    if r.get("detail_without_box") is None:
        return "–"
    total = r.get("detail_samples")
    return str(r["detail_without_box"]) if total is None else f"{r['detail_without_box']}/{total}"


def markdown_table(report: dict) -> str:
    """One row per configuration, then where the numbers come from."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for method, rows in (("baseline", report["baseline"]), ("Q-Zoom", report["qzoom"])):
        for r in rows:
            acc, gate = r["accuracy"], r.get("gate", {})
            cells = [method, str(r["budget"]), _fmt(r["visual_tokens"], 1), _fmt(acc.get("all")),
                     _fmt(acc.get("detail")), _fmt(acc.get("global")), _fmt(1000 * r["latency_s"], 1),
                     _fmt(r.get("zoom_rate")), _fmt(r.get("box_hit_rate")), _fmt(r.get("box_iou_mean")),
                     _fmt(r.get("box_target_area_ratio_mean"), 2), _fmt(r.get("box_target_area_ratio_median"), 2),
                     _no_box(r), _fmt(r.get("box_area_fraction")),
                     _fmt(gate.get("fire_rate_detail_baseline_wrong")), _fmt(gate.get("fire_rate_detail")),
                     _fmt(gate.get("skip_rate_global"))]
            lines.append("| " + " | ".join(cells) + " |")
    m = report["meta"]
    lines += ["", f"ZoomWorld test split, n={m['n']}, {m['machine']['device_name']} ({m['machine']['device']}), "
                  f"torch {m['torch']}, transformers {m['transformers']}, commit {m['git_commit'] or 'unknown'}; "
                  f"Q-Zoom crops at the global budget. Latency is per sample, batch size {m['batch_size']}, "
                  "preprocessing included. Boxes: the twig's on detail questions (forced where the gate skipped); "
                  "box hit = >= 50% of the target plate covered, over the boxes; IoU with the target plate over all "
                  "detail questions, no box (empty mask) = 0; box / target area over the boxes."]
    return "\n".join(lines) + "\n"


def bench(model_dir=None, n: int | None = None, batch_size: int = 16, out=None, device: str | None = None,
          quick: bool = False) -> dict:
    """Measure, then write the JSON report and the `.md` and `.png` beside it; returns the report."""
    from qzoom_adapters.errors import QZoomError

    from .shipped import DEFAULT_DIR, load_default

    model_dir = Path(model_dir or DEFAULT_DIR)
    out = Path(out) if out else default_out()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n = n if n is not None else QUICK["n"] if quick else 300
    if n < 1 or batch_size < 1:
        raise QZoomError(f"--n and --batch-size must be at least 1, got {n} and {batch_size}")
    baseline_budgets, qzoom_budgets = (QUICK["baseline"], QUICK["qzoom"]) if quick else (BUDGETS, QZOOM_BUDGETS)
    t0 = time.perf_counter()
    configs = [("baseline", b) for b in baseline_budgets] + [("Q-Zoom", b) for b in qzoom_budgets]
    print(f"qzoom bench zoomworld: n={n} test samples, {len(configs)} configurations "
          f"({', '.join(f'{m} {b}' for m, b in configs)}) on {device}; loading {model_dir}", file=sys.stderr, flush=True)
    zoom, spec, processor = load_default(model_dir)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as `qzoom_adapters.recipes.models.load_backbone`
    for module in (zoom.model, zoom.twig, zoom.gate):
        if module is not None:
            module.to(device, dtype)
    samples = split("test", n)
    run_baseline(zoom.model, processor, spec, samples[:2], min(baseline_budgets), batch_size, device)  # warm-up
    run_qzoom(zoom, processor, samples[:2], min(qzoom_budgets), batch_size, device)
    baseline, correct, qzoom = [], {}, []
    for i, (method, b) in enumerate(configs):
        with progress(len(samples), f"[{i + 1}/{len(configs)}] {method} at {b} visual tokens") as bar:
            if method == "baseline":
                row, correct[b] = run_baseline(zoom.model, processor, spec, samples, b, batch_size, device, bar)
                baseline.append(row)
            else:
                qzoom.append(run_qzoom(zoom, processor, samples, b, batch_size, device, correct.get(b), bar))
    report = {"meta": {**metadata(model_dir, n, batch_size, device), "zoom_config": zoom.config.model_dump(),
                       "elapsed_s": time.perf_counter() - t0},
              "baseline": baseline, "qzoom": qzoom}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown_table(report))
    series = {"baseline": [(r["visual_tokens"], r["accuracy"]["all"], str(r["budget"])) for r in baseline],
              "Q-Zoom": [(r["visual_tokens"], r["accuracy"]["all"], str(r["budget"])) for r in qzoom]}
    line_plot(series, f"ZoomWorld test (n={n}): accuracy vs visual tokens").save(out.with_suffix(".png"))
    return report
