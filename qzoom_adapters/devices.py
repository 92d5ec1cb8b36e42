"""Device and dtype names as users write them, checked before anything loads, with one clear error each: the command
line's `--device`/`--dtype` (`qzoom infer`, the lmms-eval plugin's `device=`/`dtype=`) and the Python loaders'
`torch_dtype=`/`dtype=`, `device=` and `device_map=` (`QZoom.from_reference_checkpoint`)."""
from __future__ import annotations

import re

import torch

from .errors import QZoomError

DTYPE_CHOICES = ("auto", "checkpoint", "float32", "bfloat16", "float16")
DEVICE_MAP_NAMES = ("auto", "balanced", "balanced_low_0", "sequential")  # the strategies `from_pretrained` knows


def resolve_device(name, label: str = "--device ") -> torch.device:
    """cpu, cuda, cuda:N or auto (cuda if available, else cpu), as a name or a `torch.device`; `label` prefixes the
    error ("--device ", "device=")."""
    text = (str(name) if name is not None else "auto").strip().lower()
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
    return loading_dtype(name, label=label)


def loading_dtype(torch_dtype="auto", dtype=None, label: str = "torch_dtype="):
    """The dtype a Python loader hands `from_pretrained`: "auto" (or None) = the checkpoint's own, else a floating
    torch dtype or its name ("bfloat16", "torch.float16"). `dtype` is transformers 5's name for `torch_dtype`;
    give one of the two."""
    if dtype is not None:
        if torch_dtype not in (None, "auto") and torch_dtype != dtype:
            raise QZoomError(f"pass torch_dtype= or dtype= (its transformers-5 name), not both (got {torch_dtype!r} "
                             f"and {dtype!r})")
        torch_dtype, label = dtype, "dtype="
    if torch_dtype is None or (isinstance(torch_dtype, str) and torch_dtype.strip().lower() == "auto"):
        return "auto"
    value = torch_dtype
    if isinstance(torch_dtype, str):
        name = torch_dtype.strip().lower()
        value = getattr(torch, name[len("torch."):] if name.startswith("torch.") else name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise QZoomError(f"{label}{torch_dtype!r} is not \"auto\" or a floating torch dtype (float32, bfloat16, "
                         "float16)")
    return value


def device_name(value, label: str = "--device ") -> str:
    """A device checked by `resolve_device`, named as `from_pretrained` takes it in a device map: "cpu" or
    "cuda:N" (a bare "cuda" gets the current CUDA device's index, so the name is one device)."""
    device = resolve_device(value, label)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def _map_value(value, key: str):
    """One entry of a caller's device map: a CUDA index, a device name or "disk", checked against this machine."""
    label = f"device_map[{key!r}]="
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise QZoomError(f"{label}{value} is not a CUDA device index (0, 1, ...)")
        device_name(f"cuda:{value}", label)
        return value
    if isinstance(value, str) and value.strip().lower() == "disk":
        return "disk"
    if not isinstance(value, (str, torch.device)) or str(value).strip().lower() == "auto":
        raise QZoomError(f"{label}{value!r} is not a device (cpu, cuda, cuda:N, a CUDA index or disk)")
    return device_name(value, label)


def placement(device=None, device_map=None):
    """`device_map` for `from_pretrained`, so weights go straight to their device and are never held twice in host
    memory; None loads on the CPU the default way.

    `device`: a torch device or its name (all weights there; "cpu" = None), or itself a device map (a dict, or
    "auto" / "balanced" / ...), so `from_reference_checkpoint(device="auto")` works. `device_map`: one of those
    strategy names, a device ("cuda:0", "cpu": all weights there, through transformers' device-map path), or a
    dict {module name: device}. Every device named is checked against this machine, with one clear error."""
    if device_map is not None and device is not None:
        raise QZoomError("pass either device= or device_map=, not both")
    if device_map is None and (isinstance(device, dict) or device in DEVICE_MAP_NAMES):
        device, device_map = None, device
    if device_map is None:
        if device is None:
            return None
        if not isinstance(device, (str, torch.device)):
            raise QZoomError(f"device={device!r} is not a torch device (cpu, cuda, cuda:N) or a device map "
                             f"({', '.join(DEVICE_MAP_NAMES)} or a dict)")
        where = device_name(device, "device=")
        return None if where == "cpu" else {"": where}
    if isinstance(device_map, dict):
        if not device_map:
            raise QZoomError("device_map={} names no module; pass e.g. {'': 'cuda:0'} or device_map='auto'")
        return {str(k): _map_value(v, str(k)) for k, v in device_map.items()}
    if isinstance(device_map, str) and device_map.strip().lower() in DEVICE_MAP_NAMES:
        return device_map.strip().lower()
    if not isinstance(device_map, (str, torch.device)):
        raise QZoomError(f"device_map={device_map!r} is not {', '.join(DEVICE_MAP_NAMES)}, a device or a dict")
    return {"": device_name(device_map, "device_map=")}  # resolve_device's error lists cpu, cuda, cuda:N and auto
