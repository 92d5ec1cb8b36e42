"""Q-Zoom on the ZoomWorld model through the project's own recipes: records + a recipe YAML.

    python -m qzoom_adapters.benchmarks.zoomworld.recipe --model DIR --out RUN [--n 128]
    qzoom heads --config RUN/recipe.yaml --layers 1,2,3 --out RUN/heads.json   # choose the pairs
    qzoom labels stage1 --config RUN/recipe.yaml --set labels_stage1.textual_pairs=...
    qzoom train stage1 --config RUN/recipe.yaml
    qzoom mine --config RUN/recipe.yaml && qzoom train stage2 --config RUN/recipe.yaml
    qzoom labels stage3 --config RUN/recipe.yaml && qzoom train stage3 --config RUN/recipe.yaml

Records come from their own seed range (disjoint from the training stream, val and test) and carry
each question's ground-truth box, which `qzoom heads` uses to *select* the attention heads.
"""
from __future__ import annotations

import argparse
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

from qzoom_adapters.recipes.data import write_jsonl

from .generator import GROUNDING_PROMPT, make_sample

RECIPE_SEED = 30_000_000  # records for the Q-Zoom stages (training stream < 10M, val 10M+, test 20M+)
K, T = 4, 2


def _record(out: Path, s, box: bool = False, mode: str = "textual") -> dict:
    """Save the sample's image under `out/images/` and return its record."""
    name = f"images/{s.id}.png"
    s.image.save(out / name)
    row = {"id": s.id, "image": name, "question": s.question, "answers": [s.answer], "mode": mode,
           "dataset": "zoomworld"}
    return {**row, "box": list(s.box)} if box else row


def _write_one(job: tuple) -> dict:
    out, seed, family, box, mode = job
    return _record(out, make_sample(seed, family), box=box, mode=mode)


def write_records(out: Path, name: str, start: int, families: tuple, count: int, box: bool = False,
                  mode: str = "textual", workers: int = 0) -> None:
    """`out/name`: `count` questions at seeds start + i, the families in turn; images under `out/images/`.
    `workers` > 1 draws and saves the scenes in that many processes (each scene depends on its seed alone,
    so the files are the same either way)."""
    (Path(out) / "images").mkdir(parents=True, exist_ok=True)
    jobs = [(Path(out), start + i, families[i % len(families)], box, mode) for i in range(count)]
    if workers > 1 and count > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = list(pool.map(_write_one, jobs, chunksize=max(1, count // (4 * workers))))
    else:
        rows = [_write_one(job) for job in jobs]
    write_jsonl(Path(out) / name, rows)


STAGE3_BUDGETS = [64, 128, 256, 576, 1024]  # every Q-Zoom budget (64-256) is drawn, so the gate sees each one


def write_setup(out, model_dir, n: int = 128, grid: int = 16, n_gate: int | None = None,
                mode: str = "natural", batch_size: int = 8, n_pool: int | None = None, workers: int = 0) -> Path:
    """`images/`, `records.jsonl` (detail questions with boxes, in `mode`), `pool.jsonl` (stage 2),
    `gate.jsonl` (stage 3, two detail questions for one global) and `recipe.yaml` under `out`.

    Natural mode (SPEC 4.1, the default): the teacher is asked the detail question followed by
    GROUNDING_PROMPT and answers with the plate's box (the model is trained on that grounding question);
    its attention while it writes the box is the label. Textual mode: the teacher answers the question.
    `n_pool`: stage-2 questions (default: `n`). `batch_size`: the training batch of stages 1-3 and the
    labelling batches (at least 8 and 16). `workers`: processes that draw the scenes and, in the recipe,
    load and process images for the stage-1 labels and the training stages (0: in the main process)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if mode not in ("natural", "textual"):
        raise ValueError(f"mode must be 'natural' or 'textual', got {mode!r}")
    out = Path(out)

    def records(name: str, start: int, families: tuple, count: int, box: bool = False, mode="textual") -> None:
        write_records(out, name, start, families, count, box, mode, workers)

    # stage 1: detail questions with their boxes; stage 2 and stage 3: detail and global questions on other scenes
    records("records.jsonl", RECIPE_SEED, ("detail",), n, box=True, mode=mode)
    records("pool.jsonl", RECIPE_SEED + 100_000, ("detail", "global"), n if n_pool is None else n_pool)
    # few detail questions survive the consistency filter (right at both top budgets), so they are 2 in 3 here
    records("gate.jsonl", RECIPE_SEED + 200_000, ("detail", "detail", "global"), n if n_gate is None else n_gate)
    train = {"lr": 1e-3, "batch_size": batch_size, "effective_batch": batch_size, "epochs": 3, "save_every": 20,
             "warmup_ratio": 0.1, "num_workers": workers}
    recipe = {
        "model": {"path": str(Path(model_dir).resolve()), "dtype": "float32"},
        "K": K, "T": T,
        # max_new_tokens: a box "[x1,y1,x2,y2]" is up to 17 characters (+ end of turn); pairs: `qzoom heads`
        "labels_stage1": {"records": "records.jsonl", "out": "labels1", "grid": grid, "max_new_tokens": 18,
                          "batch_size": max(8, batch_size), "shard_size": 64, "answer_suffix": "", "num_workers": workers,
                          "grounding_prompt": GROUNDING_PROMPT,
                          "textual_pairs": {3: [0]}, "natural_pairs": {3: [0]}},
        "stage1": {"labels": "labels1", "out": "stage1", "train": train},
        # The base model reads crops but not whole scenes, so few samples are "regressions" (direct right,
        # zoomed wrong): stage 2 keeps every zoomed sample with its ground truth (RoI-SFT), which teaches the
        # model the [global | RoI] sequence it has never seen.
        "mine": {"records": "pool.jsonl", "adapters": "stage1", "out": "mine", "keep": "zoomed",
                 "target": "ground_truth", "batch_size": max(8, batch_size), "max_new_tokens": 5},
        "stage2": {"data": "mine/regressions.jsonl", "adapters": "stage1", "out": "stage2",
                   "train": {**train, "lr": 1e-4}},
        # stage 3 answers with the base model and keeps the stage-1 twig beside the new gate (run stage 2
        # first and point `model`/`adapters` at stage2/ to gate the post-SFT model instead)
        "labels_stage3": {"records": "gate.jsonl", "out": "labels3/answers.jsonl", "budgets": STAGE3_BUDGETS,
                          "max_new_tokens": 5, "batch_size": max(16, batch_size)},
        "stage3": {"answers": "labels3/answers.jsonl", "adapters": "stage1", "out": "stage3",
                   "train": {**train, "epochs": 8, "save_every": 50, "lr": 3e-4}},
    }
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--grid", type=int, default=16)
    p.add_argument("--n-gate", type=int, help="stage-3 questions (default: --n)")
    p.add_argument("--mode", default="natural", choices=("natural", "textual"), help="stage-1 prompt mode")
    p.add_argument("--batch-size", type=int, default=8, help="training batch of stages 1-3")
    p.add_argument("--workers", type=int, default=0, help="processes for drawing scenes and loading data")
    args = p.parse_args(argv)
    setup = write_setup(args.out, args.model, args.n, args.grid, args.n_gate, args.mode, args.batch_size,
                        workers=args.workers)
    print(setup / "recipe.yaml")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
