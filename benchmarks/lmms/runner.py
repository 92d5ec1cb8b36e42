"""`qzoom eval`: lmms-eval's evaluator over the Q-Zoom suites, at several budgets, for Q-Zoom and the baseline.

One `qzoom` model is loaded (through lmms-eval's registry, i.e. the entry point) and reused: per task, budget and
method it sets the view budget and thresholds, runs `lmms_eval.evaluator.simple_evaluate` on that task, and keeps
lmms-eval's metrics with what the model recorded per sample (visual tokens, latency, zoom). The baseline is the
same model with the gate closed (`gate_threshold` above 1), which answers exactly as the unmodified model's greedy
`generate` (conformance check `never_zoom_equals_generate`).

Per row: the task's headline metric (and every metric lmms-eval reported), its accuracy in [0, 1], mean visual
tokens, mean latency (the batch's wall clock per sample, preprocessing to decoded text, device-synchronised),
throughput (samples / total latency) and zoom rate. Per suite and method (SPEC §5): group accuracy (unweighted
task mean), group throughput (sum N_i / sum N_i / sps_i) and visual tokens, plotted against each other over the
budgets (Pareto plots).
"""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qzoom_adapters.errors import QZoomError

from .dataset_cache import check_cached
from .model_args import ModelArgsError
from .suites import SUITES, TaskPreset, preset_for

BASELINE_GATE = 2.0  # above 1: the gate never fires, so every answer is the plain model's
METHODS = ("qzoom", "baseline")
SERIES = {"qzoom": "Q-Zoom", "baseline": "baseline"}  # names in the plots (benchmarks.plots colours)


@dataclass
class EvalSettings:
    """What `qzoom eval` runs (see `recipes/eval_command.py` for the command line)."""

    model: str
    adapters: str
    tasks: list[str]  # lmms-eval task names, in order
    budgets: dict[str, list[int]]  # task -> max visual tokens to run it at
    methods: tuple[str, ...] = METHODS
    limit: int | None = None
    batch_size: int = 8
    device: str | None = None
    dtype: str = "auto"
    include_path: str | None = None
    gate_threshold: float | None = None  # replaces the presets' (and the adapters') value
    roi_threshold: float | None = None
    allow_download: bool = False
    out: Path = Path("qzoom-eval")


@dataclass
class EvalRow:
    """One task at one budget for one method."""

    method: str
    suite: str
    task: str
    budget: int
    min_tokens: int
    metric: str | None
    score: float | None  # the headline metric as lmms-eval reports it
    accuracy: float | None  # score / scale, in [0, 1]
    n: int
    visual_tokens: float
    latency_s: float
    throughput: float  # samples per second
    zoom_rate: float
    gate_threshold: float
    roi_threshold: float
    metrics: dict = field(default_factory=dict)  # everything lmms-eval reported for the task


@dataclass
class GroupPoint:
    """One suite and method at one budget (SPEC §5 group numbers)."""

    method: str
    suite: str
    budget: int
    accuracy: float  # unweighted mean over the suite's tasks
    throughput: float  # sum N_i / sum (N_i / sps_i)
    visual_tokens: float  # mean over every sample of the group
    tasks: int


@dataclass
class EvalReport:
    rows: list[EvalRow]
    groups: list[GroupPoint]
    meta: dict


def _import_lmms_eval():
    try:
        from lmms_eval import evaluator
        from lmms_eval.models import get_model
        from lmms_eval.tasks import TaskManager
    except ImportError as err:
        raise QZoomError(f"qzoom eval runs lmms-eval, which is not installed here ({err}); install it with "
                         "pip install -e .[eval] (or pip install 'lmms-eval>=0.7.3,<0.8' 'filelock<4')") from None
    return evaluator, get_model, TaskManager


def dataset_needs(tasks: list[str]) -> dict[str, str]:
    """task -> Hugging Face dataset id for the tasks of the Q-Zoom suites (local tasks need none)."""
    return {t: found[1].dataset for t in tasks if (found := preset_for(t)) is not None}


def _suite_of(task: str) -> tuple[str, TaskPreset | None]:
    found = preset_for(task)
    return (found[0].name, found[1]) if found else ("custom", None)


def _thresholds(settings: EvalSettings, preset: TaskPreset | None, family: str, saved) -> tuple[float, float]:
    gate = settings.gate_threshold
    roi = settings.roi_threshold
    if preset is not None:
        gate = gate if gate is not None else preset.gate_threshold.get(family, saved.gate_threshold)
        roi = roi if roi is not None else preset.roi_threshold.get(family, saved.roi_threshold)
    return (saved.gate_threshold if gate is None else gate), (saved.roi_threshold if roi is None else roi)


def _headline(results: dict, preset: TaskPreset | None) -> tuple[str | None, float | None]:
    """(metric, value): the preset's metric, else the first numeric metric lmms-eval reported."""
    numeric = {k.split(",")[0]: v for k, v in results.items()
               if "," in k and "_stderr" not in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
    if preset is not None:
        return preset.metric, numeric.get(preset.metric)
    name = next(iter(numeric), None)
    return name, numeric.get(name) if name else None


def _finite(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def run(settings: EvalSettings) -> EvalReport:
    """Run every task at its budgets for each method; write the report (see `write_report`) and return it."""
    if not settings.allow_download:  # before anything slow: the datasets are there, or the error names them
        check_cached(dataset_needs(settings.tasks))
    with _offline(not settings.allow_download):  # from the cache only, as checked
        return _run(settings)


@contextmanager
def _offline(on: bool):
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set for the run where the user has not set them, then restored."""
    keys = [k for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if on and k not in os.environ]
    os.environ.update(dict.fromkeys(keys, "1"))
    try:
        yield
    finally:
        for key in keys:
            os.environ.pop(key, None)


def _run(settings: EvalSettings) -> EvalReport:
    evaluator, get_model, TaskManager = _import_lmms_eval()
    args = f"pretrained={settings.model},adapters={settings.adapters},dtype={settings.dtype}"
    extra = {"batch_size": settings.batch_size, "device": settings.device}
    t0 = time.perf_counter()
    try:
        lm = get_model("qzoom").create_from_arg_string(args, extra)
    except ModelArgsError as err:
        raise QZoomError(str(err)) from None
    family, saved = lm.zoom.spec.family, lm.zoom.config
    task_manager = TaskManager("WARNING", include_path=settings.include_path)
    unknown = [t for t in settings.tasks if t not in task_manager.all_tasks]
    if unknown:
        raise QZoomError(f"lmms-eval has no task {', '.join(unknown)}; for a local task pass --include-path with its "
                         "folder")
    rows = []
    for task in settings.tasks:
        suite, preset = _suite_of(task)
        gate, roi = _thresholds(settings, preset, family, saved)
        for budget in settings.budgets[task]:
            min_tokens = min(preset.min_tokens, budget) if preset else budget  # local tasks: exactly the budget
            lm.set_budget(min_pixels=lm.zoom.spec.budget_pixels(min_tokens),
                          max_pixels=lm.zoom.spec.budget_pixels(budget))
            for method in settings.methods:
                lm.set_zoom(gate_threshold=BASELINE_GATE if method == "baseline" else gate, roi_threshold=roi)
                lm.stats.clear()
                print(f"qzoom eval: {task} at {budget} visual tokens, {SERIES[method]}", flush=True)
                res = evaluator.simple_evaluate(model=lm, tasks=[task], task_manager=task_manager,
                                                limit=settings.limit, batch_size=settings.batch_size,
                                                bootstrap_iters=0, log_samples=False, verbosity="WARNING")
                results = res["results"][task]
                metric, score = _headline(results, preset)
                stats = list(lm.stats)
                n = len(stats)
                total = sum(s.latency_s for s in stats)
                rows.append(EvalRow(
                    method=method, suite=suite, task=task, budget=budget, min_tokens=min_tokens, metric=metric,
                    score=_finite(score), accuracy=_finite(None if score is None else score / (preset.scale if preset else 1.0)),
                    n=n, visual_tokens=sum(s.visual_tokens for s in stats) / max(n, 1),
                    latency_s=total / max(n, 1), throughput=n / total if total > 0 else 0.0,
                    zoom_rate=sum(s.zoomed for s in stats) / max(n, 1),
                    gate_threshold=BASELINE_GATE if method == "baseline" else gate, roi_threshold=roi,
                    metrics={k: _finite(v) for k, v in results.items() if isinstance(v, (int, float, str))}))
    report = EvalReport(rows, group_points(rows), _meta(settings, family, time.perf_counter() - t0))
    write_report(report, settings.out)
    return report


def group_points(rows: list[EvalRow]) -> list[GroupPoint]:
    """SPEC §5 group numbers per (method, suite, budget) over the rows with an accuracy."""
    keys = sorted({(r.method, r.suite, r.budget) for r in rows})
    out = []
    for method, suite, budget in keys:
        part = [r for r in rows if (r.method, r.suite, r.budget) == (method, suite, budget) and r.accuracy is not None]
        if not part or any(r.throughput <= 0 for r in part):
            continue
        n = sum(r.n for r in part)
        out.append(GroupPoint(method, suite, budget, accuracy=sum(r.accuracy for r in part) / len(part),
                              throughput=n / sum(r.n / r.throughput for r in part),
                              visual_tokens=sum(r.visual_tokens * r.n for r in part) / n, tasks=len(part)))
    return out


def _meta(settings: EvalSettings, family: str, seconds: float) -> dict:
    import torch
    import transformers

    from qzoom_adapters.benchmarks.provenance import git_commit

    try:
        from importlib.metadata import version

        lmms_version = version("lmms-eval")
    except Exception:  # an lmms-eval importable from a source tree has no metadata
        lmms_version = None
    return {"model": settings.model, "adapters": settings.adapters, "family": family, "limit": settings.limit,
            "batch_size": settings.batch_size, "device": settings.device, "dtype": settings.dtype,
            "torch": torch.__version__, "transformers": transformers.__version__, "lmms_eval": lmms_version,
            "git_commit": git_commit(), "elapsed_s": seconds}


def _fmt(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def markdown_table(report: EvalReport) -> str:
    lines = ["| method | suite | task | budget | metric | score | accuracy | visual tokens | latency (ms/sample) | "
             "throughput (samples/s) | zoom rate | n |", "|" + "---|" * 12]
    for r in report.rows:
        lines.append(f"| {SERIES[r.method]} | {r.suite} | {r.task} | {r.budget} | {r.metric or '–'} | {_fmt(r.score)} | "
                     f"{_fmt(r.accuracy)} | {r.visual_tokens:.1f} | {1000 * r.latency_s:.1f} | {r.throughput:.2f} | "
                     f"{r.zoom_rate:.3f} | {r.n} |")
    if report.groups:
        lines += ["", "| method | suite | budget | group accuracy | group throughput (samples/s) | visual tokens | tasks |",
                  "|" + "---|" * 7]
        for g in report.groups:
            lines.append(f"| {SERIES[g.method]} | {g.suite} | {g.budget} | {g.accuracy:.3f} | {g.throughput:.2f} | "
                         f"{g.visual_tokens:.1f} | {g.tasks} |")
    m = report.meta
    lines += ["", f"lmms-eval {m['lmms_eval']}, torch {m['torch']}, transformers {m['transformers']}, "
                  f"commit {m['git_commit'] or 'unknown'}; model {m['model']}, adapters {m['adapters']} "
                  f"({m['family']}); limit {m['limit']}, batch size {m['batch_size']}. Group accuracy is the "
                  "unweighted task mean; group throughput sum N / sum (N / samples per second)."]
    return "\n".join(lines) + "\n"


def write_report(report: EvalReport, out) -> list[Path]:
    """`out/eval.json`, `out/eval.md` and per suite `out/pareto_<suite>_tokens.png` and `_throughput.png`
    (accuracy against visual tokens and against throughput, one point per budget)."""
    from qzoom_adapters.benchmarks.plots import line_plot

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "eval.json", out / "eval.md"]
    written[0].write_text(json.dumps({"meta": report.meta, "rows": [asdict(r) for r in report.rows],
                                      "groups": [asdict(g) for g in report.groups]}, indent=1) + "\n")
    written[1].write_text(markdown_table(report))
    for suite in sorted({g.suite for g in report.groups}):
        points = [g for g in report.groups if g.suite == suite]
        title = SUITES[suite].title if suite in SUITES else suite
        for axis, label in (("visual_tokens", "mean visual tokens (log scale)"),
                            ("throughput", "throughput, samples/s (log scale)")):
            series = {SERIES[m]: [(getattr(g, axis), g.accuracy, str(g.budget)) for g in points if g.method == m]
                      for m in METHODS if any(g.method == m for g in points)}
            path = out / f"pareto_{suite}_{'tokens' if axis == 'visual_tokens' else axis}.png"
            line_plot(series, f"{title}: group accuracy over budgets", x_label=label).save(path)
            written.append(path)
    return written
