"""The `BackboneSpec` protocol: everything the core needs from a model family, and the registry."""
from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from .errors import QZoomError

ENTRY_POINT_GROUP = "qzoom_adapters.backbones"


@runtime_checkable
class BackboneSpec(Protocol):
    """What the core asks of a backbone family. One instance wraps one loaded model.

    A family implements this in one file under `backbones/` (see CONTRIBUTING.md) and
    registers it with `register_backbone`. Tensors follow HF layouts: hidden states
    (B, S, D), attention q/k (B, heads, S, head_dim), position ids (axes, B, S).
    """

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # HF `config.model_type` values this spec handles
    rope_axes: ClassVar[int]  # 3 for M-RoPE, 1 for plain RoPE

    model: nn.Module

    # --- structure -------------------------------------------------------------------
    @property
    def text_model(self) -> nn.Module: ...  # embeddings -> layers -> norm, HF forward
    @property
    def layers(self) -> nn.ModuleList: ...
    @property
    def norm(self) -> nn.Module: ...
    @property
    def lm_head(self) -> nn.Module: ...
    @property
    def embed_tokens(self) -> nn.Module: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def image_token_id(self) -> int: ...
    @property
    def vision_start_id(self) -> int: ...
    @property
    def vision_end_id(self) -> int: ...

    # --- inputs ----------------------------------------------------------------------
    def validate_inputs(self, inputs: dict) -> None: ...
    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]: ...
    def token_grid(self, grid_thw_row: torch.Tensor) -> tuple[int, int]: ...
    def position_ids(self, input_ids, attention_mask, grid_thw) -> torch.Tensor: ...
    def global_budget(self, image_processor) -> tuple[int, int]: ...
    def process_crops(self, image_processor, crops: list, min_pixels: int, max_pixels: int) -> dict: ...
    def chat_inputs(self, processor, images: list, questions: list[str]) -> dict: ...

    # --- layers ----------------------------------------------------------------------
    def call_layer(self, layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor: ...
    def query_key(self, layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]: ...
    def sink_mask(self, h_t: int, w_t: int, **ctx: Any) -> torch.Tensor: ...

    # --- reference checkpoints ---------------------------------------------------------
    def reference_prefixes(self) -> tuple[str, ...]: ...


_REGISTRY: dict[str, type] = {}
_entry_points_loaded = False


def register_backbone(spec_cls: type) -> type:
    """Register a spec class (usable as a decorator). Later registrations of a family win."""
    for attr in ("family", "model_types"):
        if not getattr(spec_cls, attr, None):
            raise QZoomError(f"{spec_cls.__name__} must define class attribute `{attr}` to be registered")
    _REGISTRY[spec_cls.family] = spec_cls
    return spec_cls


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        register_backbone(ep.load())


def registered_families() -> dict[str, type]:
    _ensure_builtin()
    _load_entry_points()
    return dict(_REGISTRY)


def spec_class_for(model_type: str) -> type:
    for cls in registered_families().values():
        if model_type in cls.model_types:
            return cls
    known = {f: c.model_types for f, c in _REGISTRY.items()}
    raise QZoomError(
        f"no BackboneSpec is registered for model_type={model_type!r}; known families: {known}. "
        "Write a spec (see CONTRIBUTING.md) and register it with qz.register_backbone or the "
        f"'{ENTRY_POINT_GROUP}' entry point."
    )


def get_spec(model: nn.Module, **kwargs) -> BackboneSpec:
    """The registered spec for this HF model, wrapping it."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise QZoomError(f"{type(model).__name__} has no `config.model_type`; pass a Hugging Face model")
    return spec_class_for(model_type)(model, **kwargs)


def _ensure_builtin() -> None:
    import backbones  # noqa: F401  (registers the built-in families)
