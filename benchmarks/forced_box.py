"""Fix the twig's box from outside, for benchmarks and probes: a subclass of the backbone's spec whose sink
mask (SPEC §2 step 2) keeps only chosen cells. With `roi_threshold` 0 the box is then the union of those
cells whatever the heatmap, while everything else, the twig's computation included, is unchanged."""
from __future__ import annotations

from typing import Callable

import torch


def with_sink_mask(spec, keep: Callable[[int, int], torch.Tensor], name: str):
    """`spec`'s class with `sink_mask(h_t, w_t)` replaced by `keep(h_t, w_t)` (a 0/1 (h_t, w_t) tensor)."""
    def sink_mask(self, h_t: int, w_t: int, **ctx) -> torch.Tensor:
        return keep(h_t, w_t)

    return type(f"{name}{type(spec).__name__}", (type(spec),), {"sink_mask": sink_mask})(spec.model)
