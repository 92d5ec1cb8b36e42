"""The shipped ZoomWorld default (model + Q-Zoom adapters) and the demo that runs it.

Layout of a default folder (`DEFAULT_DIR` unless given):
* `model/`: an ordinary Hugging Face Qwen2.5-VL model + processor folder;
* `adapter_config.json` + `adapter_model.safetensors`: the twig and gate (`QZoom.save_pretrained`);
* `record.json`: what produced it and its recorded test accuracy.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from qzoom_adapters.errors import QZoomError

from .generator import TEST_SEED, Sample, make_sample
from .model import FACTOR
from .scoring import exact_match, mean_or_none, score

DEFAULT_DIR = Path(__file__).parent / "default"
_NEEDED = ("model/config.json", "adapter_config.json", "adapter_model.safetensors")


def load_default(path=DEFAULT_DIR, **config_overrides):
    """(zoom, spec, processor) of a default folder; keyword arguments override its saved `ZoomConfig`."""
    import qzoom_adapters as qz
    from qzoom_adapters.recipes.models import load_backbone

    path = Path(path)
    missing = [name for name in _NEEDED if not (path / name).is_file()]
    if missing:
        raise QZoomError(f"no ZoomWorld default in {path} (missing {', '.join(missing)}); train it with "
                         "benchmarks/zoomworld (see README) or pass the folder of one with --model")
    model, processor, spec = load_backbone(str(path / "model"), eval_mode=True)
    zoom = qz.QZoom.from_pretrained(path, model=model, processor=processor, **config_overrides)
    return zoom, spec, processor


def write_zoom_fields(folder, **fields) -> None:
    """Update saved `ZoomConfig` fields (e.g. thresholds chosen on validation) in a folder's adapter_config.json;
    only that file is rewritten."""
    path = Path(folder) / "adapter_config.json"
    saved = json.loads(path.read_text())
    saved["zoom"].update(fields)
    path.write_text(json.dumps(saved, indent=2) + "\n")


def write_untrained_default(out, seed: int = 0, K: int = 4, T: int = 2) -> Path:
    """A default folder with a randomly initialised model and adapters (for tests: same layout, no training)."""
    import torch

    import qzoom_adapters as qz

    from .model import new_model

    out = Path(out)
    model, processor = new_model(seed)
    twig, gate = qz.TwigRPN.from_backbone(model, K, T), qz.DynamicGate.from_backbone(model, K, T)
    qz.QZoom(model, processor, twig=twig, gate=gate).save_pretrained(out)
    model.to(torch.bfloat16).save_pretrained(out / "model")
    processor.save_pretrained(out / "model")
    (out / "record.json").write_text(json.dumps({"untrained": True}) + "\n")
    return out


def demo_samples(n: int, start: int = 0) -> list[Sample]:
    """`n` held-out questions on test-split scenes `TEST_SEED + start + i`, alternating detail and global."""
    return [make_sample(TEST_SEED + start + i, "detail" if i % 2 == 0 else "global") for i in range(n)]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def run_demo(zoom, spec, processor, samples: list[Sample], budget: int, out_dir, max_new_tokens: int = 8) -> dict:
    """Answer `samples` at `budget` visual tokens (global view and crop), print and picture each, summarise.

    Writes `out_dir/sample_{i}.png` (the scene with the heatmap in cyan, predicted box in magenta, true box dashed,
    and under it a band with the question, answer, truth, gate probability and decision, and a legend; see
    `qzoom_adapters.viz`) and `out_dir/summary.json`; returns the summary.
    """
    from qzoom_adapters.viz import Caption, heatmap_overlay
    from .bench import view_inputs

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pixels = budget * FACTOR**2
    # a copy with the demo's crop budget (same model and adapters); the caller's zoom is left as it was
    zoom = zoom.with_config(crop_min_pixels=pixels, crop_max_pixels=pixels)
    images = [s.image for s in samples]
    inputs = view_inputs(spec, processor, samples, budget, zoom.model.device)
    outs = zoom.generate_from_inputs(inputs, images, max_new_tokens=max_new_tokens)
    seconds = time.perf_counter() - t0
    for i, (s, o) in enumerate(zip(samples, outs)):
        png = out_dir / f"sample_{i}.png"
        right = exact_match(o.text, s.answer)
        caption = Caption(title=f"sample {i}: {s.id} ({s.family} question), budget {budget} visual tokens, "
                                f"used {o.visual_tokens}",
                          question=s.question, answer=o.text, truth=s.answer, correct=right, gate_prob=o.gate_prob,
                          gate_threshold=zoom.config.gate_threshold, zoomed=o.zoomed)
        heatmap_overlay(s.image, o.heatmap, o.bbox, s.box, caption=caption).save(png)
        gate = "n/a" if o.gate_prob is None else f"{o.gate_prob:.3f}"
        verdict = "correct" if right else "wrong"
        print(f"[{i + 1}/{len(samples)}] {s.id} ({s.family}) {s.question}")
        print(f"      gate={gate} zoomed={'yes' if o.zoomed else 'no'} box={o.bbox} visual_tokens={o.visual_tokens}")
        print(f"      answer={o.text!r} truth={s.answer!r} {verdict} -> {png}")
    acc = score(samples, [{"answer": o.text, "box": o.bbox} for o in outs])["accuracy"]
    zoomed = {fam: mean_or_none([o.zoomed for s, o in zip(samples, outs) if s.family == fam]) for fam in ("detail", "global")}
    summary = {"n": len(samples), "budget": budget, "accuracy": acc["all"], "detail_accuracy": acc.get("detail"),
               "global_accuracy": acc.get("global"), "zoom_rate_detail": zoomed["detail"],
               "zoom_rate_global": zoomed["global"],
               "mean_visual_tokens": sum(o.visual_tokens for o in outs) / len(outs), "seconds": round(seconds, 2),
               "answers": [o.text for o in outs]}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"summary: n={summary['n']} accuracy={_fmt(summary['accuracy'])} (detail {_fmt(acc.get('detail'))}, "
          f"global {_fmt(acc.get('global'))}) zoom rate detail {_fmt(zoomed['detail'])} global "
          f"{_fmt(zoomed['global'])}, {summary['mean_visual_tokens']:.0f} visual tokens on average, "
          f"{seconds:.1f}s; pictures in {out_dir}/")
    return summary


CHECK = {"samples": 8, "budget": 64}  # the recorded demo run a test repeats on the shipped files


def recorded_check(path=DEFAULT_DIR, out_dir=None) -> dict:
    """The demo on the first `CHECK["samples"]` demo questions at `CHECK["budget"]`: the numbers `record.json`
    keeps under "check" and that the test suite must reproduce from the shipped files."""
    import tempfile

    zoom, spec, processor = load_default(path)
    with tempfile.TemporaryDirectory() as tmp:
        summary = run_demo(zoom, spec, processor, demo_samples(CHECK["samples"]), CHECK["budget"], out_dir or tmp)
    return {k: summary[k] for k in ("n", "budget", "accuracy", "mean_visual_tokens", "answers")}


def main(argv=None) -> int:
    """`python -m qzoom_adapters.benchmarks.zoomworld.shipped --record DIR`: store `recorded_check` in DIR/record.json."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--record", required=True, help="a default folder whose record.json gets the check")
    args = p.parse_args(argv)
    path = Path(args.record)
    record = json.loads((path / "record.json").read_text()) if (path / "record.json").is_file() else {}
    record["check"] = recorded_check(path)
    (path / "record.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record["check"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
