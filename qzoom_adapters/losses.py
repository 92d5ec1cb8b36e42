"""Stage-1 twig loss (SPEC §4.2): BCE-with-logits over the labelled cells only."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import QZoomError


def selective_bce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: float = -100) -> torch.Tensor:
    """Mean BCE-with-logits over every cell of the batch whose label != ignore_index, in float32.

    A batch with no valid cell gives a zero that stays in the autograd graph (zero grads, never NaN).
    """
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise QZoomError("selective_bce needs torch.Tensor logits and labels")
    if logits.shape != labels.shape:
        raise QZoomError(f"logits shape {tuple(logits.shape)} does not match labels shape {tuple(labels.shape)}")
    x = logits.float()
    y = labels.to(device=x.device, dtype=torch.float32)
    valid = y != ignore_index
    # Ignored cells are zeroed with `where` (not multiplied by 0) so their values cannot turn the sum into NaN,
    # and the sum over valid cells divided by their count is the mean; an empty batch divides 0 by 1.
    per_cell = F.binary_cross_entropy_with_logits(x, torch.where(valid, y, 0.0), reduction="none")
    return torch.where(valid, per_cell, 0.0).sum() / valid.sum().clamp(min=1)


__all__ = ["selective_bce"]
