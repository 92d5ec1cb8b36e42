"""Choose a ZoomWorld default's gate threshold on validation questions (never on test).

    python -m benchmarks.zoomworld.threshold --model DEFAULT_DIR [--n 64] [--budgets 64,128] [--write]

Runs the gate (zoom off) on `n` validation questions, half detail and half global, at each budget, and
finds the highest threshold at which the gate still fires on at least `--fire` of the detail questions at
every budget (the highest such threshold skips the most global questions), then moves it down to the middle
of the gap below it (the same decisions on these questions, with the widest margin). `--write` stores it in
the folder's `adapter_config.json` (only that file is rewritten).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .generator import VAL_SEED, make_sample


@torch.no_grad()
def gate_probs(zoom, spec, processor, samples, budget: int, batch_size: int = 16) -> list[float]:
    """The gate's probability for each sample with the global view at `budget` (nothing is zoomed)."""
    from recipes.data import chunks

    from .bench import view_inputs

    zoom.config = zoom.config.model_copy(update={"gate_threshold": 2.0})
    probs = []
    for chunk in chunks(samples, batch_size):
        outs = zoom.generate_from_inputs(view_inputs(spec, processor, chunk, budget, zoom.model.device),
                                         [s.image for s in chunk], max_new_tokens=1)
        probs += [o.gate_prob for o in outs]
    return probs


def choose(probs: dict, families: list[str], fire: float = 0.9) -> dict:
    """The threshold and the rates it gives per budget: t, the highest detail probability with fire rate >=
    `fire` on detail at every budget, moved down to the middle of t and the highest probability below it."""
    def rates(t):
        out = {}
        for b, p in probs.items():
            det = [x >= t for x, f in zip(p, families) if f == "detail"]
            glob = [x < t for x, f in zip(p, families) if f == "global"]
            out[b] = {"fires_detail": sum(det) / len(det), "skips_global": sum(glob) / len(glob)}
        return out

    candidates = sorted({x for p in probs.values() for x, f in zip(p, families) if f == "detail"}, reverse=True)
    for t in candidates:
        r = rates(t)
        if all(v["fires_detail"] >= fire for v in r.values()):
            below = max((x for p in probs.values() for x in p if x < t), default=0.0)
            return {"threshold": (t + below) / 2, "rates": r}
    raise ValueError("no threshold fires on enough detail questions (is the gate trained?)")


def main(argv=None) -> int:
    from .shipped import load_default

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a default folder (model/ + adapters)")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--budgets", default="64,128")
    p.add_argument("--fire", type=float, default=0.9, help="least share of detail questions the gate must fire on")
    p.add_argument("--write", action="store_true", help="store the threshold in the folder's adapter_config.json")
    args = p.parse_args(argv)
    zoom, spec, processor = load_default(args.model)
    samples = [make_sample(VAL_SEED + i, "detail" if i % 2 == 0 else "global") for i in range(args.n)]
    families = [s.family for s in samples]
    probs = {int(b): gate_probs(zoom, spec, processor, samples, int(b)) for b in args.budgets.split(",")}
    chosen = choose(probs, families, args.fire)
    chosen["threshold"] = round(chosen["threshold"], 4)
    chosen["n"] = args.n
    chosen["probabilities"] = {b: {f: [round(min(x for x, g in zip(p, families) if g == f), 4),
                                       round(max(x for x, g in zip(p, families) if g == f), 4)]
                                   for f in ("detail", "global")} for b, p in probs.items()}
    print(json.dumps(chosen, indent=1))
    if args.write:
        path = Path(args.model) / "adapter_config.json"
        saved = json.loads(path.read_text())
        saved["zoom"]["gate_threshold"] = chosen["threshold"]
        path.write_text(json.dumps(saved, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
