"""Two diagnostic probes of a ZoomWorld default, for the README's "what it shows":

* **crop reading:** the plain model on crops around the asked plate (1.3-5x its size, as in training), so
  reading is measured apart from finding the plate;
* **oracle twig:** Q-Zoom with the twig's box replaced by the true plate's box (the spec's sink mask keeps
  only the cells that touch it; `roi_threshold` 0), so the crop pass is measured apart from the twig.

    python -m benchmarks.zoomworld.probes [--model DEFAULT_DIR] [--n 32] [--budgets 64,128]

Validation split, detail questions, batch size 1 for the oracle (the mask is per sample).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random

import torch

from benchmarks.forced_box import with_sink_mask

from .generator import VAL_SEED, make_sample
from .model import FACTOR
from .scoring import exact_match


def box_cells(box, size, h_t: int, w_t: int) -> torch.Tensor:
    """(h_t, w_t) 0/1 mask of the grid cells that touch the pixel `box` of an image of `size` (W, H)."""
    (x1, y1, x2, y2), (W, H) = box, size
    keep = torch.zeros(h_t, w_t)
    keep[y1 * h_t // H: -(-y2 * h_t // H), x1 * w_t // W: -(-x2 * w_t // W)] = 1
    return keep


def oracle_spec(spec, target: dict):
    """The backbone's spec whose sink mask keeps only `target["box"]` of an image of `target["size"]`."""
    return with_sink_mask(spec, lambda h_t, w_t: box_cells(target["box"], target["size"], h_t, w_t), "Oracle")


@torch.no_grad()
def probe(model_dir=None, n: int = 32, budgets=(64, 128)) -> dict:
    from .bench import run_baseline, view_inputs
    from .shipped import DEFAULT_DIR, load_default
    from .train import crop_view

    zoom, spec, processor = load_default(model_dir or DEFAULT_DIR)
    samples = [make_sample(VAL_SEED + i, "detail") for i in range(n)]
    crops = [dataclasses.replace(s, image=crop_view(s.image, s.box, random.Random(i))[0]) for i, s in enumerate(samples)]
    target = {}
    zoom.spec = oracle_spec(zoom.spec, target)
    out = {"n": n, "crop_reading": {}, "oracle_twig": {}}
    for b in budgets:
        out["crop_reading"][b] = run_baseline(zoom.model, processor, spec, crops, b, 16, zoom.model.device)[0]["accuracy"]["all"]
        zoom.config = zoom.config.model_copy(update={"gate_threshold": 0.0, "roi_threshold": 0.0,
                                                     "crop_min_pixels": b * FACTOR**2, "crop_max_pixels": b * FACTOR**2})
        right = []
        for s in samples:
            target.update(box=s.box, size=s.image.size)
            o = zoom.generate_from_inputs(view_inputs(spec, processor, [s], b, zoom.model.device), [s.image],
                                          max_new_tokens=5)[0]
            right.append(o.zoomed and exact_match(o.text, s.answer))
        out["oracle_twig"][b] = sum(right) / n
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--budgets", default="64,128")
    args = p.parse_args(argv)
    print(json.dumps(probe(args.model, args.n, tuple(int(b) for b in args.budgets.split(","))), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
