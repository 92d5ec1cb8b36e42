"""Baseline accuracy of a ZoomWorld model at visual-token budgets (plain HF `generate`, greedy).

    python -m benchmarks.zoomworld.evaluate --model DIR [--n 200] [--budgets 64,256,1024]
"""
from __future__ import annotations

import argparse
import json

import torch

from .generator import split
from .model import BUDGETS, FACTOR
from .scoring import score


@torch.no_grad()
def baseline(model, processor, spec, samples, budget: int, batch_size: int = 16, max_new_tokens: int = 8) -> dict:
    preds = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        inputs = spec.chat_inputs(processor, [s.image for s in chunk], [s.question for s in chunk],
                                  pixels=budget * FACTOR**2)
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        S = inputs["input_ids"].shape[1]
        seq = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
        preds += [{"answer": t} for t in processor.tokenizer.batch_decode(seq[:, S:], skip_special_tokens=True)]
    return score(samples, preds)


def main(argv=None) -> int:
    from recipes.models import load_backbone

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--split", default="val")
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    args = p.parse_args(argv)
    model, processor, spec = load_backbone(args.model)
    samples = split(args.split, args.n)
    out = {b: baseline(model, processor, spec, samples, int(b))["accuracy"] for b in args.budgets.split(",")}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
