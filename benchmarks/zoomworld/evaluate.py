"""Baseline accuracy of a ZoomWorld model at visual-token budgets (plain HF `generate`, greedy).

    python -m qzoom_adapters.benchmarks.zoomworld.evaluate --model DIR [--n 200] [--budgets 64,256,1024]
"""
from __future__ import annotations

import argparse
import json

from .generator import split
from .model import BUDGETS


def main(argv=None) -> int:
    from qzoom_adapters.recipes.models import load_backbone

    from .bench import run_baseline

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--split", default="val")
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    args = p.parse_args(argv)
    model, processor, spec = load_backbone(args.model)
    samples = split(args.split, args.n)
    out = {b: run_baseline(model, processor, spec, samples, int(b), 16, model.device)[0]["accuracy"]
           for b in args.budgets.split(",")}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
