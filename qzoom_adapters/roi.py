"""From heatmap to crop (SPEC §2): sigmoid, sink mask, blur, threshold, box, pixels, 28-px rule.

`crop_from_heatmap` is the whole step for one sample; `crop_from_box` is the same crop for a box given in source
pixels (the `boxes=` seam of `QZoom.generate_from_inputs`).
"""
from __future__ import annotations

import math
import numbers
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


def components(mask: torch.Tensor) -> torch.Tensor:
    """Labels (h, w) of the 8-connected components of a boolean mask: 0 off the mask, else 1..n (each
    component's label is one more than the smallest flat index among its cells)."""
    h, w = mask.shape
    flat = torch.arange(1, h * w + 1, dtype=torch.float32, device=mask.device).view(h, w)
    big = float(h * w + 1)
    label = torch.where(mask, flat, torch.full_like(flat, big))
    while True:  # each pass spreads the smallest label one cell further (at most h*w passes)
        spread = -F.max_pool2d(-label[None, None], 3, stride=1, padding=1)[0, 0]
        new = torch.where(mask, torch.minimum(label, spread), label)
        if torch.equal(new, label):
            break
        label = new
    return torch.where(mask, label, torch.zeros_like(label)).long()


def region_mask(blurred: torch.Tensor, roi_threshold: float, region: str = "union") -> torch.Tensor:
    """The cells the box is drawn around: every cell above `roi_threshold` (SPEC §2 step 5, "union"), or only
    the 8-connected component of them with the largest blurred mass ("largest"; SPEC's optional extension, so a
    stray cell far from the peak does not stretch the box over the image)."""
    mask = blurred > roi_threshold
    if region == "union" or not bool(mask.any()):
        return mask
    if region != "largest":
        raise QZoomError(f"roi_region must be 'union' or 'largest', got {region!r}")
    label = components(mask)
    ids = torch.unique(label[mask])
    mass = torch.stack([blurred[label == i].sum() for i in ids])
    return label == ids[int(torch.argmax(mass))]


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


def blurred_region(logits: torch.Tensor, sink: torch.Tensor, roi_threshold: float, kernel: int, sigma: float,
                   region: str = "union") -> tuple[torch.Tensor, torch.Tensor]:
    """(h, w) twig logits -> (blurred map, the cell mask the box is drawn around); `region` as for `region_mask`."""
    prob = torch.sigmoid(logits.float()) * sink.to(device=logits.device, dtype=torch.float32)
    blurred = gaussian_blur(prob, kernel, sigma)
    return blurred, region_mask(blurred, roi_threshold, region)


def roi_from_heatmap(logits: torch.Tensor, sink: torch.Tensor, roi_threshold: float, kernel: int, sigma: float,
                     region: str = "union"):
    """(h, w) twig logits -> (blurred map, token box or None); `region` as for `region_mask`."""
    blurred, mask = blurred_region(logits, sink, roi_threshold, kernel, sigma, region)
    return blurred, token_box(mask)


def refine_box(blurred: torch.Tensor, coarse: torch.Tensor, roi_threshold: float, factor: int):
    """The sub-cell box (x1, y1, x2, y2) in units of 1/`factor` of a cell (exclusive ends) of the `(h, w)` blurred
    map: the map bilinearly upsampled `factor` times (half-pixel centres, so a cell's centre keeps its value),
    thresholded, and kept only inside the `coarse` cell mask (the region SPEC's box is drawn around). None when
    no fine cell passes (cannot happen for factor 1, where it is the coarse box)."""
    if factor == 1:
        return token_box(coarse)
    fine = F.interpolate(blurred.float()[None, None], scale_factor=factor, mode="bilinear", align_corners=False)[0, 0]
    inside = coarse.repeat_interleave(factor, 0).repeat_interleave(factor, 1)
    return token_box((fine > roi_threshold) & inside)


def _fine_to_cells(box_fine, factor: int) -> tuple[int, int, int, int]:
    """The grid cells a fine box touches (floor of its start, ceiling of its end)."""
    x1, y1, x2, y2 = box_fine
    return x1 // factor, y1 // factor, -(-x2 // factor), -(-y2 // factor)


def _twig_mask(spec, logits: torch.Tensor, first_map, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """(h_t, w_t) twig logits -> (blurred map, the cell mask of `cfg.roi_region`): SPEC §2 steps 1-5."""
    sink = spec.sink_mask(*logits.shape, first_token_scores=first_map)
    return blurred_region(logits, sink, cfg.roi_threshold, cfg.blur_kernel, cfg.blur_sigma, cfg.roi_region)


def twig_region(spec, logits: torch.Tensor, first_map, cfg) -> tuple[torch.Tensor, tuple | None]:
    """(h_t, w_t) twig logits -> (blurred map, token box clipped to the grid, or None for an empty mask)."""
    blur, mask = _twig_mask(spec, logits, first_map, cfg)
    box = token_box(mask)
    return blur, None if box is None else clip_box_to_grid(box, logits.shape)


def crop_tokens(spec, box_tok, grid_hw, image, image_processor, min_side: int) -> Crop:
    """The `Crop` of the source `image` that token box `box_tok` of a (h_t, w_t) grid covers (28-px rule)."""
    window = spec.source_window(image_processor, image.size)
    box_px = box_to_pixels(box_tok, tuple(grid_hw), image.size, min_side, window)
    return _crop(box_tok, box_px, image)


def _crop(box_tok, box_px, image) -> Crop:
    return Crop(box_tok, box_px, image.convert("RGB").crop(box_px))


def crop_from_heatmap(spec, logits, first_map, image, image_processor, cfg):
    """SPEC §2 for one sample: (h_t, w_t) twig logits -> (blurred map, `Crop` of the source image or None).

    With `cfg.roi_refine` f > 1 the pixel box is the sub-cell box of `refine_box` and the token box (for the RoI
    pass's aligned positions) is the grid cells it touches."""
    blur, mask = _twig_mask(spec, logits, first_map, cfg)
    box = token_box(mask)
    if box is None:
        return blur, None
    f = cfg.roi_refine
    # even factors put no fine centre on a cell's centre, so a cell just above the threshold may pass nowhere
    fine = refine_box(blur, mask, cfg.roi_threshold, f) if f > 1 else None
    if fine is None:  # SPEC's box
        return blur, crop_tokens(spec, box, logits.shape, image, image_processor, cfg.min_crop_px)
    h_t, w_t = logits.shape
    window = spec.source_window(image_processor, image.size)
    box_px = box_to_pixels(fine, (h_t * f, w_t * f), image.size, cfg.min_crop_px, window)
    return blur, _crop(_fine_to_cells(fine, f), box_px, image)


def check_box(box, image_size, index: int = 0) -> tuple[float, float, float, float]:
    """A caller's (x1, y1, x2, y2) source-pixel box: four finite numbers with x1 < x2, y1 < y2 inside the image."""
    W, H = image_size
    if isinstance(box, (str, bytes)) or not hasattr(box, "__len__") or len(box) != 4 or not all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in box):
        raise QZoomError(f"boxes[{index}] must be None or (x1, y1, x2, y2) in source pixels, got {box!r}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H):
        raise QZoomError(f"boxes[{index}] = {tuple(box)} is not a box inside the {W}x{H} px source image "
                         "(needs 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height)")
    return x1, y1, x2, y2


def pixels_to_token_box(box_px, grid_hw, image_size, window=None) -> tuple[int, int, int, int]:
    """Source-pixel box -> the (x1, y1, x2, y2) token box (exclusive ends) of the grid cells it overlaps by more
    than a pixel (the slack absorbs whole-pixel rounding, so `box_to_pixels` output maps back to its token box),
    at least one cell, within the grid. `window` as for `box_to_pixels` (the source region the grid spans)."""
    h_t, w_t = (int(v) for v in grid_hw)
    x0, y0, x1w, y1w = window if window is not None else (0.0, 0.0, float(image_size[0]), float(image_size[1]))
    sx, sy = (x1w - x0) / w_t, (y1w - y0) / h_t
    px1, py1, px2, py2 = box_px

    def side(lo: float, hi: float, origin: float, scale: float, n: int) -> tuple[int, int]:
        a = min(max(math.floor((lo - origin + 1) / scale), 0), n - 1)
        b = min(max(math.ceil((hi - origin - 1) / scale), a + 1), n)
        return a, b

    tx1, tx2 = side(px1, px2, x0, sx, w_t)
    ty1, ty2 = side(py1, py2, y0, sy, h_t)
    return tx1, ty1, tx2, ty2


def crop_from_box(spec, box, grid_hw, image, image_processor, min_side: int, index: int = 0) -> Crop:
    """The `Crop` for a caller's source-pixel box: that box (ends rounded outwards to whole pixels), grown to
    `min_side` px like a twig box; its token box (for aligned positions) is the grid cells it touches."""
    x1, y1, x2, y2 = check_box(box, image.size, index)
    W, H = image.size
    _check_size(W, H, min_side)
    px1, px2 = _grow_side(math.floor(x1), math.ceil(x2), W, min_side)
    py1, py2 = _grow_side(math.floor(y1), math.ceil(y2), H, min_side)
    box_px = int(px1), int(py1), int(px2), int(py2)
    window = spec.source_window(image_processor, image.size)
    box_tok = pixels_to_token_box(box_px, grid_hw, image.size, window)
    return _crop(box_tok, box_px, image)


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


__all__ = ["Crop", "gaussian_blur", "token_box", "components", "region_mask", "box_to_pixels", "blurred_region", "roi_from_heatmap",
           "check_source_image", "check_grid_aspect", "clip_box_to_grid", "twig_region", "refine_box", "crop_tokens", "crop_from_heatmap", "check_box",
           "pixels_to_token_box", "crop_from_box"]
