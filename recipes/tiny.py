"""`qzoom tiny`: a tiny random model, synthetic records and a recipe YAML to try every command on (CPU)."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from qzoom_adapters.errors import QZoomError
from qzoom_adapters.spec import registered_families

from .data import write_jsonl
from .synthetic import demo_scenes

TINY_PAIRS = {"textual_pairs": {4: [0, 1], 5: [2]}, "natural_pairs": {4: [1, 3]}, "natural_sink_pairs": {2: [0]}}


def write_tiny_setup(out, family: str = "qwen2_5_vl", samples: int = 8, seed: int = 0,
                     overwrite: bool = False) -> Path:
    """Write `model/` (HF model + processor), `images/`, `records.jsonl` and `recipe.yaml` under `out`.

    `out` must be new or empty; `overwrite=True` writes over the files of those names (nothing else is touched).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise QZoomError(f"{out} is a file; choose a new folder for the tiny setup")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        what = "a tiny setup" if (out / "recipe.yaml").exists() else "files"
        raise QZoomError(f"{out} already holds {what}; choose a new or empty folder, or pass --overwrite to "
                         "replace its model/, images/, records.jsonl and recipe.yaml")
    if samples < 1:
        raise QZoomError(f"samples must be at least 1, got {samples}")
    families = registered_families()
    if family not in families or not hasattr(families[family], "tiny_config"):
        raise QZoomError(f"no tiny model for family {family!r}; choose one of "
                         f"{sorted(f for f, c in families.items() if hasattr(c, 'tiny_config'))}")
    spec_cls = families[family]
    torch.manual_seed(seed)
    processor = spec_cls.tiny_processor()
    tok = processor.tokenizer
    # a wide init makes the random teacher attend sharply, so some stage-1 labels are valid
    model = spec_cls.model_class()._from_config(spec_cls.tiny_config(text={"initializer_range": 0.5})).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out / "model")
    processor.save_pretrained(out / "model")
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, scene in enumerate(demo_scenes(samples, seed=seed)):
        name = f"images/{i:04d}.png"
        scene.image.save(out / name)
        natural = i % 2 == 1
        question = (scene.question.replace("What is written on", "What colour is") +
                    " Answer the question using a single word or phrase.") if natural else scene.question
        rows.append({"id": f"tiny-{i:04d}", "image": name, "question": question,
                     "answers": [scene.colour if natural else scene.answer], "mode": "natural" if natural else "textual",
                     "dataset": "tiny", "box": list(scene.box)})
    write_jsonl(out / "records.jsonl", rows)
    grid = 6 if family == "llava" else 4
    train = {"batch_size": 4, "effective_batch": 4, "save_every": 2, "lr": 1e-3}
    # A random model is never right, so the smoke recipe keeps every zoomed sample for stage 2 (not only
    # regressions) and judges stage-3 budgets against the top budget (36 and 37 tokens give the same view).
    recipe = {
        "model": {"path": "model", "dtype": "float32"},
        "K": 3, "T": 3,
        "labels_stage1": {"records": "records.jsonl", "out": "runs/labels1", "grid": grid, "max_new_tokens": 6,
                          "batch_size": 4, "shard_size": 8, **TINY_PAIRS},
        "stage1": {"labels": "runs/labels1", "out": "runs/stage1", "train": {**train, "max_steps": 4}},
        "mine": {"records": "records.jsonl", "adapters": "runs/stage1", "out": "runs/mine", "roi_threshold": 0.5,
                 "keep": "zoomed", "target": "ground_truth",
                 "batch_size": 4, "max_new_tokens": 6},
        "stage2": {"data": "runs/mine/regressions.jsonl", "adapters": "runs/stage1", "out": "runs/stage2",
                   "roi_threshold": 0.5, "train": {**train, "lr": 1e-4, "max_steps": 2}},
    }
    if family != "llava":  # LLaVA-1.5 sees one fixed resolution: there are no budgets to gate between
        recipe["labels_stage3"] = {"records": "records.jsonl", "out": "runs/labels3/answers.jsonl",
                                   "model": "runs/stage2/model", "budgets": [4, 9, 36, 37], "max_new_tokens": 4,
                                   "batch_size": 4}
        recipe["stage3"] = {"answers": "runs/labels3/answers.jsonl", "adapters": "runs/stage2", "out": "runs/stage3",
                            "model": "runs/stage2/model", "reference": "top_budget",
                            "train": {**train, "batch_size": 2, "effective_batch": 2, "max_steps": 2}}
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return out
