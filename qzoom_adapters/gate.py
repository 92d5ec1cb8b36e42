"""DynamicGate (SPEC §1.2): decides per question whether to zoom."""
from __future__ import annotations

import torch
from torch import nn

from .branch import Branch
from .spec import get_spec


class DynamicGate(Branch):
    """T layers copied from the trunk + `head = Linear(hidden, 1)` on the last prompt token."""

    def __init__(self, layers: nn.ModuleList, K: int, family: str, hidden_size: int):
        super().__init__(layers, K, family)
        ref = next(layers.parameters())
        self.head = nn.Linear(hidden_size, 1, bias=True, device=ref.device, dtype=ref.dtype)

    @classmethod
    def from_backbone(cls, model: nn.Module, K: int, T: int = 3):
        """Gate layers copied from `layers[K:K+T]` **[fix]** (the reference skips this copy) + a fresh head."""
        return super().from_backbone(model, K, T, hidden_size=get_spec(model).hidden_size)

    def logits(self, spec, hidden: torch.Tensor, kwargs: dict, trunk) -> torch.Tensor:
        """(B,) gate logits; `z` is the last gate layer's output at the last token, without final norm.

        Only that row of the last gate layer is computed (`Branch.last_row`); the result is the same.
        """
        z = self.last_row(spec, hidden, kwargs, trunk)
        return self.head(z).float().squeeze(-1)
