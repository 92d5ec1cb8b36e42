"""Context-managed hooks on an unmodified backbone: every handle is removed, also on error."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn


class _StopForward(Exception):
    """Raised by a capture hook to end the backbone's forward at the hooked layer."""


@dataclass
class LayerCapture:
    """What entered a decoder layer: its hidden states (cloned) and keyword arguments."""

    hidden: torch.Tensor | None = None
    kwargs: dict = field(default_factory=dict)
    calls: int = 0


def _clone(x):
    return x.clone() if isinstance(x, torch.Tensor) else x


@contextmanager
def capture_layer_input(layer: nn.Module, stop: bool = False, prefill_only: bool = True):
    """Capture the input of `layer` (hidden states + kwargs) during a forward.

    Args:
        layer: the decoder layer whose input to record (e.g. `layers[K]`).
        stop: end the forward right there (the caller catches nothing: the context does).
        prefill_only: ignore single-token (decode) calls.
    Yields:
        a `LayerCapture` filled once the forward reached the layer.

    Only forwards run by the thread that entered the context are captured (and stopped); a forward of
    the same model in another thread passes the hook untouched.
    """
    cap = LayerCapture()
    owner = threading.get_ident()

    def hook(module, args, kwargs):
        if threading.get_ident() != owner:  # another thread's forward of the same model: not ours to capture or stop
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if prefill_only and hidden.shape[1] == 1 and cap.calls > 0:
            return None
        cap.calls += 1
        cap.hidden = hidden.clone()  # some backbones write hidden states in place later
        cap.kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        cap.kwargs = {k: (tuple(_clone(t) for t in v) if isinstance(v, tuple) else v) for k, v in cap.kwargs.items()}
        if stop:
            raise _StopForward
        return None

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield cap
    except _StopForward:
        pass
    finally:
        handle.remove()


def run_until(text_model: nn.Module, layer: nn.Module, **forward_kwargs) -> LayerCapture:
    """Run `text_model(**forward_kwargs)` up to (not including) `layer`; return what entered it."""
    with capture_layer_input(layer, stop=True, prefill_only=False) as cap:
        text_model(**forward_kwargs)
    if cap.hidden is None:
        raise RuntimeError(f"the forward of {type(text_model).__name__} never reached the hooked layer")
    return cap
