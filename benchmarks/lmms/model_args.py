"""The `qzoom` lmms-eval model's arguments (`--model_args key=value,...`), checked before anything loads.

No lmms-eval import here: the runner (`qzoom eval`) and the tests check arguments without it.

A bad argument (unknown key, wrong type, adapters of another family, a folder that is not there) raises
`ModelArgsError`, a `SystemExit` carrying one line: lmms-eval's command line catches every `Exception` around
model creation and prints its traceback, and a `SystemExit` is the one way through that stays a single line
(as `argparse` reports bad options).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator

from qzoom_adapters.config import ZoomConfig, as_zoom_config

DTYPES = ("auto", "checkpoint", "float32", "bfloat16", "float16")
REFERENCE = "reference"  # adapters=reference: the Q-Zoom tensors of the released checkpoint in `pretrained`
# Keys lmms-eval itself adds to every model's arguments (evaluator.simple_evaluate's additional config).
HARNESS_KEYS = ("batch_size", "max_batch_size", "device")


class ModelArgsError(SystemExit):
    """A bad `qzoom` model argument: one line, `qzoom: <problem and fix>`, whoever catches `Exception`."""

    def __init__(self, message: str):
        super().__init__(f"qzoom: {message}")
        self.message = message

    def __str__(self) -> str:
        return self.message


def _numeric(value):
    """lmms-eval passes `batch_size` as a string from its command line ("1") and as an int from Python."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return value


class QZoomModelArgs(BaseModel):
    """What `--model_args` may hold for `--model qzoom` (every other key is refused).

    The model comes from `pretrained` (a Hugging Face model folder or hub id) with the adapters in `adapters`
    (a folder written by `QZoom.save_pretrained`), or `adapters=reference` for a released Q-Zoom checkpoint in
    `pretrained`. The global view's pixel budget is either `budget` (exactly that many visual tokens, min = max
    pixels, with the crop read at the same budget: as `qzoom bench zoomworld` and `qzoom infer --budget` do) or the
    processor's `min_pixels` / `max_pixels` (the crop then gets the same bounds, SPEC §2.8). Thresholds and
    position mode override the adapters' saved settings.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    pretrained: str = Field(description="model folder or hub id")
    adapters: str = Field(description="adapter folder (QZoom.save_pretrained), or 'reference'")
    processor: str | None = Field(None, description="processor folder (default: pretrained)")
    gate_threshold: float | None = Field(None, ge=0.0, allow_inf_nan=False)
    roi_threshold: float | None = Field(None, ge=-1.0, le=2.0, allow_inf_nan=False)
    roi_region: Literal["union", "largest"] | None = None
    roi_refine: StrictInt | None = Field(None, ge=1, le=16)
    position_mode: Literal["aligned", "sequential"] | None = None
    budget: StrictInt | None = Field(None, ge=1, description="visual tokens of the global view and of the crop")
    min_pixels: StrictInt | None = Field(None, ge=1)
    max_pixels: StrictInt | None = Field(None, ge=1)
    emit_direct: StrictBool = False
    max_new_tokens: StrictInt | None = Field(None, ge=1, description="default when a task sets none (128)")
    dtype: Literal[DTYPES] = "auto"  # type: ignore[valid-type]
    device: str | None = Field(None, description="cpu, cuda, cuda:N or auto (None: auto)")
    batch_size: StrictInt = Field(1, ge=1)
    max_batch_size: StrictInt | None = None  # lmms-eval passes it; unused (no automatic batch sizes)
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None

    @field_validator("batch_size", "max_batch_size", mode="before")
    @classmethod
    def _harness_int(cls, value):
        return _numeric(value)

    @field_validator("device")
    @classmethod
    def _device(cls, value):
        if value is not None and not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value.strip().lower()):
            raise ValueError(f"{value!r} is not cpu, cuda, cuda:N or auto")
        return value

    def zoom_overrides(self) -> dict:
        """The `ZoomConfig` fields these arguments set (the rest keep the adapters' saved values)."""
        return {k: getattr(self, k) for k in ("gate_threshold", "roi_threshold", "roi_region", "roi_refine", "position_mode",
                                             "emit_direct")
                if k in self.model_fields_set}


def _one_line(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(x) for x in e.get("loc", ())) or "value"
        if e.get("type") == "extra_forbidden":
            parts.append(f"unknown model arg {key!r} (known: {', '.join(QZoomModelArgs.model_fields)})")
        elif e.get("type") == "missing":
            parts.append(f"model arg {key!r} is required (e.g. --model_args pretrained=MODEL,adapters=ADAPTERS)")
        else:
            parts.append(f"model arg {key}={e.get('input')!r}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelArgsError(f"cannot read {what} {path}: {err}") from None
    if not isinstance(data, dict):
        raise ModelArgsError(f"{what} {path} is not a JSON object")
    return data


def _check_family(args: QZoomModelArgs) -> None:
    """Adapters saved for another model type or family fail here, in one line, before any weight loads."""
    model_dir, adapters = Path(args.pretrained), Path(args.adapters)
    if args.adapters == REFERENCE or not model_dir.is_dir():
        return  # a hub id: the loaders check it when it is resolved
    if not (adapters / "adapter_config.json").is_file():
        raise ModelArgsError(f"adapters={args.adapters}: no adapter_config.json there; pass the folder written by "
                             "QZoom.save_pretrained, or adapters=reference for a released Q-Zoom checkpoint")
    if not (model_dir / "config.json").is_file():
        raise ModelArgsError(f"pretrained={args.pretrained}: no config.json there; pass a Hugging Face model folder")
    saved = _read_json(adapters / "adapter_config.json", "adapter config")
    model_type = _read_json(model_dir / "config.json", "model config").get("model_type")
    if saved.get("model_type") != model_type:
        from qzoom_adapters.errors import QZoomError
        from qzoom_adapters.spec import spec_class_for

        try:
            family = spec_class_for(model_type or "").family
        except QZoomError:
            family = model_type
        raise ModelArgsError(f"adapters={args.adapters} were saved for {saved.get('backbone_family')!r} "
                             f"(model_type {saved.get('model_type')!r}) but pretrained={args.pretrained} is "
                             f"{family!r} (model_type {model_type!r}); pass the adapters trained for this model")


def parse_model_args(raw: dict) -> QZoomModelArgs:
    """Validated arguments from what lmms-eval hands the model class (its parsed `--model_args` plus
    `batch_size`, `max_batch_size`, `device`); `ModelArgsError` (one line) for anything wrong."""
    if "adapters" not in raw and "pretrained" in raw:
        raise ModelArgsError("model arg 'adapters' is required: a folder written by QZoom.save_pretrained, or "
                             "adapters=reference for a released Q-Zoom checkpoint in pretrained")
    try:
        args = QZoomModelArgs.model_validate({k: v for k, v in raw.items() if not (k in HARNESS_KEYS and v is None)})
    except ValidationError as err:
        raise ModelArgsError(_one_line(err)) from None
    if args.budget is not None and (args.min_pixels is not None or args.max_pixels is not None):
        raise ModelArgsError("give either budget= (visual tokens) or min_pixels=/max_pixels=, not both")
    if args.min_pixels and args.max_pixels and args.min_pixels > args.max_pixels:
        raise ModelArgsError(f"min_pixels={args.min_pixels} exceeds max_pixels={args.max_pixels}")
    try:
        as_zoom_config({**ZoomConfig().model_dump(), **args.zoom_overrides()})
    except Exception as err:  # QZoomError: a threshold ZoomConfig refuses
        raise ModelArgsError(str(err)) from None
    for name in ("pretrained", "processor"):
        value = getattr(args, name)
        if value and (value.startswith((".", "/", "~")) or Path(value).exists()) and not Path(value).expanduser().is_dir():
            raise ModelArgsError(f"{name}={value} is not a folder")
    if args.adapters != REFERENCE and not Path(args.adapters).is_dir():
        raise ModelArgsError(f"adapters={args.adapters} is not a folder; pass the folder written by "
                             "QZoom.save_pretrained, or adapters=reference")
    _check_family(args)
    return args
