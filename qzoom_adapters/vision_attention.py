"""A fast attention path for vision towers that take `cu_seqlens` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), selected
on an unmodified model and restored after use.

HF's Qwen-VL vision attention loops in Python over the attention windows (and, in the full-attention layers, the
images) of the whole batch, one sdpa call each, unless its config names a flash implementation; then it makes one
call per layer over the packed sequence with `cu_seqlens`. `varlen_vision_attention` is a function for that packed
call. Inside `fast_vision_attention(model)` (or with `ZoomConfig(vision_attention="varlen")`) the vision config
selects it (how, per transformers line: `compat.vision_attention`), and it runs:

* PyTorch's `torch.nn.attention.varlen.varlen_attn` (flash kernels, one call per layer) where the call allows it:
  CUDA, float16/bfloat16, compute capability >= 8.0, head dim a multiple of 8 up to 256, no dropout;
* otherwise exact per-segment sdpa: the very calls the model's own sdpa path makes, so on CPU (and for fp32) the
  features equal the stock sdpa features.

`CALLS` counts which path ran ("varlen", "per_segment", and "unpacked" where a line handed over one window at a
time); the benchmark reports it.
"""
from __future__ import annotations

import functools
import inspect
import warnings
from collections import Counter
from contextlib import ExitStack, contextmanager, nullcontext

import torch

from qzoom_adapters import compat as _compat
from .errors import QZoomError

VISION_ATTENTION_MODES = ("model", "varlen")  # "model": the model's own setting, untouched
CALLS: Counter = Counter()
_FAILED: set = set()  # (device, dtype) where the varlen kernel raised once: the fallback serves them from then on


@functools.lru_cache(maxsize=1)
def _varlen_kernel():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, False
    return varlen_attn, "scale" in inspect.signature(varlen_attn).parameters


@functools.lru_cache(maxsize=16)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def varlen_unavailable(query: torch.Tensor, scaling: float | None = None, dropout: float = 0.0) -> str | None:
    """Why the varlen kernel cannot run attention on (1, H, S, D) `query`; None where it can."""
    kernel, takes_scale = _varlen_kernel()
    head_dim = query.shape[-1]
    if kernel is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    if query.device.type != "cuda":
        return f"the tensors are on {query.device.type} (the varlen kernels are CUDA-only)"
    if query.dtype not in (torch.float16, torch.bfloat16):
        return f"{query.dtype} (the varlen kernels take float16 or bfloat16)"
    if dropout:
        return "attention dropout is on"
    if head_dim % 8 or head_dim > 256:
        return f"head dim {head_dim} (the flash kernels need a multiple of 8 up to 256)"
    if _capability(query.device.index or 0) < (8, 0):
        return "compute capability below 8.0"
    if not takes_scale and scaling is not None and abs(scaling - head_dim**-0.5) > 1e-6 * head_dim**-0.5:
        return "this torch's varlen_attn takes no scale and the module's scale is not 1/sqrt(head_dim)"
    if (query.device, query.dtype) in _FAILED:
        return "the varlen kernel failed earlier on this device and dtype"
    return None


def _sdpa(module, query, key, value, scaling, dropout, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, None, scaling=scaling, dropout=dropout,
                                           is_causal=False, **kwargs)[0]


def _per_segment(module, query, key, value, cu_seqlens, scaling, dropout, **kwargs) -> torch.Tensor:
    """What the model's own sdpa path computes: one sdpa call per segment of (1, H, S, D) q/k/v, joined on S."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    parts = zip(*(t.split(lengths, dim=2) for t in (query, key, value)))
    return torch.cat([_sdpa(module, q, k, v, scaling, dropout, **kwargs) for q, k, v in parts], dim=1)


def _varlen(query, key, value, cu_seqlens, max_len, scaling) -> torch.Tensor:
    kernel, takes_scale = _varlen_kernel()
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (1, H, S, D) -> (S, H, D), as packed
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    cu = cu_seqlens.to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max()) if max_len is None else int(max_len)
    out = kernel(q, k, v, cu, cu, max_len, max_len, **({"scale": scaling} if takes_scale else {}))
    return out.unsqueeze(0)  # (1, S, H, D): what the model reshapes to (S, H * D)


def varlen_vision_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                            cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None,
                            is_causal=False, **kwargs):
    """`AttentionInterface` function for a vision tower's packed attention: (1, H, S, D) q/k/v, segments given by
    `cu_seq_lens_q` (each attends within itself) -> ((1, S, H, D) output, None)."""
    if attention_mask is not None or is_causal:
        raise QZoomError("varlen_vision_attention serves vision towers (no mask, not causal); select it only for a "
                         "vision config")
    if cu_seq_lens_q is None:  # the line split the sequence itself and hands over one window
        CALLS["unpacked"] += 1
        return _sdpa(module, query, key, value, scaling, dropout, **kwargs), None
    if cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens_q and not torch.equal(cu_seq_lens_k,
                                                                                              cu_seq_lens_q):
        raise QZoomError("varlen_vision_attention needs the same segments for queries and keys (self-attention)")
    if varlen_unavailable(query, scaling, dropout) is None:
        try:
            out = _varlen(query, key, value, cu_seq_lens_q, max_length_q, scaling)
            CALLS["varlen"] += 1
            return out, None
        except RuntimeError as err:  # an unsupported GPU/build: per-segment sdpa from now on, said once
            _FAILED.add((query.device, query.dtype))
            warnings.warn(f"varlen_attn failed ({err}); the vision tower's attention falls back to per-segment sdpa "
                          f"on {query.device} {query.dtype}", stacklevel=2)
    CALLS["per_segment"] += 1
    return _per_segment(module, query, key, value, cu_seq_lens_q, scaling, dropout, **kwargs), None


def vision_attention_key(spec, mode: str) -> str | None:
    """The sub-config key whose attention `mode` selects (None for "model"); `QZoomError` for a bad mode or a family
    whose vision tower takes no `cu_seqlens`."""
    if mode not in VISION_ATTENTION_MODES:
        raise QZoomError(f"vision_attention must be one of {VISION_ATTENTION_MODES}, got {mode!r}")
    if mode == "model":
        return None
    key = getattr(spec, "vision_attention_config", None)
    if key is None:
        raise QZoomError(f"vision_attention={mode!r} needs a vision tower that takes cu_seqlens (the Qwen-VL "
                         f"families); the {spec.family} tower does not: use vision_attention='model'")
    return key


def selected_vision_attention(spec, mode: str):
    """A context in which `spec.model`'s vision tower runs with `mode` ("model": a no-op)."""
    key = vision_attention_key(spec, mode)
    if key is None:
        return nullcontext()
    return _selected(spec.model, key)


@contextmanager
def _selected(model, key: str):
    with ExitStack() as stack:
        try:
            stack.enter_context(_compat.vision_attention(model, key, varlen_vision_attention))
        except (RuntimeError, ValueError) as err:
            raise QZoomError(f"cannot select the packed vision attention on {type(model).__name__}: {err}") from err
        before = CALLS["unpacked"]
        yield
    if CALLS["unpacked"] > before:
        warnings.warn("this transformers line split the vision attention per window before calling the packed "
                      "function, so the varlen path did not run (see qzoom_adapters/compat.py)", stacklevel=3)


def fast_vision_attention(model, mode: str = "varlen"):
    """`with fast_vision_attention(model): model.generate(...)`: the model's vision tower runs its attention through
    `varlen_vision_attention` inside the block (see this module's docstring); on exit the model's attention
    settings are exactly what they were. `mode="model"` leaves the model as it is. Raises `QZoomError` for a model
    whose vision tower takes no `cu_seqlens` or a bad mode."""
    from .spec import get_spec

    return selected_vision_attention(get_spec(model), mode)
