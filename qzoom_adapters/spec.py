"""The `BackboneSpec` protocol: everything the core needs from a model family, and the registry."""
from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from .errors import QZoomError

ENTRY_POINT_GROUP = "qzoom_adapters.backbones"


@dataclass
class VisualFeatures:
    """Vision-tower output for a list of images, rows in image-token order.

    `embeds` (N, D) replace the image placeholder embeddings; `deepstack` holds, per decoder
    layer i, (N, D) features the backbone adds to the image tokens' hidden states after layer i
    (Qwen3-VL's deepstack; empty for most families).
    """

    embeds: torch.Tensor
    deepstack: tuple[torch.Tensor, ...] = ()


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
    default_position_mode: ClassVar[str]  # "aligned" | "sequential" when ZoomConfig leaves it unset

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
    def vision_start_id(self) -> int | None: ...  # None: the RoI block has no start/end markers
    @property
    def vision_end_id(self) -> int | None: ...
    @property
    def min_branch_layer(self) -> int: ...

    # --- inputs ----------------------------------------------------------------------
    def validate_inputs(self, inputs: dict) -> None: ...
    def image_grids(self, inputs: dict) -> torch.Tensor: ...  # (B, 3) rows that token_grid reads
    def encode_images(self, pixel_values: torch.Tensor, grids: torch.Tensor) -> VisualFeatures: ...
    def decoder_inputs(self, image_mask: torch.Tensor, features: VisualFeatures) -> dict: ...
    def token_grid(self, grid_row: torch.Tensor) -> tuple[int, int]: ...
    def position_ids(self, input_ids, attention_mask, grids) -> torch.Tensor: ...  # (axes, B, S)
    def roi_insert_index(self, ids: torch.Tensor) -> int: ...
    def source_window(self, image_processor, image_size: tuple[int, int]) -> tuple[float, float, float, float]: ...
    def process_crops(self, image_processor, crops: list, min_pixels: int | None, max_pixels: int | None) -> dict: ...
    def budget_pixels(self, tokens: int) -> int | None: ...  # min = max pixels for `tokens` visual tokens
    def view_kwargs(self, pixels: int | None) -> dict: ...  # processor keywords encoding at `pixels`
    def chat_inputs(self, processor, images: list, questions: list[str], pixels: int | None = None) -> dict: ...

    # --- layers ----------------------------------------------------------------------
    def call_layer(self, layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor: ...
    def query_key(self, layer: nn.Module, hidden: torch.Tensor, kwargs: dict,
                  rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    def sink_mask(self, h_t: int, w_t: int, **ctx: Any) -> torch.Tensor: ...


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
    import qzoom_adapters.backbones  # noqa: F401  (registers the built-in families)
