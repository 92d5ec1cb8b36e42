"""The `BackboneSpec` protocol: everything the core needs from a model family, and the registry.

A leaf of the package: it imports only `errors` (and torch). The built-in families are listed by
name in `BUILTIN_BACKBONES` and imported on the first registry lookup, so importing this module
never imports `qzoom_adapters.backbones` (whose modules import this one).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from .errors import QZoomError

ENTRY_POINT_GROUP = "qzoom_adapters.backbones"

#: The families shipped in `qzoom_adapters.backbones`, as family -> "module:Class"; imported on first lookup.
BUILTIN_BACKBONES: dict[str, str] = {
    "qwen2_vl": "qzoom_adapters.backbones.qwen2_vl:Qwen2VLSpec",
    "qwen2_5_vl": "qzoom_adapters.backbones.qwen2_5_vl:Qwen2_5_VLSpec",
    "qwen3_vl": "qzoom_adapters.backbones.qwen3_vl:Qwen3VLSpec",
    "llava": "qzoom_adapters.backbones.llava:LlavaSpec",
}


@dataclass
class VisualFeatures:
    """Vision-tower output for a list of images, rows in image-token order.

    `embeds` (N, D) replace the image placeholder embeddings; `deepstack` holds, per decoder
    layer i, (N, D) features the backbone adds to the image tokens' hidden states after layer i
    (Qwen3-VL's deepstack; empty for most families).
    """

    embeds: torch.Tensor
    deepstack: tuple[torch.Tensor, ...] = ()

    def take(self, index: torch.Tensor) -> "VisualFeatures":
        """The rows `index` (1-D) of the embeddings and of every deepstack tensor, in that order."""
        return VisualFeatures(self.embeds[index], tuple(t[index] for t in self.deepstack))

    @staticmethod
    def cat(parts: "list[VisualFeatures]") -> "VisualFeatures":
        """The rows of `parts`, one after the other."""
        return VisualFeatures(torch.cat([p.embeds for p in parts]),
                              tuple(torch.cat(ts) for ts in zip(*(p.deepstack for p in parts))))


@dataclass(frozen=True)
class ImageSpan:
    """One image of a sample: its row in the batch's image grids and its tokens `ids[start:end]` in the sample's
    (padded) row of `input_ids`."""

    row: int
    start: int
    end: int


@runtime_checkable
class BackboneSpec(Protocol):
    """What the core, the recipes and the benchmarks ask of a backbone family. One instance wraps one loaded model.

    A family implements this in one file under `backbones/` (see CONTRIBUTING.md); most start from
    `qzoom_adapters.backbones.base.VisionLanguageSpec`, which implements every member that follows
    plain HF conventions. Register it with `register_backbone` or the entry point. Every member
    listed here is used somewhere; `OPTIONAL_MEMBERS` lists the few the core reads only where a
    family has them. Tensors follow HF layouts: hidden states (B, S, D), attention q/k
    (B, heads, S, head_dim), position ids (axes, B, S).
    """

    # --- identity (class attributes) ---------------------------------------------------
    family: ClassVar[str]
    """Family name, saved in adapter_config.json; adapters load only into the same family."""
    model_types: ClassVar[tuple[str, ...]]
    """HF `config.model_type` values this spec handles (`get_spec` picks the spec by them)."""
    rope_axes: ClassVar[int]
    """Axes of the position ids: 3 for M-RoPE (t, h, w), 1 for plain RoPE."""
    default_position_mode: ClassVar[str]
    """"aligned" | "sequential": the RoI positions used when `ZoomConfig.position_mode` is None."""

    model: nn.Module
    """The wrapped HF `*ForConditionalGeneration` model (never modified)."""
    text_config: Any
    """The HF config of the text decoder (`num_hidden_layers`, `num_key_value_heads`, `head_dim`, ...)."""

    @staticmethod
    def model_class() -> type:
        """The HF model class; the loaders build models from checkpoints and model folders with it."""

    # --- structure -------------------------------------------------------------------
    @property
    def text_model(self) -> nn.Module:
        """The text decoder (embeddings -> layers -> norm); called with HF forward kwargs."""

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder layers of the text model, in order (the branch point K indexes them)."""

    @property
    def norm(self) -> nn.Module:
        """The final norm of the text model."""

    @property
    def lm_head(self) -> nn.Module:
        """The output head: (B, S, D) hidden states -> (B, S, vocab) logits."""

    @property
    def embed_tokens(self) -> nn.Module:
        """The input token embedding of the text model."""

    @property
    def hidden_size(self) -> int:
        """Width D of the decoder's hidden states."""

    @property
    def image_token_id(self) -> int:
        """The image placeholder token id (one per visual token in `input_ids`)."""

    @property
    def video_token_id(self) -> int | None:
        """The video placeholder token id, or None; inputs holding it are refused (still images only)."""

    @property
    def vision_start_id(self) -> int | None:
        """The token opening an image block; None: the RoI block has no start/end markers."""

    @property
    def vision_end_id(self) -> int | None:
        """The token closing an image block, or None."""

    @property
    def min_branch_layer(self) -> int:
        """Smallest branch layer K at which the image tokens' hidden states are final (deepstack: > 1)."""

    # --- inputs ----------------------------------------------------------------------
    def validate_inputs(self, inputs: dict) -> None:
        """Raise `QZoomError` naming the problem unless `inputs` hold still images (at least one per sample, each
        with its grid's number of tokens), as this family's processor makes them."""

    def image_grids(self, inputs: dict) -> torch.Tensor:
        """(images, 3) rows, one per image, that `token_grid` reads (default: `image_grid_thw`)."""

    def encode_images(self, pixel_values: torch.Tensor, grids: torch.Tensor) -> VisualFeatures:
        """Vision-tower features of all images, one row per image token, in order."""

    def decoder_inputs(self, image_mask: torch.Tensor, features: VisualFeatures) -> dict:
        """Extra text-model forward kwargs carrying visual features beyond the input embeddings (e.g. deepstack);
        `image_mask` (B, S) marks the image tokens the features belong to."""

    def token_grid(self, grid_row: torch.Tensor) -> tuple[int, int]:
        """(h_t, w_t) merged token grid of one image, raster order (the heatmap's shape)."""

    def position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     grids: torch.Tensor) -> torch.Tensor:
        """(rope_axes, B, S) positions of left-padded inputs, the ones the model's own `generate` uses."""

    def roi_insert_index(self, ids: torch.Tensor) -> int:
        """Index in one unpadded sample's (S,) ids where the RoI block is inserted: right after the last image of
        `ids` (its end marker included). The core passes the ids up to the first token of the image after the
        RoI's image, so the block follows the image the crop was cut from."""

    def image_spans(self, input_ids: torch.Tensor, grids: torch.Tensor) -> list[list[ImageSpan]]:
        """Per sample (row of (B, S) `input_ids`), its images in order: which `grids` row each one is and where its
        tokens are. Grid rows are the batch's images in order (sample by sample); raises `QZoomError` when the
        image tokens do not match the grids."""

    def source_window(self, image_processor, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1): the source-pixel region the token grid covers (the whole image unless the processor
        centre-crops or pads)."""

    def process_crops(self, image_processor, crops: list, min_pixels: int | None, max_pixels: int | None) -> dict:
        """`pixel_values` and `image_grid_thw` of PIL crops; None budgets: the global view's."""

    def budget_pixels(self, tokens: int) -> int | None:
        """Pixel budget (min = max) that gives `tokens` visual tokens; None: the processor's fixed size is that budget.
        Raises `QZoomError` for a budget the family cannot encode."""

    def view_kwargs(self, pixels: int | None) -> dict:
        """Processor keywords that encode images at exactly `pixels` (None: the processor's own setting)."""

    def chat_inputs(self, processor, images: list, questions: list[str], pixels: int | None = None) -> dict:
        """Left-padded processor inputs for one user turn per sample (chat template applied), at `pixels`."""

    # --- layers ----------------------------------------------------------------------
    def call_layer(self, layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Run one decoder layer on (B, S, D) `hidden` with keyword arguments only; returns the new hidden states."""

    def rotary_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        """(cos, sin) from the model's own rotary module for `position_ids`, as the text model hands its layers."""

    def query_key(self, layer: nn.Module, hidden: torch.Tensor, kwargs: dict,
                  rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-RoPE queries at `rows` (B, R) -> (B, H, R, D), and keys of all positions (B, KV, S, D)."""

    def key_value(self, layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-RoPE keys and the values of all positions, (B, KV, S, D) each, as the layer caches them."""

    def sink_mask(self, h_t: int, w_t: int, **ctx: Any) -> torch.Tensor:
        """(h_t, w_t) cells to keep (1) in the heatmap; ctx may hold `first_token_scores` (h_t * w_t,)."""


#: Members the core reads only where a family defines them (`getattr`/`hasattr` with a fallback).
OPTIONAL_MEMBERS: dict[str, str] = {
    "grid_keeps_aspect": "class attribute, True when the processor keeps the image's aspect ratio in the token grid "
                         "(up to rounding); the pipeline then refuses source images whose aspect does not match",
    "check_crop_budget": "check_crop_budget(image_processor, min_pixels, max_pixels): raise QZoomError for an "
                         "unreasonable crop budget when ZoomConfig sets one",
    "tiny_config": "classmethod tiny_config(text=None, **overrides): a tiny random-init HF config (conformance kit, "
                   "`qzoom demo`, benchmarks)",
    "tiny_processor": "staticmethod tiny_processor(): an offline processor matching tiny_config's token ids",
    "checkpoint_key_renames": "class attribute, (regex, replacement) pairs mapping checkpoint keys of an older "
                              "transformers layout to the model's state-dict keys (`io.map_checkpoint_keys`, used by "
                              "released-checkpoint loading where transformers did not convert a key)",
    "vision_attention_config": "class attribute, the model-config key (e.g. \"vision_config\") of a vision tower whose "
                               "attention takes cu_seqlens; ZoomConfig(vision_attention=\"varlen\") and "
                               "fast_vision_attention select the packed attention for it (absent: refused)",
    "multi_image": "class attribute, False when the family takes one image per sample (validate_inputs then refuses "
                   "more, and the conformance kit checks that it does); absent: several images per sample work",
    "vision_tower": "property, the vision tower module (benchmarks cast it to compare attention paths in fp32)",
}


def protocol_members() -> frozenset[str]:
    """Names of every member `BackboneSpec` declares (attributes, properties and methods)."""
    names = set(BackboneSpec.__dict__.get("__annotations__", {}))
    names |= {n for n, v in vars(BackboneSpec).items()
              if not n.startswith("_") and (callable(v) or isinstance(v, (property, staticmethod, classmethod)))}
    return frozenset(names)


_REGISTRY: dict[str, type] = {}  # explicit registrations (register_backbone, entry points); these win
_BUILTIN_CLASSES: dict[str, type] = {}  # BUILTIN_BACKBONES, resolved on first lookup
_entry_points_loaded = False


def register_backbone(spec_cls: type) -> type:
    """Register a spec class (usable as a decorator). A registration wins over a built-in family of the same name,
    and later registrations over earlier ones."""
    for attr in ("family", "model_types"):
        if not getattr(spec_cls, attr, None):
            raise QZoomError(f"{spec_cls.__name__} must define class attribute `{attr}` to be registered")
    _REGISTRY.pop(spec_cls.family, None)  # re-registering moves the family to the end (latest wins)
    _REGISTRY[spec_cls.family] = spec_cls
    return spec_cls


def resolve_target(target: str) -> Any:
    """The object a "module:attribute" string names (importing the module)."""
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr:
        raise QZoomError(f"{target!r} is not of the form 'module:Class'")
    return getattr(importlib.import_module(module), attr)


def _builtin_families() -> dict[str, type]:
    if len(_BUILTIN_CLASSES) != len(BUILTIN_BACKBONES):
        for family, target in BUILTIN_BACKBONES.items():
            if family not in _BUILTIN_CLASSES:
                _BUILTIN_CLASSES[family] = resolve_target(target)
    return _BUILTIN_CLASSES


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        register_backbone(ep.load())


def registered_families() -> dict[str, type]:
    """family -> spec class: the built-in families, then entry points and `register_backbone` calls (which win)."""
    builtin = _builtin_families()
    _load_entry_points()
    return {**builtin, **_REGISTRY}


def spec_class_for(model_type: str) -> type:
    """The spec class handling HF `model_type`: the latest registration claiming it, else the built-in one."""
    families = registered_families()
    for cls in [*reversed(_REGISTRY.values()), *families.values()]:
        if model_type in cls.model_types:
            return cls
    known = {f: c.model_types for f, c in families.items()}
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
