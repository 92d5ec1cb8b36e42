"""A branch: T decoder layers copied from the trunk at layer K (shared by TwigRPN and DynamicGate)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from qzoom_adapters import compat as _compat

from .errors import QZoomError
from .spec import get_spec


def check_branch_point(num_layers: int, K: int, T: int, min_K: int = 1) -> None:
    if K < 1 or T < 1:
        raise QZoomError(f"K and T must be >= 1 (got K={K}, T={T})")
    if K < min_K:
        raise QZoomError(f"this backbone still changes image tokens before layer {min_K} (e.g. deepstack); "
                         f"branch at K >= {min_K} (got K={K})")
    if K + T > num_layers:
        raise QZoomError(
            f"a branch at K={K} with T={T} layers needs K+T <= {num_layers} (the model has {num_layers} "
            "decoder layers); choose a smaller K or T"
        )


def _without_hooks(module: nn.Module) -> nn.Module:
    """Drop hooks a deep copy took over from the trunk's layers (e.g. a user's own hooks): they belong there."""
    for m in module.modules():
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
            hooks = getattr(m, name, None)
            if hooks is not None:
                hooks.clear()
    return module


class Branch(nn.Module):
    """T decoder layers of the backbone's own class, initialised from `layers[K:K+T]`."""

    def __init__(self, layers: nn.ModuleList, K: int, family: str):
        super().__init__()
        self.layers = layers
        self.K = K
        self.T = len(layers)
        self.family = family

    @classmethod
    def from_backbone(cls, model: nn.Module, K: int, T: int = 3, **kwargs):
        """Copy `layers[K:K+T]` of `model` (separate parameters, same class, dtype and device)."""
        spec = get_spec(model)
        check_branch_point(len(spec.layers), K, T, spec.min_branch_layer)
        layers = nn.ModuleList(_without_hooks(copy.deepcopy(spec.layers[K + i])) for i in range(T))
        for p in layers.parameters():
            p.requires_grad_(True)
        return cls(layers, K, spec.family, **kwargs)

    def check_backbone(self, spec) -> None:
        if spec.family != self.family:
            raise QZoomError(
                f"{type(self).__name__} was built for backbone family {self.family!r} but the model is "
                f"{spec.family!r}; load adapters into a model of the family they were trained on"
            )
        check_branch_point(len(spec.layers), self.K, self.T, spec.min_branch_layer)

    def run_body(self, hidden: torch.Tensor, kwargs: dict, trunk, n: int) -> torch.Tensor:
        """Run the first `n` branch layers in full (no cache)."""
        return trunk.run_layers(self.layers[:n], hidden, kwargs)

    def last_row(self, spec, hidden: torch.Tensor, kwargs: dict, trunk) -> torch.Tensor:
        """(B, D) output of the last branch layer at the last position, computing only that row (SPEC §1.2).

        The layers before the last run in full; the last layer gets the keys/values of the earlier rows
        in a cache (projected by `spec.key_value`) and runs its own forward on the last row alone.
        """
        h = self.run_body(hidden, kwargs, trunk, self.T - 1)
        layer = self.layers[-1]
        k, v = spec.key_value(layer, h[:, :-1], _compat.query_rows_kwargs(kwargs, slice(None, -1)))
        row_kwargs = _compat.with_cache(_compat.query_rows_kwargs(kwargs, slice(-1, None)), _PrefixKV(k, v))
        return spec.call_layer(layer, h[:, -1:], row_kwargs)[:, -1]


class _PrefixKV:
    """Duck-typed HF cache holding one layer's keys/values of earlier rows; `update` appends the new rows."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=2), torch.cat([self.values, value_states], dim=2)
