"""Choose a ZoomWorld default's gate threshold on validation questions (never on test).

    python -m qzoom_adapters.benchmarks.zoomworld.threshold --model DEFAULT_DIR [--n 96] [--budgets 64,128,256] [--write]

Runs the gate (zoom off) and the plain model on `n` validation questions, half detail and half global, at
each budget, and picks the threshold whose worst rate is best: the largest min over budgets of min(share of
the detail questions *that budget gets wrong* it fires on, share of global questions it skips), the middle
of the widest gap among those tied (the issue's gate targets, measured on validation only).
`--write` stores it in the folder's `adapter_config.json` (only that file is rewritten).
"""
from __future__ import annotations

import argparse
import json

import torch

from .generator import VAL_SEED, make_sample


@torch.no_grad()
def gate_probs(zoom, spec, processor, samples, budget: int, batch_size: int = 16) -> list[float]:
    """The gate's probability for each sample with the global view at `budget` (nothing is zoomed)."""
    from qzoom_adapters.recipes.data import chunks

    from .bench import view_inputs

    # never zoom (one direct token per sample), on a copy: the caller's settings, the threshold to write among them,
    # stay as they are
    direct, probs = zoom.with_config(gate_threshold=2.0), []
    for chunk in chunks(samples, batch_size):
        outs = direct.generate_from_inputs(view_inputs(spec, processor, chunk, budget, zoom.model.device),
                                           [s.image for s in chunk], max_new_tokens=1)
        probs += [o.gate_prob for o in outs]
    return probs


def rates(probs: dict, families: list[str], t: float, need: dict | None = None) -> dict:
    """Per budget: the share of detail questions the gate fires on at threshold `t` (only those `need[b]`
    marks, the ones that budget gets wrong, when given; 1.0 if there is none), and of global ones it skips."""
    out = {}
    for b, p in probs.items():
        mask = need[b] if need is not None else [True] * len(p)
        det = [x >= t for x, f, m in zip(p, families, mask) if f == "detail" and m]
        glob = [x < t for x, f in zip(p, families) if f == "global"]
        out[b] = {"fires_detail": sum(det) / len(det) if det else 1.0, "skips_global": sum(glob) / len(glob),
                  "detail_needing": len(det)}
    return out


def choose(probs: dict, families: list[str], need: dict | None = None) -> dict:
    """The threshold (a midpoint between two neighbouring probabilities) that maximises the worst of the rates
    over budgets; among ties, the middle of the widest gap. Returns it with its rates per budget."""
    xs = sorted({0.0, 1.0, *(x for p in probs.values() for x in p)})
    best = None
    for lo, hi in zip(xs, xs[1:]):
        t = (lo + hi) / 2
        r = rates(probs, families, t, need)
        worst = min(min(v["fires_detail"], v["skips_global"]) for v in r.values())
        key = (worst, hi - lo)
        if best is None or key > best[0]:
            best = (key, t, r)
    return {"threshold": best[1], "worst_rate": best[0][0], "rates": best[2]}


def baseline_wrong(zoom, spec, processor, samples, budget: int, batch_size: int = 16) -> list[bool]:
    """Per sample: the plain model at `budget` answers it wrong (what the gate should fire on)."""
    from .bench import run_baseline

    _, right = run_baseline(zoom.model, processor, spec, samples, budget, batch_size, zoom.model.device)
    return [not r for r in right]


def main(argv=None) -> int:
    from .shipped import load_default

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a default folder (model/ + adapters)")
    p.add_argument("--n", type=int, default=96)
    p.add_argument("--budgets", default="64,128,256", help="the global budgets Q-Zoom is run at")
    p.add_argument("--write", action="store_true", help="store the threshold in the folder's adapter_config.json")
    args = p.parse_args(argv)
    zoom, spec, processor = load_default(args.model)
    samples = [make_sample(VAL_SEED + i, "detail" if i % 2 == 0 else "global") for i in range(args.n)]
    families = [s.family for s in samples]
    budgets = [int(b) for b in args.budgets.split(",")]
    probs = {b: gate_probs(zoom, spec, processor, samples, b) for b in budgets}
    need = {b: baseline_wrong(zoom, spec, processor, samples, b) for b in budgets}
    chosen = choose(probs, families, need)
    chosen["threshold"] = round(chosen["threshold"], 4)
    chosen["n"] = args.n
    chosen["probabilities"] = {b: {f: [round(min(x for x, g in zip(p, families) if g == f), 4),
                                       round(max(x for x, g in zip(p, families) if g == f), 4)]
                                   for f in ("detail", "global")} for b, p in probs.items()}
    print(json.dumps(chosen, indent=1))
    if args.write:
        from .shipped import write_zoom_fields

        write_zoom_fields(args.model, gate_threshold=chosen["threshold"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
