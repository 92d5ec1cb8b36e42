"""The Q-Zoom benchmark suites (SPEC §2, §5) as lmms-eval tasks, with the per-task thresholds as presets.

* Doc/OCR at 576 max visual tokens: TextVQA, ChartQA, DocVQA, InfoVQA, OCRBench.
* High resolution at 4096: V* Bench, HR-Bench 4K / 8K, MME-RealWorld-lite.

Thresholds per backbone family, from SPEC §2: Qwen2.5-VL Doc/OCR `roi_threshold` 0.15 (TextVQA, InfoVQA, OCRBench)
or 0.125 (ChartQA, DocVQA) with `gate_threshold` 0.05; high-res `roi_threshold` 0.03-0.04 with gate 0.02, split
per task as the authors' evaluation script does (0.03 for V* Bench, 0.04 for the others). Qwen3-VL: Doc/OCR 0.15 /
0.10, high-res 0.10 / 0.025. The lower bound of the pixel budget (`min_tokens`: 256 for Doc/OCR, 128 for OCRBench,
512 for high-res) is the authors' evaluation setting, not part of SPEC.

`dataset` / `dataset_name` are what lmms-eval 0.7.3's task YAMLs load (a test checks them against the installed
lmms-eval); `metric` is the task's headline metric and `scale` what divides it into [0, 1] (V* reports percent).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskPreset:
    """One lmms-eval task of a suite and how Q-Zoom is run on it."""

    task: str  # the lmms-eval task name
    title: str
    dataset: str  # Hugging Face dataset id (lmms-eval's dataset_path)
    dataset_name: str | None  # its config (lmms-eval's dataset_name)
    metric: str  # the headline metric lmms-eval reports
    scale: float  # metric / scale is in [0, 1]
    roi_threshold: dict[str, float]  # per backbone family
    gate_threshold: dict[str, float]
    min_tokens: int  # lower bound of the global view's budget (the authors' evaluation setting)
    note: str = ""


@dataclass(frozen=True)
class Suite:
    """A group of tasks run at one max visual-token budget; group accuracy is the unweighted task mean."""

    name: str
    title: str
    max_tokens: int
    tasks: tuple[TaskPreset, ...]


def _doc(task, title, dataset, name, metric, roi_q25, min_tokens=256, scale=1.0):
    return TaskPreset(task, title, dataset, name, metric, scale, {"qwen2_5_vl": roi_q25, "qwen3_vl": 0.15},
                      {"qwen2_5_vl": 0.05, "qwen3_vl": 0.10}, min_tokens)


def _hr(task, title, dataset, name, metric, roi_q25, scale=1.0, note=""):
    return TaskPreset(task, title, dataset, name, metric, scale, {"qwen2_5_vl": roi_q25, "qwen3_vl": 0.10},
                      {"qwen2_5_vl": 0.02, "qwen3_vl": 0.025}, 512, note)


_HRBENCH_NOTE = ("lmms-eval's HR-Bench scorer asks an OpenAI model (OPENAI_API_KEY) for answers whose option letter "
                 "it cannot read itself")

SUITES: dict[str, Suite] = {
    "doc": Suite("doc", "Doc/OCR", 576, (
        _doc("textvqa_val", "TextVQA", "lmms-lab-encoder/textvqa", None, "exact_match", 0.15),
        _doc("chartqa", "ChartQA", "lmms-lab-encoder/ChartQA", None, "relaxed_overall", 0.125),
        _doc("docvqa_val", "DocVQA", "lmms-lab-encoder/DocVQA", "DocVQA", "anls", 0.125),
        _doc("infovqa_val", "InfoVQA", "lmms-lab-encoder/DocVQA", "InfographicVQA", "anls", 0.15),
        _doc("ocrbench", "OCRBench", "echo840/OCRBench", None, "ocrbench_accuracy", 0.15, min_tokens=128),
    )),
    "hr": Suite("hr", "High resolution", 4096, (
        _hr("vstar_bench", "V* Bench", "lmms-lab-encoder/vstar-bench", None, "vstar_overall_acc", 0.03, scale=100.0),
        _hr("hrbench4k", "HR-Bench 4K", "DreamMr/HR-Bench", "hrbench_version_split", "average", 0.04,
            note=_HRBENCH_NOTE),
        _hr("hrbench8k", "HR-Bench 8K", "DreamMr/HR-Bench", "hrbench_version_split", "average", 0.04,
            note=_HRBENCH_NOTE),
        _hr("mmerealworld_lite", "MME-RealWorld-lite", "yifanzhang114/MME-RealWorld-lite-lmms-eval", None,
            "mme_realworld_score", 0.04),
    )),
}

SWEEP = (256, 384, 576, 1024, 2048, 4096)  # SPEC §5: the max visual-token budgets of the Pareto plots


def preset_for(task: str) -> tuple[Suite, TaskPreset] | None:
    """The suite and preset of an lmms-eval task name, or None for a task outside the suites."""
    for suite in SUITES.values():
        for preset in suite.tasks:
            if preset.task == task:
                return suite, preset
    return None
