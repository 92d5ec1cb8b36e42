"""Source images: opening files with a clear error, and modes PIL's `convert("RGB")` would get wrong.

What the pipeline accepts as a source image: a `PIL.Image.Image`, or a `str` / `os.PathLike` path that is
opened here. Arrays, tensors and None are refused (`PIL.Image.fromarray` converts an HxWx3 uint8 array).

Modes: 8-bit modes (RGB, L, P, CMYK, YCbCr, 1, ...) go through PIL's own conversion; modes with
transparency are composited on white first, as transformers' image processors do. 16-bit
grayscale (`I;16`, `I;16L`, `I;16B`, `I;16N`, and `I` holding values up to 65535) is scaled to 8 bits
(value * 255 / 65535) before the conversion, which would otherwise clip everything above 255 to white.
32-bit integer images with larger values and float (`F`) images have no agreed range and are refused.
"""
from __future__ import annotations

import numbers
import os
import stat
import threading
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import QZoomError

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def check_regular_file(path, what: str) -> Path:
    """`path` as a Path; a clear error if it is missing, a folder, or not a regular file (a FIFO would block)."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise QZoomError(f"{what} {path} does not exist") from None
    except OSError as err:
        raise QZoomError(f"cannot read {what} {path}: {err.strerror or err}") from None
    if stat.S_ISDIR(st.st_mode):
        raise QZoomError(f"{what} {path} is a folder; give the path of a file")
    if not stat.S_ISREG(st.st_mode):
        raise QZoomError(f"{what} {path} is not a regular file (a pipe or device?); give the path of a file")
    return path


def load_image(path) -> Image.Image:
    """Open and decode the image file `path` as RGB (see the module doc for modes); clear errors otherwise."""
    path = check_regular_file(path, "image")
    if path.stat().st_size == 0:
        raise QZoomError(f"image {path} is an empty file (0 bytes)")
    try:
        with Image.open(path) as im:
            _load_strict(im)
            return to_rgb(im, str(path))
    except Image.DecompressionBombError as err:
        raise QZoomError(f"image {path} is too large to decode safely ({err}); downscale it first, or raise "
                         "PIL.Image.MAX_IMAGE_PIXELS if you trust the file") from None
    except UnidentifiedImageError:
        raise QZoomError(f"{path} is not an image PIL can read (wrong format or not an image file)") from None
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt data (PIL raises these)
        raise QZoomError(f"image {path} is truncated or corrupt ({err})") from None


_STRICT_LOAD = threading.Lock()


def _load_strict(im: Image.Image) -> None:
    """`im.load()` that refuses truncated data even when another library (lmms-eval does, on import) has set PIL's
    process-wide `ImageFile.LOAD_TRUNCATED_IMAGES`, which would pad a cut file silently; the flag is restored."""
    from PIL import ImageFile

    with _STRICT_LOAD:
        saved = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            im.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """An RGB view of a PIL image: the image itself when already RGB; 16-bit grayscale scaled to 8 bits."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT or mode == "I":
        arr = np.asarray(image).astype(np.int64)
        if mode == "I" and (arr.min(initial=0) < 0 or arr.max(initial=0) > 65535):
            raise QZoomError(f"{name} is a 32-bit integer image with values outside 0..65535; convert it to "
                             "8-bit RGB yourself (no agreed scale)")
        if mode == "I" and arr.max(initial=0) <= 255:
            eight = arr.astype(np.uint8)  # 8-bit data stored as 32-bit (e.g. after a PIL convert("I"))
        else:
            eight = ((arr * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(eight).convert("RGB")  # 2-D uint8: mode L
    if mode == "F":
        raise QZoomError(f"{name} is a floating-point (mode F) image; convert it to 8-bit RGB yourself "
                         "(no agreed value range)")
    if "A" in mode or "transparency" in image.info:
        # transparent pixels on white, as transformers' own `convert_to_rgb` does for the global view
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def source_image(image, index: int | str = 0) -> Image.Image:
    """One source image of a batch as RGB PIL: a PIL image or a path; anything else is refused clearly."""
    if isinstance(image, Image.Image):
        return to_rgb(image, f"images[{index}]")
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, (list, tuple)):
        raise QZoomError(f"images[{index}] is a {type(image).__name__}: give one source image per sample here "
                         "(QZoom.generate and generate_from_inputs take a list of images per sample)")
    kind = "None" if image is None else type(image).__name__
    hint = " (PIL.Image.fromarray(arr) converts an HxWx3 uint8 array)" if hasattr(image, "shape") else ""
    raise QZoomError(f"images[{index}] is {kind}; pass a PIL.Image or the path of an image file{hint}")


def source_images(images) -> list[Image.Image]:
    """`source_image` of every entry; a single image (not a list) is refused with a hint."""
    if isinstance(images, (Image.Image, str, os.PathLike)) or images is None:
        raise QZoomError("images must be a list with one source image per sample, e.g. [image]")
    return [source_image(im, i) for i, im in enumerate(images)]


def source_image_groups(images) -> list[list[Image.Image]]:
    """Per sample, its source images in prompt order: an entry is one image (a PIL image or a path) or a non-empty
    list/tuple of them (several images per sample)."""
    if isinstance(images, (Image.Image, str, os.PathLike)) or images is None:
        raise QZoomError("images must be a list with one source image per sample (or one list of images per sample), "
                         "e.g. [image] or [[image_a, image_b]]")
    groups = []
    for i, entry in enumerate(images):
        if not isinstance(entry, (list, tuple)):
            groups.append([source_image(entry, i)])
        elif not entry:
            raise QZoomError(f"images[{i}] is an empty {type(entry).__name__}: every sample needs an image")
        else:
            groups.append([source_image(im, f"{i}][{k}") for k, im in enumerate(entry)])
    return groups


def roi_image_indices(roi_image, groups: list[list]) -> list[int]:
    """Per sample, the index (0-based, from the start) of its RoI image among `groups[i]`: `roi_image[i]` (None:
    the last image; negative: from the end), or the last image of every sample when `roi_image` is None."""
    if roi_image is None:
        return [len(g) - 1 for g in groups]
    if isinstance(roi_image, (str, bytes)) or not hasattr(roi_image, "__len__"):
        raise QZoomError(f"roi_image must be a list with one entry per sample, None or an image index, got "
                         f"{roi_image!r}: for one sample pass [index]")
    if len(roi_image) != len(groups):
        raise QZoomError(f"roi_image has {len(roi_image)} entries for a batch of {len(groups)}")
    out = []
    for i, (k, group) in enumerate(zip(roi_image, groups)):
        n = len(group)
        if k is None:
            k = n - 1
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise QZoomError(f"roi_image[{i}] must be None or an integer image index, got {k!r}")
        if not -n <= k < n:
            raise QZoomError(f"roi_image[{i}] = {k}, but sample {i} has {n} image(s) (valid: 0..{n - 1}, or "
                             f"-{n}..-1 from the end)")
        out.append(int(k) % n)
    return out
