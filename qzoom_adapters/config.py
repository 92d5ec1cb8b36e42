"""Configs (pydantic): how the pipeline zooms, and what an adapter file records."""
from __future__ import annotations

import warnings
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import QZoomError


class _Tolerant(BaseModel):
    """Unknown keys warn (saved files may come from a newer version) instead of failing."""

    model_config = ConfigDict(extra="ignore", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _warn_unknown(cls, data):
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(cls.model_fields))
            if unknown:
                warnings.warn(f"{cls.__name__}: ignoring unknown keys {unknown}", stacklevel=2)
        return data


class ZoomConfig(_Tolerant):
    """Inference behaviour of the gated two-pass decoder (SPEC §2-§3)."""

    gate_threshold: float = Field(0.05, ge=0.0, description="zoom iff p >= this; 0 = always, > 1 = never (NaN refused)")
    roi_threshold: float = Field(
        0.15, ge=-1.0, le=2.0, allow_inf_nan=False,
        description="threshold on the blurred foreground map (which lies in [0, 1]): below 0 keeps the whole grid, "
        "1 or above never finds a box; NaN and values outside [-1, 2] (e.g. a percentage) are refused")
    roi_region: Literal["union", "largest"] = Field(
        "union", description="the cells the box is drawn around: all above roi_threshold (SPEC), or only their "
        "8-connected component with the largest blurred mass (SPEC's optional extension)")
    roi_refine: int = Field(
        1, ge=1, le=16, description="sub-cell box: 1 = SPEC (the box's edges on the token grid); f > 1 bilinearly "
        "upsamples the blurred map f times and draws the box around the fine cells above roi_threshold inside the "
        "chosen cells (an extension; the box can only shrink, by up to half a cell per side)")
    min_crop_px: int = Field(28, ge=1)
    blur_kernel: int = Field(3, ge=1)
    blur_sigma: float = Field(1.0, gt=0.0)
    position_mode: Literal["aligned", "sequential"] | None = Field(
        None, description="None = the backbone's default (aligned for M-RoPE, sequential for 1-D RoPE)")
    crop_min_pixels: int | None = Field(None, ge=1, description="None = the global view's min_pixels")
    crop_max_pixels: int | None = Field(None, ge=1, description="None = the global view's max_pixels")
    emit_direct: bool = Field(False, description="also decode the direct answer when zoomed")
    decode: Literal["auto", "cuda_graph", "static", "dynamic"] = Field(
        "auto", description="decode loop: a CUDA graph of one step over static buffers (auto on CUDA with sdpa or "
        "eager attention), the same step without a graph, or the text model's own forward per token")
    vision_attention: Literal["model", "varlen"] = Field(
        "model", description="the vision tower's attention: the model's own setting, or one packed call per layer "
        "(varlen_attn on CUDA fp16/bf16, else exact per-segment sdpa) selected for the call and restored after "
        "(Qwen-VL families; qzoom_adapters.vision_attention)")
    crop_preprocess: Literal["host", "device"] = Field(
        "host", description="where crops are resized and normalised: the image processor on the host (the bit-exact "
        "reference), or its torchvision form on the model's device (falls back to the host, with a warning, where "
        "torchvision or that form is missing)")

    @model_validator(mode="after")
    def _check(self):
        if self.blur_kernel % 2 != 1:
            raise ValueError(f"blur_kernel must be odd, got {self.blur_kernel}")
        if self.crop_min_pixels and self.crop_max_pixels and self.crop_min_pixels > self.crop_max_pixels:
            raise ValueError("crop_min_pixels must not exceed crop_max_pixels")
        return self


def validation_message(err: ValidationError) -> str:
    """One line per pydantic error: `field: problem (got value)`."""
    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in e.get("loc", ())) or "value"
        got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
        parts.append(f"{where}: {e.get('msg', 'invalid')}{got}")
    return "; ".join(parts)


def as_zoom_config(value) -> ZoomConfig:
    """A `ZoomConfig` from a `ZoomConfig` (re-validated: `model_copy(update=...)` skips validation) or a dict.

    Raises `QZoomError` with a one-line message for anything else or for invalid fields.
    """
    if isinstance(value, ZoomConfig):
        data = value.model_dump()
    elif isinstance(value, dict):
        data = value
    else:
        raise QZoomError(f"the zoom config must be a ZoomConfig or a dict of its fields, got {type(value).__name__}")
    try:
        return ZoomConfig.model_validate(data)
    except ValidationError as err:
        raise QZoomError(f"invalid ZoomConfig: {validation_message(err)}") from None


class AdapterConfig(_Tolerant):
    """What `adapter_config.json` records next to the adapter tensors.

    `T` is the depth of the first adapter (the twig if there is one); `twig_T` / `gate_T` record each adapter's
    own depth, so a twig and a gate of different depth round-trip (files without them: both have depth `T`).
    `base_model_name_or_path` / `revision` name the base model the adapters were trained on (as peft records it),
    None where the model did not say.
    """

    library_version: str
    backbone_family: str
    model_type: str
    K: int = Field(ge=1)
    T: int = Field(ge=1)
    twig_T: int | None = Field(None, ge=1)
    gate_T: int | None = Field(None, ge=1)
    has_twig: bool
    has_gate: bool
    hidden_size: int
    num_hidden_layers: int
    base_model_name_or_path: str | None = None
    revision: str | None = None
    zoom: ZoomConfig = Field(default_factory=ZoomConfig)

    def depth(self, adapter: str) -> int:
        """The depth of adapter "twig" or "gate" (`T` for files written before per-adapter depths)."""
        own = self.twig_T if adapter == "twig" else self.gate_T
        return own or self.T


def explicit_fields(config) -> dict:
    """The fields a caller set on purpose: those of a dict, or a `ZoomConfig`'s `model_fields_set` (what its
    constructor or `model_copy(update=...)` was given); the rest are defaults that must not replace saved values."""
    if config is None:
        return {}
    if isinstance(config, ZoomConfig):
        return {k: getattr(config, k) for k in config.model_fields_set}
    if isinstance(config, dict):
        as_zoom_config(config)  # a bad dict fails here, naming the field (unknown keys warn once, here)
        return {k: v for k, v in config.items() if k in ZoomConfig.model_fields}
    raise QZoomError(f"the zoom config must be a ZoomConfig or a dict of its fields, got {type(config).__name__}")


def merge_zoom_config(base, config=None, overrides: dict | None = None) -> ZoomConfig:
    """`base` (saved settings) with the fields `config` sets explicitly and then the keyword `overrides` in place.

    A field the caller left at its default keeps the saved value: `ZoomConfig(gate_threshold=0.5)` changes only
    the gate threshold of a saved `position_mode="sequential"` config.
    """
    overrides = overrides or {}
    unknown = set(overrides) - set(ZoomConfig.model_fields)
    if unknown:
        raise QZoomError(f"unknown ZoomConfig fields {sorted(unknown)}; valid: {sorted(ZoomConfig.model_fields)}")
    base = as_zoom_config(base).model_dump() if base is not None else {}
    return as_zoom_config({**base, **explicit_fields(config), **overrides})
