"""What the pipeline returns per sample."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ZoomOutput:
    """One sample's answer and how it was reached (see API.md)."""

    tokens: list[int]
    text: str | None = None
    zoomed: bool = False
    gate_prob: float | None = None
    heatmap: torch.Tensor | None = None
    bbox: tuple[int, int, int, int] | None = None
    visual_tokens: int = 0
    direct_tokens: list[int] | None = None
    roi_tokens: list[int] | None = None
    direct_text: str | None = None
    roi_image: int | None = None  # which of the sample's images the heatmap and box refer to (0-based)
    trace: dict | None = field(default=None, repr=False)


@dataclass
class ZoomPlan:
    """`QZoom.plan_from_inputs` for one sample: whether `generate_from_inputs` would zoom, the crop's box
    (x1, y1, x2, y2) in the RoI image's source pixels (None when it would not zoom), the gate probability (None
    without a gate) and the RoI image's index among the sample's images."""

    zoomed: bool
    bbox: tuple | None
    gate_prob: float | None
    roi_image: int = 0
