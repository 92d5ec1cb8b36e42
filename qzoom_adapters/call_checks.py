"""Checks of a `QZoom` call's arguments, made before any model work, and the per-model call lock."""
from __future__ import annotations

import numbers
import threading
import weakref

from torch import nn

from .errors import QZoomError
from .roi import check_box, check_grid_aspect

# One lock per backbone: a call registers hooks on the model's layers and keeps decode buffers, so two
# calls on the same model (through one QZoom or several) must not overlap. Weak keys: no model is kept alive.
_MODEL_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    with _LOCKS_LOCK:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock


def check_max_new_tokens(n) -> None:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise QZoomError(f"max_new_tokens must be a positive integer, got {n!r} ({type(n).__name__})")
    if n < 1:
        raise QZoomError(f"max_new_tokens must be at least 1, got {n}")


def check_questions(questions, n_images: int) -> list[str]:
    """`questions` as a list: one string per sample, as many as image groups, at least one."""
    if isinstance(questions, str):
        raise QZoomError("questions must be a list with one string per sample, e.g. [question]")
    questions = list(questions)
    if n_images != len(questions):
        raise QZoomError(f"got {n_images} images for {len(questions)} questions")
    if not questions:
        raise QZoomError("empty batch: pass at least one image and one question")
    if not all(isinstance(q, str) for q in questions):
        raise QZoomError("every question must be a string")
    return questions


def check_boxes(boxes, images, B: int) -> list | None:
    """A caller's `boxes`: one entry per sample, each None or a box inside its source image."""
    if boxes is None:
        return None
    boxes = list(boxes) if hasattr(boxes, "__len__") and not isinstance(boxes, (str, bytes)) else None
    if boxes is None or (boxes and all(isinstance(b, numbers.Real) for b in boxes)):
        raise QZoomError("boxes must be a list with one entry per sample, None or (x1, y1, x2, y2) in source "
                         "pixels: for one sample pass [box]")
    if len(boxes) != B:
        raise QZoomError(f"boxes has {len(boxes)} entries for a batch of {B}")
    for i, (box, image) in enumerate(zip(boxes, images)):
        if box is not None:
            check_box(box, image.size, i)
    return boxes


def check_processor(processor, tokenizer, spec) -> None:
    """A processor of another family writes another image placeholder token than the model reads."""
    token = getattr(processor, "image_token", None)
    if not isinstance(token, str) or tokenizer is None or not hasattr(tokenizer, "convert_tokens_to_ids"):
        return
    token_id = tokenizer.convert_tokens_to_ids(token)
    if isinstance(token_id, int) and token_id != spec.image_token_id:
        raise QZoomError(
            f"the processor ({type(processor).__name__}) marks images with {token!r} = id {token_id}, but "
            f"this {spec.family} model expects image token id {spec.image_token_id}: the processor "
            "belongs to another model; load the processor saved with this model"
        )


def check_grids(spec, image_processor, a, images) -> None:
    """Each image grid of pass A `a` must have its source image's aspect ratio (within rounding) where the spec
    says so."""
    if not getattr(spec, "grid_keeps_aspect", False):
        return
    for i, (spans, group) in enumerate(zip(a.spans, images)):
        for span, image in zip(spans, group):
            check_grid_aspect(spec.token_grid(a.grid[span.row]), spec.source_window(image_processor, image.size), i)
