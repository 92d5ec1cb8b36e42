"""Stage-1 tri-state pseudo-labels (SPEC §4.1): teacher attention maps -> ignore / BG / FG per grid cell."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import QZoomError
from .roi import gaussian_blur, token_box

IGNORE = -100.0


@dataclass
class TriState:
    """Labels of one sample on its (h, w) grid, with the quantities that decided them."""

    labels: torch.Tensor  # (h, w) float32: -100 ignore, 0 BG, 1 FG
    valid: bool
    box: tuple[int, int, int, int] | None  # (x1, y1, x2, y2) token units, exclusive ends
    peak: float  # m = max g


def _square_layout(image_size, grid) -> tuple[int, int, int, int, int, int, int]:
    """(W, H, h, w, side, ox, oy): the image pasted at the centre of a square of side max(W, H) at offset (ox, oy)."""
    W, H = (int(v) for v in image_size)
    h, w = (int(v) for v in grid)
    if min(W, H, h, w) < 1:
        raise QZoomError(f"need positive sizes, got image_size={image_size}, grid={grid}")
    side = max(W, H)
    return W, H, h, w, side, (side - W) // 2, (side - H) // 2


def cells_inside(rect, image_size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """(h, w) bool: cells of the square-padded view whose centre lies inside `rect` (x1, y1, x2, y2, source px).

    The source image (W, H) is pasted at the centre of a square of side max(W, H) (LLaVA's expand2square,
    offset (side-W)//2, (side-H)//2) and that square is resized onto the (h, w) grid.
    """
    W, H, h, w, side, ox, oy = _square_layout(image_size, grid)
    x1, y1, x2, y2 = (int(v) for v in rect)
    # Centre of cell j in square pixels is (2j+1)*side/(2w); compare in integers so edges are exact.
    cx2 = (2 * torch.arange(w) + 1) * side  # = 2w * centre
    cy2 = (2 * torch.arange(h) + 1) * side
    in_x = (cx2 >= 2 * w * (ox + x1)) & (cx2 < 2 * w * (ox + x2))
    in_y = (cy2 >= 2 * h * (oy + y1)) & (cy2 < 2 * h * (oy + y2))
    return in_y[:, None] & in_x[None, :]


def padding_cells(image_size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """(h, w) bool: cells of the square-padded view whose centre lies in the grey padding."""
    W, H = (int(v) for v in image_size)
    return ~cells_inside((0, 0, W, H), image_size, grid)


def _overlap(n_out: int, out_span: tuple[float, float], n_in: int, in_extent: float) -> torch.Tensor:
    """(n_out, n_in): the share of input cell j (of n_in equal cells over [0, in_extent)) that lies in output
    cell i (of n_out equal cells over `out_span`)."""
    lo, hi = out_span
    o = torch.linspace(lo, hi, n_out + 1, dtype=torch.float64)
    e = torch.linspace(0.0, in_extent, n_in + 1, dtype=torch.float64)
    inter = (torch.minimum(o[1:, None], e[None, 1:]) - torch.maximum(o[:-1, None], e[None, :-1])).clamp(min=0)
    return inter / (in_extent / n_in)


def map_to_view(attn: torch.Tensor, image_size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """A map on the square-padded label grid (SPEC §4.1) moved onto the (h, w) grid of the unpadded view.

    Each label cell's value is shared out over the view cells by overlapping area (a sum, so attention mass is
    kept); the padding's mass has no view cell and is dropped. The view spans the whole image (W, H), pasted at
    the centre of the square of side max(W, H), as `cells_inside` places it.
    """
    A = _check_map(attn, "map")
    W, H, h, w, side, ox, oy = _square_layout(image_size, grid)
    gy, gx = A.shape
    ry = _overlap(h, (oy, oy + H), gy, side)
    rx = _overlap(w, (ox, ox + W), gx, side)
    return (ry @ A.double() @ rx.T).float()


def tristate_labels(grounding, sink=None, padding=None, *, sink_threshold=0.01, fg_ratio=0.25, bg_ratio=0.05,
                    max_box_fraction=0.5, min_peak=5e-3, blur_kernel=3, blur_sigma=1.0) -> TriState:
    """Tri-state labels from grounding map A, optional sink map S and optional padding mask (all (h, w))."""
    A = _check_map(grounding, "grounding map A")
    h, w = A.shape
    S = torch.zeros_like(A) if sink is None else _check_map(sink, "sink map S", (h, w)).to(A.device)
    if padding is None:
        pad = torch.zeros((h, w), dtype=torch.bool, device=A.device)
    else:
        if not isinstance(padding, torch.Tensor) or padding.dtype != torch.bool:
            raise QZoomError("padding must be a bool torch.Tensor (see padding_cells)")
        if tuple(padding.shape) != (h, w):
            raise QZoomError(f"padding has shape {tuple(padding.shape)} but A has shape {(h, w)}")
        pad = padding.to(A.device)

    not_sink_s = S < sink_threshold
    g = A * (not_sink_s & ~pad)
    peak = g.max()
    m = float(peak)
    fg = g > fg_ratio * m
    box = None
    if fg.any():
        # Blur g*FG scaled by 1/m: values stay O(1), so no neighbour underflows to 0 however small m is;
        # cells beyond the kernel's reach get exactly 0 and stay out of the box.
        box = token_box(gaussian_blur(g * fg / m, blur_kernel, blur_sigma) > 0)

    labels = torch.full((h, w), IGNORE, dtype=torch.float32, device=A.device)
    # Compare the peak in the map's float32, so a peak stored as float32(5e-3) passes a 5e-3 threshold.
    valid = box is not None and _area(box) < max_box_fraction * h * w and bool(peak >= min_peak)
    if valid:
        outside = torch.ones((h, w), dtype=torch.bool, device=A.device)
        x1, y1, x2, y2 = box
        outside[y1:y2, x1:x2] = False
        bg = (outside & (A * not_sink_s < bg_ratio * m)) | pad
        labels[bg] = 0.0
        labels[fg] = 1.0  # FG wins over BG
    return TriState(labels=labels, valid=valid, box=box, peak=m)


def _area(box: tuple[int, int, int, int]) -> int:
    x1, y1, x2, y2 = box
    return (x2 - x1) * (y2 - y1)


def _check_map(x, name: str, shape: tuple[int, int] | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise QZoomError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise QZoomError(f"{name} must be a 2-D (h, w) map, got shape {tuple(x.shape)}")
    if shape is not None and tuple(x.shape) != shape:
        raise QZoomError(f"{name} has shape {tuple(x.shape)} but A has shape {shape}")
    x = x.float()
    if torch.isnan(x).any():
        raise QZoomError(f"{name} contains NaN values")
    if torch.isinf(x).any() or (x < 0).any():
        raise QZoomError(f"{name} must be finite and non-negative (averaged post-softmax attention)")
    return x


__all__ = ["TriState", "map_to_view", "padding_cells", "tristate_labels"]
