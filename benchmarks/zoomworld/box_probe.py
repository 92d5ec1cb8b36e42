"""Would a sub-cell box help? SPEC §2's box against boxes cut from the twig's blurred map upsampled to pixels.

    python -m qzoom_adapters.benchmarks.zoomworld.box_probe [--n-val 96] [--budgets 64,128] [--fractions 0.3,0.5,0.7]
        [--out FILE]

At 64-128 visual tokens one grid cell is larger than a ZoomWorld plate, so SPEC §2's box (threshold the blurred
map, bound the cells, back to pixels) cannot be tight. This probe takes the same blurred map, upsamples it
bilinearly to the source image's pixels, keeps the pixels at or above `fraction` x its peak, and bounds them;
then answers each detail question with that box as the crop (`boxes=`, the zoom forced), beside the SPEC box.
Validation questions only (the ones the thresholds are chosen on). Prints one JSON row per budget; writes a
file only with `--out`.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from .bench import FACTOR, MAX_NEW_TOKENS, view_inputs
from .chain import validation_samples
from .scoring import area_ratio, coverage, iou
from .shipped import DEFAULT_DIR, load_default


def peak_box(blurred: torch.Tensor, image_size, fraction: float) -> tuple[int, int, int, int]:
    """The pixel box of the upsampled map's pixels at or above `fraction` x its peak (fraction 0: the image)."""
    W, H = image_size
    up = F.interpolate(blurred.float()[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]
    ys, xs = torch.nonzero(up >= fraction * up.max(), as_tuple=True)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _row(samples, boxes, texts) -> dict:
    n = len(samples)
    areas = sorted(area_ratio(b, s.box) or 0.0 for b, s in zip(boxes, samples))
    return {"box_iou_mean": sum(iou(b, s.box) for b, s in zip(boxes, samples)) / n,
            "box_area_median": areas[n // 2],
            "box_hit_rate": sum(coverage(b, s.box) >= 0.5 for b, s in zip(boxes, samples)) / n,
            "detail_accuracy": sum((t or "").strip().upper() == s.answer.strip().upper()
                                   for t, s in zip(texts, samples)) / n}


def _answers(zoom, spec, processor, samples, budget, batch_size, boxes=None):
    outs = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        outs += zoom.generate_from_inputs(view_inputs(spec, processor, chunk, budget, zoom.model.device),
                                          [s.image for s in chunk], max_new_tokens=MAX_NEW_TOKENS,
                                          return_trace=boxes is None,
                                          boxes=None if boxes is None else boxes[i:i + batch_size])
    return outs


@torch.no_grad()
def probe(folder=DEFAULT_DIR, n_val: int = 96, budgets=(64, 128), fractions=(0.3, 0.5, 0.7),
          batch_size: int = 16) -> dict:
    zoom, spec, processor = load_default(folder)
    samples = [s for s in validation_samples(n_val) if s.family == "detail"]
    out = {"n_detail": len(samples), "split": "validation", "budgets": {}}
    for budget in budgets:
        px = budget * FACTOR**2
        z = zoom.with_config(crop_min_pixels=px, crop_max_pixels=px, gate_threshold=0.0)  # the zoom forced
        outs = _answers(z, spec, processor, samples, budget, batch_size)
        if any(o.trace["blurred_map"] is None for o in outs):
            raise SystemExit("a sample got no twig map; the probe needs a twig on every detail question")
        rows = {"spec": _row(samples, [o.bbox for o in outs], [o.text for o in outs])}
        for f in fractions:
            boxes = [peak_box(o.trace["blurred_map"], s.image.size, f) for o, s in zip(outs, samples)]
            texts = [o.text for o in _answers(z, spec, processor, samples, budget, batch_size, boxes)]
            rows[f"peak_{f:g}"] = _row(samples, boxes, texts)
        out["budgets"][budget] = rows
        print(json.dumps({budget: rows}), flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_DIR), help="a ZoomWorld default folder")
    p.add_argument("--n-val", type=int, default=96, help="validation questions (half of them detail)")
    p.add_argument("--budgets", default="64,128")
    p.add_argument("--fractions", default="0.3,0.5,0.7", help="of the upsampled map's peak")
    p.add_argument("--out", help="write the report here (default: print only)")
    args = p.parse_args(argv)
    fractions = [float(f) for f in args.fractions.split(",")]
    if any(not 0 <= f <= 1 for f in fractions):
        p.error(f"--fractions must lie in [0, 1], got {args.fractions}")
    report = probe(args.model, args.n_val, [int(b) for b in args.budgets.split(",")], fractions)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
