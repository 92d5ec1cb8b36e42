"""Box geometry of tool calls: frame conversion (`tool_grammars.FRAMES`), clipping, growth and rounding of the
crop a call asks for (`place_box`), as `ToolLoop` executes it."""
from __future__ import annotations

import math

from .tool_grammars import Box, ToolCallError, ToolGrammar


def frame_size(coords: str, image_size, seen_size) -> tuple[float, float]:
    """(width, height) of the frame `coords` for an image of `image_size` shown to the model at `seen_size`."""
    return {"source": image_size, "seen": seen_size, "relative": (1.0, 1.0), "norm1000": (1000.0, 1000.0)}[coords]


def to_pixels(box: Box, coords: str, image_size, seen_size) -> Box:
    """A box in frame `coords` -> pixels of the image it refers to."""
    fw, fh = frame_size(coords, image_size, seen_size)
    sx, sy = image_size[0] / fw, image_size[1] / fh
    return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy


def from_pixels(box: Box, coords: str, image_size, seen_size) -> Box:
    """Pixels of an image -> the box in frame `coords` (the inverse of `to_pixels`)."""
    fw, fh = frame_size(coords, image_size, seen_size)
    sx, sy = fw / image_size[0], fh / image_size[1]
    return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy


def _grow(lo: float, hi: float, limit: float, min_side: float) -> tuple[float, float]:
    """Grow [lo, hi] to `min_side` (at most `limit`) about its centre, shifted to stay inside [0, limit]. The
    core's `roi._grow_side` does the same for twig boxes; backbones import only leaf modules, so it is not shared."""
    side = min(float(min_side), float(limit))
    if hi - lo < side:
        c = (lo + hi) / 2.0
        lo, hi = c - side / 2.0, c + side / 2.0
    if lo < 0:
        lo, hi = 0.0, hi - lo
    if hi > limit:
        lo, hi = lo - (hi - limit), float(limit)
    return max(lo, 0.0), min(hi, float(limit))


def place_box(grammar: ToolGrammar, box: Box, image_size, min_side: int, written: Box | None = None):
    """The whole-pixel crop box for a call's `box` (pixels of an image of `image_size`), or `ToolCallError`.

    Order: no area -> error; not inside -> clip (or error for "reject"; wholly outside -> error); enlarge about
    the centre and clip; grow each side under `min_side` about its centre, shifted inside the image; sides
    differing by more than `max_aspect` -> error; ends rounded outwards. `written` (the numbers as the model wrote
    them) only goes into the error messages.
    """
    W, H = image_size
    shown = "[" + ", ".join(f"{v:g}" for v in (written or box)) + "]"
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        raise ToolCallError(f"the box {shown} has no area: x2 must be greater than x1 and y2 greater than y1")
    if not (0 <= x1 and 0 <= y1 and x2 <= W and y2 <= H):
        if grammar.out_of_bounds == "reject" or x1 >= W or y1 >= H or x2 <= 0 or y2 <= 0:
            where = "lies outside" if x1 >= W or y1 >= H or x2 <= 0 or y2 <= 0 else "is not inside"
            raise ToolCallError(f"the box {shown} {where} the image (width {W}, height {H} in pixels)")
        x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(W)), min(y2, float(H))
    if grammar.enlarge != 1.0:
        cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) * grammar.enlarge / 2, (y2 - y1) * grammar.enlarge / 2
        x1, y1, x2, y2 = max(cx - hw, 0.0), max(cy - hh, 0.0), min(cx + hw, float(W)), min(cy + hh, float(H))
    x1, x2 = _grow(x1, x2, W, min_side)
    y1, y2 = _grow(y1, y2, H, min_side)
    eps = 1e-6  # 0.25 * 300 * (224 / 300) style float noise must not widen the crop by a pixel
    px = (max(0, math.floor(x1 + eps)), max(0, math.floor(y1 + eps)), min(W, math.ceil(x2 - eps)),
          min(H, math.ceil(y2 - eps)))
    w, h = px[2] - px[0], px[3] - px[1]
    if max(w / h, h / w) > grammar.max_aspect:
        raise ToolCallError(f"the box {shown} gives a {w}x{h} px crop; its sides may differ by at most "
                            f"{grammar.max_aspect:g} times")
    return px
