"""A local lmms-eval task over ZoomWorld questions, built on the fly (no download).

`write_task(folder, n)` saves the first `n` questions of a ZoomWorld split as a `datasets` dataset (scene image,
question, answer, family) and writes a task YAML beside it that lmms-eval loads with `--include_path folder`
(`load_from_disk`). Its documents are scored as `qzoom bench zoomworld` scores them (`zoomworld.scoring`:
normalised exact match), overall and per question family:

    lmms-eval --model qzoom --model_args pretrained=DEFAULT/model,adapters=DEFAULT,budget=64 \\
        --include_path FOLDER --tasks qzoom_zoomworld --batch_size 8

The YAML's `!function` entries resolve to a module next to it, so a two-line `qzoom_zoomworld_utils.py` that
imports the functions below is written there too.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qzoom_adapters.benchmarks.zoomworld.bench import MAX_NEW_TOKENS
from qzoom_adapters.benchmarks.zoomworld.generator import Sample, split
from qzoom_adapters.benchmarks.zoomworld.scoring import exact_match

TASK = "qzoom_zoomworld"
FAMILIES = ("detail", "global")
_UTILS = "qzoom_zoomworld_utils"


@dataclass
class ZoomWorldTask:
    """A written task folder: its path (for `--include_path`), task name and the questions it holds."""

    folder: Path
    name: str
    samples: list[Sample]


# --- the task's functions (named in the YAML) ------------------------------------------------------------
def doc_to_visual(doc) -> list:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None) -> str:
    return doc["question"]


def process_results(doc, results) -> dict:
    ok = float(exact_match(results[0], doc["answer"]))
    per_family = {"family": doc["family"], "correct": ok}
    return {"accuracy": ok, "detail_accuracy": per_family, "global_accuracy": per_family}


def _family_mean(items, family: str):
    values = [item["correct"] for item in items if item["family"] == family]
    return sum(values) / len(values) if values else float("nan")


def aggregate_detail(items):
    return _family_mean(items, "detail")


def aggregate_global(items):
    return _family_mean(items, "global")


# --- writing the folder ----------------------------------------------------------------------------------
def _yaml(data_dir: Path) -> str:
    return "\n".join([
        f"task: {TASK}",
        f"dataset_path: {json.dumps(str(data_dir.resolve()))}",
        "dataset_kwargs:",
        "  load_from_disk: true",
        "test_split: test",
        "output_type: generate_until",
        f"doc_to_visual: !function {_UTILS}.doc_to_visual",
        f"doc_to_text: !function {_UTILS}.doc_to_text",
        "doc_to_target: answer",
        "generation_kwargs:",
        f"  max_new_tokens: {MAX_NEW_TOKENS}",  # as qzoom bench zoomworld
        "  until: []",
        "  do_sample: false",
        f"process_results: !function {_UTILS}.process_results",
        "metric_list:",
        "  - metric: accuracy",
        "    aggregation: mean",
        "    higher_is_better: true",
        "  - metric: detail_accuracy",
        f"    aggregation: !function {_UTILS}.aggregate_detail",
        "    higher_is_better: true",
        "  - metric: global_accuracy",
        f"    aggregation: !function {_UTILS}.aggregate_global",
        "    higher_is_better: true",
        "metadata:",
        "  version: 0.0",
        "",
    ])


def write_task(folder, n: int, split_name: str = "test") -> ZoomWorldTask:
    """The first `n` questions of ZoomWorld split `split_name` as an lmms-eval task folder."""
    import datasets

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    samples = split(split_name, n)
    features = datasets.Features({"id": datasets.Value("string"), "seed": datasets.Value("int64"),
                                  "question": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "family": datasets.Value("string"), "kind": datasets.Value("string"),
                                  "image": datasets.Image()})
    table = {"id": [s.id for s in samples], "seed": [s.seed for s in samples],
             "question": [s.question for s in samples], "answer": [s.answer for s in samples],
             "family": [s.family for s in samples], "kind": [s.kind for s in samples],
             "image": [s.image for s in samples]}  # stored as PNG: lossless, the same pixels come back
    data = folder / "data"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(table, features=features)}).save_to_disk(str(data))
    (folder / f"{TASK}.yaml").write_text(_yaml(data))
    (folder / f"{_UTILS}.py").write_text(
        '"""Functions of the qzoom_zoomworld task (its YAML names this module)."""\n'
        "from qzoom_adapters.benchmarks.lmms.zoomworld_task import (  # noqa: F401\n"
        "    aggregate_detail, aggregate_global, doc_to_text, doc_to_visual, process_results)\n")
    return ZoomWorldTask(folder, TASK, samples)
