"""The `qzoom eval` command: a thin runner over lmms-eval for the Q-Zoom suites (`benchmarks/lmms/runner.py`).

Arguments are checked, and the datasets looked up in the Hugging Face cache, before lmms-eval or the model loads.
"""
from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = """Accuracy, visual tokens, latency and zoom rate of Q-Zoom (and of the same model with the gate
closed, the baseline) on the Q-Zoom suites through lmms-eval, with the SPEC thresholds as presets, at one or more
max visual-token budgets; writes eval.json, eval.md and Pareto plots per suite.

Suites: doc (TextVQA, ChartQA, DocVQA, InfoVQA, OCRBench at 576 tokens) and hr (V* Bench, HR-Bench 4K/8K,
MME-RealWorld-lite at 4096). The datasets must be in your Hugging Face cache (or pass --allow-download).

Examples:
  qzoom eval --model Qwen/Qwen2.5-VL-7B-Instruct --adapters my-adapters --suite doc
  qzoom eval --model path/to/Q-Zoom-Qwen2.5VL-7B --adapters reference --suite hr --budgets 1024,2048,4096
  qzoom eval --list"""


def add_parser(sub) -> argparse.ArgumentParser:
    """Register `qzoom eval` on the `qzoom` sub-command parsers."""
    e = sub.add_parser("eval", help="accuracy on the Q-Zoom suites through lmms-eval (pip install -e .[eval])",
                       description=DESCRIPTION)
    e.add_argument("--model", help="Hugging Face model folder or hub id (a released Q-Zoom checkpoint with "
                                   "--adapters reference)")
    e.add_argument("--adapters", help="adapter folder written by QZoom.save_pretrained, or 'reference'")
    e.add_argument("--suite", action="append", help="doc, hr or all (repeatable; default: all unless --tasks)")
    e.add_argument("--tasks", help="comma-separated lmms-eval tasks (suite tasks get their presets; others, e.g. a "
                                   "local task from --include-path, the adapters' saved thresholds)")
    e.add_argument("--budgets", help="comma-separated max visual-token budgets (default: each suite's own, 576 or "
                                     "4096; the SPEC sweep is 256,384,576,1024,2048,4096)")
    e.add_argument("--methods", default="qzoom,baseline", help="qzoom, baseline or both")
    e.add_argument("--limit", type=int, help="documents per task (a quick look; not comparable to the full task)")
    e.add_argument("--batch-size", type=int, default=8, help="documents per generate call")
    e.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: auto)")
    e.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on the CPU), checkpoint, float32, "
                                                   "bfloat16 or float16")
    e.add_argument("--gate-threshold", type=float, help="replace the presets' gate threshold")
    e.add_argument("--roi-threshold", type=float, help="replace the presets' RoI threshold")
    e.add_argument("--include-path", help="a folder of extra lmms-eval task YAMLs")
    e.add_argument("--allow-download", action="store_true", help="let lmms-eval download missing datasets")
    e.add_argument("--out", default="qzoom-eval", help="folder for eval.json, eval.md and the plots")
    e.add_argument("--list", action="store_true", help="print the suites, their tasks, datasets and presets, and exit")
    e.set_defaults(func=run_eval_command)
    return e


def _ints(text: str, what: str) -> list[int]:
    from qzoom_adapters.errors import QZoomError

    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise QZoomError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise QZoomError(f"{what} must be positive integers, got {text!r}")
    return values


def _print_presets() -> int:
    from qzoom_adapters.benchmarks.lmms.suites import SUITES

    for suite in SUITES.values():
        print(f"{suite.name}: {suite.title}, max {suite.max_tokens} visual tokens")
        for p in suite.tasks:
            ds = p.dataset + (f" ({p.dataset_name})" if p.dataset_name else "")
            thresholds = "; ".join(f"{fam} roi {p.roi_threshold[fam]} gate {p.gate_threshold[fam]}"
                                   for fam in p.roi_threshold)
            print(f"  {p.task:<18} {p.title:<20} dataset {ds}; metric {p.metric}; min {p.min_tokens} tokens; "
                  f"{thresholds}")
    return 0


def settings_from_args(args):
    """`EvalSettings` from the parsed command line; every mistake is a one-line `QZoomError`."""
    from qzoom_adapters.benchmarks.lmms.model_args import DTYPES
    from qzoom_adapters.benchmarks.lmms.runner import METHODS, EvalSettings
    from qzoom_adapters.benchmarks.lmms.suites import SUITES, preset_for
    from qzoom_adapters.errors import QZoomError

    if not args.model or not args.adapters:
        raise QZoomError("give --model and --adapters (a folder written by QZoom.save_pretrained, or 'reference' "
                         "for a released checkpoint given as --model)")
    suites = [s for item in (args.suite or []) for s in item.split(",") if s]
    bad = [s for s in suites if s not in (*SUITES, "all")]
    if bad:
        raise QZoomError(f"--suite {bad[0]!r} is not one of {', '.join(SUITES)} or all")
    if "all" in suites or (not suites and not args.tasks):
        suites = list(SUITES)
    tasks = [p.task for s in dict.fromkeys(suites) for p in SUITES[s].tasks]
    tasks += [t for t in (args.tasks or "").split(",") if t.strip() and t not in tasks]
    methods = tuple(m for m in args.methods.split(",") if m)
    if not methods or any(m not in METHODS for m in methods):
        raise QZoomError(f"--methods must be among {', '.join(METHODS)}, got {args.methods!r}")
    if args.dtype not in DTYPES:
        raise QZoomError(f"--dtype {args.dtype!r} is not one of {', '.join(DTYPES)}")
    if args.limit is not None and args.limit < 1:
        raise QZoomError(f"--limit must be at least 1, got {args.limit}")
    if args.batch_size < 1:
        raise QZoomError(f"--batch-size must be at least 1, got {args.batch_size}")
    budgets = _ints(args.budgets, "--budgets") if args.budgets else None
    per_task = {}
    for task in tasks:
        found = preset_for(task)
        if budgets is None and found is None:
            raise QZoomError(f"--budgets is needed for {task} (not a Q-Zoom suite task, so it has no default budget)")
        per_task[task] = budgets or [found[0].max_tokens]
    for name, value in (("--gate-threshold", args.gate_threshold), ("--roi-threshold", args.roi_threshold)):
        if value is not None:
            from qzoom_adapters.config import as_zoom_config

            as_zoom_config({name[2:].replace("-", "_"): value})  # one line for a bad value
    if args.include_path and not Path(args.include_path).is_dir():
        raise QZoomError(f"--include-path {args.include_path} is not a folder")
    return EvalSettings(model=args.model, adapters=args.adapters, tasks=tasks, budgets=per_task, methods=methods,
                        limit=args.limit, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                        include_path=args.include_path, gate_threshold=args.gate_threshold,
                        roi_threshold=args.roi_threshold, allow_download=args.allow_download, out=Path(args.out))


def run_eval_command(args) -> int:
    if args.list:
        return _print_presets()
    from qzoom_adapters.benchmarks.lmms.runner import markdown_table, run

    report = run(settings_from_args(args))
    print(markdown_table(report))
    print(f"report -> {Path(args.out) / 'eval.json'} (+ eval.md and the Pareto plots)")
    return 0
