"""The whole Q-Zoom chain on a ZoomWorld model, through the project's recipes, into a default folder.

    python -m qzoom_adapters.benchmarks.zoomworld.chain --model MODEL_DIR --out RUN [--n 256] [--n-gate 300] [--n-val 96]
    python -m qzoom_adapters.benchmarks.zoomworld.chain --choose --model DEFAULT_DIR --out RUN [--roi-refines 1,2,4,8]

The second form runs step 6 alone on an existing default folder (its thresholds are rewritten; RUN/choose.json logs it).

Steps (each one a recipe command; a step whose output is complete is skipped, so a stopped chain resumes):
1. `qzoom_adapters.benchmarks.zoomworld.recipe`: records (natural mode: the detail question + GROUNDING_PROMPT, answered
   with the plate's box), the stage-2/3 pools and `recipe.yaml`;
2. `qzoom heads` on the candidate layers: the natural-mode grounding heads. The records' ground-truth
   boxes **select** the heads (the lift ranking); no sink heads are used;
3. `qzoom labels stage1` with those heads, `qzoom train stage1` (the twig; `--stage1-budgets` trains it on the
   views it runs on, `stage1.budgets`);
4. `qzoom labels stage3` at 64-1024 tokens, `qzoom train stage3` (the gate, the twig beside it);
5. the default folder: the model, the adapters in bf16, the recipe and the logs under `training/`;
6. on **validation** questions only: `roi_threshold`, `roi_region` (and `roi_refine` with `--roi-refines`) (forced zoom, detail questions at the
   Q-Zoom budgets: the best mean accuracy, ties to the larger IoU with the plate) and then `gate_threshold`
   (`threshold.py`: fires on the detail questions each budget gets wrong, skips global ones).
`RUN/chain.json` records every step's result, its seconds, and both choices.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
import yaml

from .generator import VAL_SEED, make_sample

ROI_CANDIDATES = (0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.3, 0.4)
ROI_REGIONS = ("union", "largest")
ROI_REFINES = (1,)  # roi_refine candidates; (1, 2, 4, 8) searches the sub-cell box too (`--roi-refines`)
ROI_BUDGETS = (64, 128)


def _cli(*argv: str) -> None:
    from qzoom_adapters.recipes.cli import main

    code = main(list(argv))
    if code:
        raise SystemExit(f"step failed ({code}): qzoom {' '.join(argv)}")


def _done(path: Path) -> bool:
    return (path / "training_complete.json").is_file()


class StepLog:
    """`RUN/<name>.json`: each finished step's seconds and result; a step already there is skipped (resume)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.log = json.loads(self.path.read_text()) if self.path.is_file() else {"steps": {}}

    def step(self, name: str, fn, done: bool = False) -> None:
        if done or name in self.log["steps"]:
            print(f"== {name}: done", flush=True)
            return
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        result = fn()
        self.log["steps"][name] = {"seconds": round(time.perf_counter() - t0, 1), **(result or {})}
        self.write()

    def write(self) -> None:
        self.path.write_text(json.dumps(self.log, indent=1) + "\n")


def validation_samples(n_val: int) -> list:
    """The validation questions both thresholds are chosen on: detail and global in turn (never test)."""
    return [make_sample(VAL_SEED + i, "detail" if i % 2 == 0 else "global") for i in range(n_val)]


def choose_thresholds(default: Path, log: StepLog, n_val: int, refines=ROI_REFINES) -> None:
    """`roi_threshold` and then `gate_threshold` of a default folder, on validation; written into the folder."""
    from .shipped import load_default, write_zoom_fields
    from .threshold import main as threshold_main

    def roi():
        zoom, spec, processor = load_default(default)
        _to_device(zoom)
        chosen = choose_roi_threshold(zoom, spec, processor, [s for s in validation_samples(n_val)
                                                               if s.family == "detail"], refines=refines)
        write_zoom_fields(default, roi_threshold=chosen["roi_threshold"], roi_region=chosen["roi_region"],
                          roi_refine=chosen["roi_refine"])
        return chosen

    log.step("roi_threshold", roi)
    log.step("gate_threshold", lambda: threshold_main(["--model", str(default), "--n", str(n_val), "--write"]) and None)
    saved = json.loads((default / "adapter_config.json").read_text())["zoom"]
    log.log["chosen"] = {k: saved[k] for k in ("roi_threshold", "roi_region", "roi_refine", "gate_threshold")
                         if k in saved}
    log.write()


@torch.no_grad()
def choose_roi_threshold(zoom, spec, processor, samples, budgets=ROI_BUDGETS, candidates=ROI_CANDIDATES,
                         batch_size: int = 16, regions=ROI_REGIONS, refines=ROI_REFINES) -> dict:
    """The (`roi_region`, `roi_threshold`, `roi_refine`) with the best mean detail accuracy with the zoom forced on
    (ties: the larger mean IoU with the asked plate, then SPEC's "union", then SPEC's cell box, refine 1), over
    `budgets`; every candidate's numbers are returned, keyed "region@threshold" (refine 1) or
    "region@threshold/refine"."""
    from .bench import run_qzoom

    rows, keys = {}, {}
    for region, f, t in ((r, f, t) for r in regions for f in refines for t in candidates):
        # copies with each candidate (`with_config`); the caller's zoom is left as it is
        forced = zoom.with_config(roi_threshold=t, roi_region=region, roi_refine=f, gate_threshold=0.0)
        per = [run_qzoom(forced, processor, samples, b, batch_size, zoom.model.device) for b in budgets]
        key = f"{region}@{t}" if f == 1 else f"{region}@{t}/{f}"
        keys[key] = (region, t, f)
        rows[key] = {"detail_accuracy": sum(r["accuracy"]["detail"] for r in per) / len(per),
                     "box_hit": sum(r["box_hit_rate"] or 0.0 for r in per) / len(per),
                     "box_area_fraction": sum(r["box_area_fraction"] or 0.0 for r in per) / len(per),
                     "box_target_area_ratio": sum(r.get("box_target_area_ratio_mean") or 0.0 for r in per) / len(per),
                     "mean_iou": sum(r.get("box_iou_mean") or 0.0 for r in per) / len(per)}
    best = max(rows, key=lambda k: (round(rows[k]["detail_accuracy"], 6), round(rows[k]["mean_iou"], 6),
                                    keys[k][0] == "union", -keys[k][2]))
    region, threshold, refine = keys[best]
    return {"roi_threshold": threshold, "roi_region": region, "roi_refine": refine, "budgets": list(budgets),
            "n": len(samples), "candidates": rows}


def assemble(model_dir: Path, adapters: Path, out: Path, run: Path) -> Path:
    """A default folder: `model/` (copied), the adapters of `adapters` in bf16, `training/` (recipe, logs)."""
    from qzoom_adapters.pipeline import QZoom
    from qzoom_adapters.recipes.models import load_backbone

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(model_dir, out / "model")
    model, processor, _ = load_backbone(str(model_dir), eval_mode=True)
    zoom = QZoom.from_pretrained(adapters, model=model, processor=processor)
    for module in (zoom.twig, zoom.gate):
        module.to(torch.bfloat16)  # ~3 MB instead of ~6 (loading casts them to the model's dtype)
    zoom.save_pretrained(out)
    if any(p.dtype != torch.bfloat16 for p in model.parameters()):  # a stage-2 model is saved in float32
        model.to(torch.bfloat16).save_pretrained(out / "model")  # ~12 MB: the shipped files stay under 16 MB
    train = out / "training"
    train.mkdir()
    for src, name in ((run / "recipe.yaml", "recipe.yaml"), (run / "heads.json", "heads.json"),
                      (run / "stage1" / "train_log.csv", "stage1.csv"), (run / "stage2" / "train_log.csv", "stage2.csv"),
                      (run / "stage3" / "train_log.csv", "stage3.csv"),
                      (run / "stage3" / "gate_pool.json", "gate_pool.json")):
        if src.is_file():
            shutil.copy(src, train / name)
    return out


def run_chain(model_dir, out, n: int = 256, n_gate: int = 300, n_val: int = 96, grid: int = 16,
              layers: str = "1,2,3,4,5,6,7", top: int = 4, batch_size: int = 8,
              heads_limit: int | None = None, workers: int = 0, stage1_budgets: list[int] | None = None,
              twig_layers: int | None = None, roi_refines=ROI_REFINES) -> dict:
    from .recipe import write_setup

    model_dir, run = Path(model_dir).resolve(), Path(out)
    run.mkdir(parents=True, exist_ok=True)
    steps = StepLog(run / "chain.json")
    step = steps.step
    cfg = str(run / "recipe.yaml")
    # the chain runs no stage 2: its pool is kept small (the shipped run, n=256 and n_gate=300, is unchanged)
    step("setup", lambda: {"recipe": str(write_setup(run, model_dir, n, grid, n_gate, "natural", batch_size,
                                                     n_pool=min(n, n_gate), workers=workers) / "recipe.yaml")})

    def heads():
        limit = () if heads_limit is None else ("--limit", str(heads_limit))
        _cli("heads", "--config", cfg, "--layers", layers, "--top", str(top), "--out", str(run / "heads.json"), *limit)
        pairs = json.loads((run / "heads.json").read_text())["natural"]["suggested_pairs"]
        pairs = {int(k): v for k, v in pairs.items()}
        recipe = yaml.safe_load(Path(cfg).read_text())
        recipe["labels_stage1"]["natural_pairs"] = pairs
        Path(cfg).write_text(yaml.safe_dump(recipe, sort_keys=False))
        return {"natural_pairs": pairs}

    step("heads", heads)
    recipe = yaml.safe_load(Path(cfg).read_text())
    if recipe["stage1"].get("budgets") != stage1_budgets:  # the twig's training views (None: the label grid's)
        if (run / "stage1").exists():
            raise SystemExit(f"{run}: its stage 1 was trained with budgets {recipe['stage1'].get('budgets')}, "
                             f"not {stage1_budgets}; use a new --out")
        recipe["stage1"]["budgets"] = stage1_budgets
        Path(cfg).write_text(yaml.safe_dump(recipe, sort_keys=False))
    if twig_layers is not None and recipe["T"] != twig_layers:  # the twig's and the gate's depth (T)
        if (run / "stage1").exists():
            raise SystemExit(f"{run}: its stage 1 was trained with T={recipe['T']}, not {twig_layers}; use a new --out")
        recipe["T"] = twig_layers
        Path(cfg).write_text(yaml.safe_dump(recipe, sort_keys=False))
    step("labels_stage1", lambda: _cli("labels", "stage1", "--config", cfg))
    step("train_stage1", lambda: _cli("train", "stage1", "--config", cfg), _done(run / "stage1"))
    step("labels_stage3", lambda: _cli("labels", "stage3", "--config", cfg))
    step("train_stage3", lambda: _cli("train", "stage3", "--config", cfg), _done(run / "stage3"))
    default = run / "default"
    step("assemble", lambda: {"folder": str(assemble(model_dir, run / "stage3", default, run))})
    choose_thresholds(default, steps, n_val, roi_refines)
    shutil.copy(steps.path, default / "training" / "chain.json")
    return steps.log


def _to_device(zoom) -> None:
    if torch.cuda.is_available():
        for module in (zoom.model, zoom.twig, zoom.gate):
            module.to("cuda", torch.bfloat16)


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 64,128,256, got {text!r}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a ZoomWorld model folder (HF format)")
    p.add_argument("--out", required=True, help="run folder; the default folder is written to OUT/default")
    p.add_argument("--n", type=int, default=256, help="stage-1 records (detail questions with boxes)")
    p.add_argument("--n-gate", type=int, default=300, help="stage-3 questions")
    p.add_argument("--n-val", type=int, default=96, help="validation questions for the two thresholds")
    p.add_argument("--grid", type=int, default=16, help="stage-1 label grid")
    p.add_argument("--layers", default="1,2,3,4,5,6,7", help="candidate layers for `qzoom heads`")
    p.add_argument("--top", type=int, default=4, help="grounding heads to keep")
    p.add_argument("--batch-size", type=int, default=8, help="training batch of stages 1-3 (the shipped run: 8)")
    p.add_argument("--heads-limit", type=int, help="stage-1 records `qzoom heads` ranks on (default: all)")
    p.add_argument("--stage1-budgets", type=_ints, default=None,
                   help="visual-token budgets to train the twig at, e.g. 64,128,256 (stage1.budgets; default: the "
                        "label grid's square view, SPEC 4.2)")
    p.add_argument("--twig-layers", type=int, default=None,
                   help="T, the decoder layers of the twig and of the gate's branch (default: the recipe's, 2)")
    p.add_argument("--roi-refines", type=_ints, default=list(ROI_REFINES),
                   help="roi_refine candidates searched with the thresholds, e.g. 1,2,4,8 (default: 1, SPEC's box)")
    p.add_argument("--choose", action="store_true",
                   help="--model is a default folder: only choose its thresholds on validation (step 6)")
    p.add_argument("--workers", type=int, default=0,
                   help="processes that draw the scenes and load the stage-1 and training data (0: none)")
    args = p.parse_args(argv)
    if any(f < 1 or f > 16 for f in args.roi_refines):
        raise SystemExit(f"--roi-refines: each factor must be 1 to 16, got {args.roi_refines}")
    if args.choose:
        if not (Path(args.model) / "adapter_config.json").is_file():
            raise SystemExit(f"--choose --model {args.model}: no adapter_config.json there (a default folder is needed)")
        Path(args.out).mkdir(parents=True, exist_ok=True)
        log = StepLog(Path(args.out) / "choose.json")
        choose_thresholds(Path(args.model), log, args.n_val, args.roi_refines)
        print(json.dumps(log.log["chosen"], indent=1))
        return 0
    if not (Path(args.model) / "config.json").is_file():
        raise SystemExit(f"--model {args.model}: no config.json there (a saved ZoomWorld model folder is needed)")
    log = run_chain(args.model, args.out, args.n, args.n_gate, args.n_val, args.grid, args.layers, args.top,
                    args.batch_size, args.heads_limit, args.workers, args.stage1_budgets, args.twig_layers,
                    args.roi_refines)
    print(json.dumps({k: log[k] for k in ("chosen",)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
