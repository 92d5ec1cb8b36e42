"""Device and dtype names as users write them (`qzoom infer --device/--dtype`, the lmms-eval plugin's
`device=`/`dtype=`), checked before anything loads, with one clear error each."""
from __future__ import annotations

import re

import torch

from .errors import QZoomError

DTYPE_CHOICES = ("auto", "checkpoint", "float32", "bfloat16", "float16")


def resolve_device(name: str | None, label: str = "--device ") -> torch.device:
    """cpu, cuda, cuda:N or auto (cuda if available, else cpu); `label` prefixes the error ("--device ", "device=")."""
    text = (name or "auto").strip().lower()
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise QZoomError(f"{label}{name!r} is not cpu, cuda, cuda:N or auto")
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise QZoomError(f"{label}{name}: no CUDA device is available here; use {label}cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise QZoomError(f"{label}{name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return device


def resolve_dtype(name: str, device: torch.device, label: str = "--dtype "):
    """auto: bf16 on CUDA, fp32 on the CPU; checkpoint: the checkpoint's own (the string "auto", as
    `from_pretrained` takes it); else that torch dtype."""
    if name not in DTYPE_CHOICES:
        raise QZoomError(f"{label}{name!r} is not one of {', '.join(DTYPE_CHOICES)}")
    if name == "checkpoint":
        return "auto"
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)
