"""Forced boxes for benchmarks and probes. A box is forced through the pipeline's public seam,
`QZoom.generate_from_inputs(..., boxes=[(x1, y1, x2, y2) in source pixels or None per sample])`: the crop is that
box while everything else, the twig's computation included, runs as usual. Nothing here changes a `QZoom`."""
from __future__ import annotations

from typing import Callable

import torch

CENTRED_SIDE = 0.25  # share of each image side the centred box spans (1/16 of the area)


def centred_box(size, side: float = CENTRED_SIDE) -> tuple[int, int, int, int]:
    """A centred (x1, y1, x2, y2) box of an image of `size` (W, H) px, `side` of each side long (at least 1 px)."""
    W, H = size
    w, h = max(1, round(W * side)), max(1, round(H * side))
    x1, y1 = (W - w) // 2, (H - h) // 2
    return x1, y1, x1 + w, y1 + h


def with_sink_mask(spec, keep: Callable[[int, int], torch.Tensor], name: str):
    """`spec`'s class with `sink_mask(h_t, w_t)` replaced by `keep(h_t, w_t)` (a 0/1 (h_t, w_t) tensor).

    Only for looking at a keep-mask (`speed.fixed_box_spec`); to force a box in a run pass `boxes=` to
    `generate_from_inputs` rather than giving a `QZoom` another spec (its trunk and decoder keep their own).
    """
    def sink_mask(self, h_t: int, w_t: int, **ctx) -> torch.Tensor:
        return keep(h_t, w_t)

    return type(f"{name}{type(spec).__name__}", (type(spec),), {"sink_mask": sink_mask})(spec.model)
