"""The `qzoom` command line."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import eval_command
from .infer_command import infer


def _demo(args) -> int:
    from qzoom_adapters.benchmarks.zoomworld.shipped import DEFAULT_DIR, demo_samples, load_default, run_demo
    from qzoom_adapters.errors import QZoomError

    if args.samples < 1 or args.budget < 1:
        raise QZoomError(f"--samples and --budget must be at least 1, got {args.samples} and {args.budget}")
    out, files = _demo_out(Path(args.out), args.samples, args.overwrite)
    path = Path(args.model or DEFAULT_DIR)
    t0 = time.perf_counter()
    zoom, spec, processor = load_default(path)
    print(f"qzoom demo: ZoomWorld default from {path} (loaded in {time.perf_counter() - t0:.1f}s), "
          f"{args.samples} test-split questions at {args.budget} visual tokens")
    run_demo(zoom, spec, processor, demo_samples(args.samples, start=args.seed), args.budget, out,
             max_new_tokens=args.max_new_tokens)
    _mark_demo_out(out, files)
    return 0


_DEMO_MARKER = ".qzoom-demo.json"  # the files a demo wrote into its --out folder (it may write over those)


def _demo_out(out: Path, samples: int, overwrite: bool) -> tuple[Path, list[str]]:
    """Check `qzoom demo --out` before loading anything: a folder, and no file the demo would write over that is
    not an earlier demo's output (unless --overwrite). Returns the folder and the names the demo writes."""
    import json

    from qzoom_adapters.errors import QZoomError

    if out.exists() and not out.is_dir():
        raise QZoomError(f"--out {out} is a file; the demo writes a folder (sample_*.png, summary.json): give a "
                         "folder path")
    files = [f"sample_{i}.png" for i in range(samples)] + ["summary.json"]
    ours: set = set()
    try:
        ours = set(json.loads((out / _DEMO_MARKER).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    clash = [f for f in files if (out / f).exists() and f not in ours]
    if clash and not overwrite:
        raise QZoomError(f"{out} already holds {', '.join(clash[:3])}{' ...' if len(clash) > 3 else ''}, not "
                         "written by a demo; choose another --out or pass --overwrite")
    return out, files


def _mark_demo_out(out: Path, files: list[str]) -> None:
    import json

    marker = out / _DEMO_MARKER
    try:
        known = set(json.loads(marker.read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        known = set()
    marker.write_text(json.dumps({"files": sorted(known | set(files))}) + "\n")


def _where(out: Path, explicit: bool, results: Path) -> str:
    """Where a bench wrote, and, without --out, how to update the committed results instead."""
    if explicit:
        return str(out)
    return (f"{out} (no --out given: benchmarks/results/ is left alone; "
            f"--out {results.relative_to(results.parents[2])} updates the committed results)")


def _bench_zoomworld(args) -> int:
    from qzoom_adapters.benchmarks.zoomworld.bench import RESULTS_OUT, bench, default_out, markdown_table

    out = Path(args.out) if args.out else default_out()
    report = bench(args.model, args.n, args.batch_size, out, args.device, args.quick)
    print(markdown_table(report))
    print(f"report -> {_where(out, bool(args.out), RESULTS_OUT)} (+ {out.with_suffix('.md').name}, "
          f"{out.with_suffix('.png').name})")
    return 0


def _ints(text: str | None):
    return tuple(int(x) for x in text.split(",")) if text else None


def _bench_speed(args) -> int:
    from qzoom_adapters.benchmarks.speed import RESULTS_OUT, bench, default_out, markdown_table

    out = Path(args.out) if args.out else default_out()
    report = bench(out, args.quick, args.device, args.backbones.split(",") if args.backbones else None,
                   _ints(args.budgets), _ints(args.batch_sizes), _ints(args.new_tokens), args.repeats,
                   args.max_seconds, args.append)
    print(markdown_table(report))
    print(f"report -> {_where(out, bool(args.out), RESULTS_OUT)} (+ {out.with_suffix('.md').name} and a latency "
          "plot per backbone)")
    return 0


def _config(args):
    from .config import load_config

    return load_config(args.config, args.set or [])


def _report(result: dict) -> int:
    import json

    print(json.dumps(result, indent=1, default=str))
    return 0


def _tiny(args) -> int:
    from .tiny import write_tiny_setup

    out = write_tiny_setup(args.out, args.family, args.samples, args.seed, overwrite=args.overwrite)
    print(f"tiny {args.family} setup in {out}/: model/, images/, records.jsonl, recipe.yaml")
    print(f"next: qzoom labels stage1 --config {out}/recipe.yaml")
    return 0


_RECIPES = {"stage1": "Stage1Recipe", "stage2": "Stage2Recipe", "stage3": "Stage3Recipe"}


def _recipe(args, stage: str):
    from . import recipe

    return getattr(recipe, _RECIPES[stage])(_config(args))


def _labels(args) -> int:
    return _report(_recipe(args, args.stage).label())


def _mine(args) -> int:
    return _report(_recipe(args, "stage2").mine())


def _train(args) -> int:
    return _report(_recipe(args, args.stage).train(stop_after=args.stop_after))


def _heads(args) -> int:
    from .heads import rank_heads, write_report

    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    report = rank_heads(_config(args), layers=layers, limit=args.limit, top=args.top)
    write_report(report, args.out)
    for mode, r in report.items():
        print(f"{mode}: pairs {r['suggested_pairs']}  sink pairs {r['suggested_sink_pairs']}")
    print(f"full ranking -> {args.out}")
    return 0


_RECIPE_HELP = """Relative paths in the YAML file are relative to its folder. --set overrides any field,
e.g. --set stage1.train.max_steps=100 --set model.dtype=bfloat16 (values are YAML)."""


def _recipe_args(p, example: str) -> None:
    p.description = f"{p.description}\n\nExample (tiny, CPU; first `qzoom tiny --out tiny`):\n  {example}\n\n{_RECIPE_HELP}"
    p.add_argument("--config", required=True, help="recipe YAML (see recipes/configs/)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qzoom", description="Q-Zoom adapters for Hugging Face MLLMs")
    sub = p.add_subparsers(dest="command", required=True, help="run `qzoom COMMAND --help` for its options")
    d = sub.add_parser("demo", help="answer ZoomWorld test questions with the shipped default (CPU, no download)",
                       description="Example: qzoom demo --out qzoom-demo")
    d.add_argument("--model", help="a ZoomWorld default folder: model/ + adapters (default: the shipped "
                                   "benchmarks/zoomworld/default)")
    d.add_argument("--samples", type=int, default=6, help="questions, alternating detail and global")
    d.add_argument("--budget", type=int, default=64, help="visual tokens for the global view and for the crop")
    d.add_argument("--out", default="qzoom-demo", help="folder for the per-sample PNGs and summary.json")
    d.add_argument("--seed", type=int, default=0, help="first test-split scene (TEST_SEED + seed)")
    d.add_argument("--max-new-tokens", type=int, default=8, help="longest answer, in tokens")
    d.add_argument("--overwrite", action="store_true",
                   help="write over sample_*.png / summary.json in --out that an earlier demo did not write")
    d.set_defaults(func=_demo)
    i = sub.add_parser("infer", help="answer one question about one image",
                       description="Example: qzoom infer --adapters ADAPTERS --model MODEL --image img.png "
                                   "--question 'What is written on the red plate?' --heatmap heat.png")
    i.add_argument("--adapters", help="folder written by QZoom.save_pretrained")
    i.add_argument("--model", help="HF model folder the adapters belong to")
    i.add_argument("--reference", help="a released Q-Zoom checkpoint folder (instead of --model/--adapters)")
    i.add_argument("--processor", help="processor folder (default: the model folder)")
    i.add_argument("--image", required=True, help="the image file (PNG, JPEG, ...)")
    i.add_argument("--question", required=True, help="the question about the image")
    i.add_argument("--heatmap", help="write the image with heatmap and box to this PNG (its folder must exist)")
    i.add_argument("--overwrite", action="store_true", help="let --heatmap replace an existing file (never the "
                                                             "input image)")
    i.add_argument("--gate-threshold", type=float, help="zoom when the gate's probability is at least this "
                                                         "(default: the adapters' saved value)")
    i.add_argument("--roi-threshold", type=float, help="heatmap level that bounds the crop box (default: the "
                                                        "adapters' saved value)")
    i.add_argument("--roi-region", choices=["union", "largest"],
                   help="cells the box is drawn around: all above the threshold, or only their largest connected "
                        "component (default: the adapters' saved value)")
    i.add_argument("--roi-refine", type=int, help="sub-cell box: upsample the heatmap this many times before the "
                                                  "box is drawn; 1 = SPEC (default: the adapters' saved value)")
    i.add_argument("--position-mode", choices=["aligned", "sequential"],
                   help="positions of the crop's tokens (default: the adapters' saved value, else the backbone's)")
    i.add_argument("--budget", type=int, help="visual tokens of the global view, and of the crop (min = max pixels "
                                              "for that many tokens; default: the processor's own setting)")
    i.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda if available, else cpu)")
    i.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on the CPU), checkpoint (the "
                                                   "checkpoint's own dtype, e.g. bf16 for the released Q-Zoom models), "
                                                   "float32, bfloat16 or float16")
    i.add_argument("--max-new-tokens", type=int, default=32, help="longest answer, in tokens")
    i.set_defaults(func=infer)

    t = sub.add_parser("tiny", help="write a tiny random model, synthetic records and a recipe to try the recipes on",
                       description="Example: qzoom tiny --out tiny", formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--out", required=True, help="a new or empty folder for model/, images/, records.jsonl and "
                                                 "recipe.yaml")
    t.add_argument("--family", default="qwen2_5_vl", help="qwen2_5_vl | qwen2_vl | qwen3_vl | llava")
    t.add_argument("--samples", type=int, default=8, help="synthetic records (images with questions) to write")
    t.add_argument("--seed", type=int, default=0, help="seed of the random model and the synthetic scenes")
    t.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out, replacing its model/, images/, records.jsonl and recipe.yaml")
    t.set_defaults(func=_tiny)

    lab = sub.add_parser("labels", help="build training data: stage-1 attention labels or stage-3 budget answers")
    lab_sub = lab.add_subparsers(dest="stage", required=True, help="which labels")
    for stage, desc in (("stage1", "Stage-1 pseudo-labels: teacher responses at the fixed grid and their attention "
                                   "at the configured (layer, head) pairs (SPEC 4.1); sharded, resumable."),
                        ("stage3", "Stage-3 answers: greedy answers at each visual-token budget (SPEC 4.4); "
                                   "resumable.")):
        sp = lab_sub.add_parser(stage, help=desc, description=desc)
        _recipe_args(sp, f"qzoom labels {stage} --config tiny/recipe.yaml")
        sp.set_defaults(func=_labels)

    m = sub.add_parser("mine", help="stage-2 mining: direct vs always-zoomed answers, judged; keeps regressions",
                       description="Stage-2 mining (SPEC 4.3): the base model's direct answer (A) and the stage-1 "
                                   "model's always-zoomed answer (B), judged; keeps A-right/B-wrong samples.")
    _recipe_args(m, "qzoom mine --config tiny/recipe.yaml")
    m.set_defaults(func=_mine)

    tr = sub.add_parser("train", help="train a stage: stage1 (twig), stage2 (post-SFT), stage3 (gate)")
    tr_sub = tr.add_subparsers(dest="stage", required=True, help="which stage")
    for stage, desc in (("stage1", "Train the twig on stage-1 labels; only layers < K and the twig run."),
                        ("stage2", "Post-SFT of the LLM (or LoRA) on global + RoI sequences; loss on answers."),
                        ("stage3", "Train the gate on consistency-aware labels; only layers < K and the gate run.")):
        sp = tr_sub.add_parser(stage, help=desc, description=desc + " Runs on accelerate: `accelerate launch -m "
                               "qzoom_adapters.recipes.cli train ...` for several GPUs. A killed run resumes from its last "
                               "checkpoint when started again.")
        _recipe_args(sp, f"qzoom train {stage} --config tiny/recipe.yaml")
        sp.add_argument("--stop-after", type=int, help="stop after this optimizer step (checkpointed; resumable)")
        sp.set_defaults(func=_train)

    h = sub.add_parser("heads", help="rank (layer, head) pairs for stage-1 labels on records with boxes",
                       description="Choose stage-1 heads for a new backbone (see recipes/heads.py): score every "
                                   "head of the candidate layers against ground-truth boxes.")
    _recipe_args(h, "qzoom heads --config tiny/recipe.yaml --out tiny/heads.json")
    h.add_argument("--out", required=True, help="JSON ranking")
    h.add_argument("--layers", help="comma-separated candidate layers (default: all)")
    h.add_argument("--limit", type=int, help="use at most this many records")
    h.add_argument("--top", type=int, default=4, help="grounding heads to suggest")
    h.set_defaults(func=_heads)

    bench = sub.add_parser("bench", help="benchmarks: `qzoom bench zoomworld`, `qzoom bench speed`")
    bench_sub = bench.add_subparsers(dest="bench", required=True, help="which benchmark")
    bz = bench_sub.add_parser("zoomworld", help="accuracy, visual tokens and latency on ZoomWorld: plain vs Q-Zoom",
                              description="Baseline at 64-1024 visual tokens and Q-Zoom at 64-256 on the ZoomWorld "
                                          "test split; writes a JSON report, a Markdown table and a Pareto plot. "
                                          "Example: qzoom bench zoomworld --n 300")
    bz.add_argument("--model", help="default folder (default: the shipped benchmarks/zoomworld/default)")
    bz.add_argument("--n", type=int, help="test samples (default 300; 8 with --quick)")
    bz.add_argument("--batch-size", type=int, default=16, help="samples per generate call")
    bz.add_argument("--out", help="JSON report, with its .md and .png beside it (default: "
                                  "./qzoom-bench/zoomworld_bench.json in the current directory; pass "
                                  "benchmarks/results/zoomworld_bench.json to update the committed results)")
    bz.add_argument("--device", help="default: cuda if available, else cpu")
    bz.add_argument("--quick", action="store_true", help="smoke run: n=8, baseline at 64 and 256, Q-Zoom at 64")
    bz.set_defaults(func=_bench_zoomworld)
    bs = bench_sub.add_parser("speed", help="wall-clock at real model shapes: plain backbone vs the Q-Zoom pipeline",
                              description="Random-weight Qwen2.5-VL-7B and Qwen3-VL-4B (public configs) at visual-token "
                                          "budgets 256-4096, batch sizes 1-16, 16 and 64 new tokens: plain HF generate "
                                          "vs the pipeline not zoomed / zoomed / 50% zoomed, per-stage times and the "
                                          "prefill and decode floors measured in the same run. Writes JSON, Markdown "
                                          "and plots. Example: qzoom bench speed --backbones qwen2_5_vl_7b "
                                          "--max-seconds 540")
    bs.add_argument("--quick", action="store_true", help="smoke run on a tiny model (CPU is fine)")
    bs.add_argument("--backbones", help="comma-separated: qwen2_5_vl_7b,qwen3_vl_4b (default both)")
    bs.add_argument("--budgets", help="comma-separated visual-token budgets (default 256,576,1024,2048,4096)")
    bs.add_argument("--batch-sizes", help="comma-separated (default 1,4,8,16)")
    bs.add_argument("--new-tokens", help="comma-separated (default 16,64)")
    bs.add_argument("--repeats", type=int, default=3, help="timed runs per measurement after one warm-up")
    bs.add_argument("--max-seconds", type=float, help="per backbone: stop starting new configurations after this "
                                                      "long (the rest are listed as skipped)")
    bs.add_argument("--append", action="store_true", help="keep the other backbones' rows of an existing --out")
    bs.add_argument("--out", help="JSON report, with its .md and plots beside it (default: ./qzoom-bench/speed.json "
                                  "in the current directory; pass benchmarks/results/speed.json to update the "
                                  "committed results)")
    bs.add_argument("--device", help="default: cuda if available, else cpu")
    bs.set_defaults(func=_bench_speed)
    eval_command.add_parser(sub)
    for parser in _parsers(p):
        parser.formatter_class = _Help
    return p


class _Help(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option's help ends with its default where it has one that its help
    does not already name."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.option_strings and action.default is not None and action.default is not False
                and action.default != argparse.SUPPRESS and "default" not in text):
            text += " (default: %(default)s)"
        return text


def _parsers(parser: argparse.ArgumentParser):
    """`parser` and every subcommand's parser under it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                yield from _parsers(child)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from qzoom_adapters.errors import QZoomError

    try:
        return args.func(args)
    except QZoomError as err:
        print(f"qzoom {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
