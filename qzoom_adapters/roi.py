"""From heatmap to crop (SPEC §2): sigmoid, sink mask, blur, threshold, box, pixels, 28-px rule."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import QZoomError


@dataclass
class Crop:
    """A box in global-token units (exclusive ends), the same box in source pixels, and the cropped image."""

    box_tok: tuple[int, int, int, int]
    box_px: tuple[int, int, int, int]
    image: object


def gaussian_blur(x: torch.Tensor, kernel: int = 3, sigma: float = 1.0) -> torch.Tensor:
    """Blur a (h, w) map with torchvision's `gaussian_blur` semantics (separable, reflect padding).

    A side of length 1 cannot be reflected; it is padded by replication instead.
    """
    if kernel % 2 != 1 or kernel < 1:
        raise QZoomError(f"blur_kernel must be an odd positive integer, got {kernel}")
    half = (kernel - 1) * 0.5
    xs = torch.linspace(-half, half, kernel, dtype=torch.float32, device=x.device)
    k1 = torch.exp(-0.5 * (xs / sigma) ** 2)
    k1 = k1 / k1.sum()
    k2 = torch.outer(k1, k1)[None, None]
    pad = kernel // 2
    img = x.float()[None, None]
    h, w = x.shape
    mode = "reflect" if min(h, w) > pad else "replicate"
    img = F.pad(img, (pad, pad, pad, pad), mode=mode)
    return F.conv2d(img, k2)[0, 0]


def token_box(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    """Tight box (x1, y1, x2, y2), exclusive ends, of all True cells; None if empty."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if ys.numel() == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _grow_side(lo: float, hi: float, limit: float, min_side: float) -> tuple[float, float]:
    if hi - lo < min_side:
        c = (lo + hi) / 2.0
        lo, hi = c - min_side / 2.0, c + min_side / 2.0
    if lo < 0:
        hi, lo = hi - lo, 0.0
    if hi > limit:
        lo, hi = lo - (hi - limit), float(limit)
    return max(lo, 0.0), min(hi, float(limit))


def box_to_pixels(box_tok, grid_hw, image_wh, min_side: int = 28, window=None) -> tuple[int, int, int, int]:
    """Token box -> source-pixel box, grown to `min_side` px (shift, don't shrink), truncated to int.

    `window` (x0, y0, x1, y1) is the source region the token grid spans (default: the whole image;
    e.g. the centre square for a centre-cropping processor).
    """
    x1, y1, x2, y2 = box_tok
    h_t, w_t = grid_hw
    W, H = image_wh
    _check_size(W, H, min_side)
    if window is None:
        px1, px2, py1, py2 = x1 * W / w_t, x2 * W / w_t, y1 * H / h_t, y2 * H / h_t
    else:
        wx0, wy0, wx1, wy1 = window
        sx, sy = (wx1 - wx0) / w_t, (wy1 - wy0) / h_t
        px1, px2 = max(0.0, wx0 + x1 * sx), min(float(W), wx0 + x2 * sx)
        py1, py2 = max(0.0, wy0 + y1 * sy), min(float(H), wy0 + y2 * sy)
    px1, px2 = _grow_side(px1, px2, W, min_side)
    py1, py2 = _grow_side(py1, py2, H, min_side)
    return int(px1), int(py1), int(px2), int(py2)


def roi_from_heatmap(logits: torch.Tensor, sink: torch.Tensor, roi_threshold: float, kernel: int, sigma: float):
    """(h, w) twig logits -> (blurred map, token box or None)."""
    prob = torch.sigmoid(logits.float()) * sink.to(device=logits.device, dtype=torch.float32)
    blurred = gaussian_blur(prob, kernel, sigma)
    return blurred, token_box(blurred > roi_threshold)


def check_source_image(image, min_side: int) -> None:
    _check_size(*image.size, min_side)


def _check_size(W: int, H: int, min_side: int) -> None:
    if W < min_side or H < min_side:
        raise QZoomError(f"source image is {W}x{H} px; Q-Zoom needs at least {min_side} px per side (min_crop_px)")


def check_grid_aspect(grid_hw, window, index: int = 0) -> None:
    """The token grid (h_t, w_t) must span `window` (x0, y0, x1, y1) at one scale, within a token of rounding
    per side (how aspect-keeping resizers such as Qwen-VL's `smart_resize` round); else the grid belongs to
    another image (or has h and w swapped) and every box would land in the wrong place."""
    h_t, w_t = (int(x) for x in grid_hw)
    x0, y0, x1, y1 = window
    W, H = float(x1 - x0), float(y1 - y0)
    # the tokens-per-pixel scales each side allows; they must overlap
    lo = max((w_t - 1) / W, (h_t - 1) / H)
    hi = min((w_t + 1) / W, (h_t + 1) / H)
    if lo > hi:
        raise QZoomError(
            f"sample {index}: the image grid is {w_t}x{h_t} tokens (w x h) but the source image is {W:.0f}x{H:.0f} px, "
            "another aspect ratio: the grid has h and w swapped or the inputs were made from another image; pass "
            "the source image the inputs were processed from"
        )


def clip_box_to_grid(box_tok, grid_hw):
    h_t, w_t = grid_hw
    x1, y1, x2, y2 = box_tok
    return max(0, x1), max(0, y1), min(w_t, x2), min(h_t, y2)


__all__ = ["Crop", "gaussian_blur", "token_box", "box_to_pixels", "roi_from_heatmap", "check_source_image",
           "check_grid_aspect", "clip_box_to_grid"]
