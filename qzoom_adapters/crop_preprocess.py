"""Crop preprocessing: resize and normalise a batch's RoI crops on the host or on the model's device.

* "host" (default): the family's image processor on each crop, one host thread per crop (PIL resizing releases the
  GIL), joined in order and copied to the device. The bit-exact reference.
* "device": the same processor's torchvision form (`compat.fast_image_processor`) on every crop of the batch in one
  call, on the model's device: each crop goes over as uint8 and is resized, normalised and cut into patches there.
  Its pixel values differ slightly from the host path's (tensor vs PIL resampling; `benchmarks/crop_preprocess.py`
  measures how much). Where no torchvision form exists here (no torchvision, or a processor without one) it falls
  back to the host path and warns once per processor and device.
"""
from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

from qzoom_adapters import compat as _compat

CROP_WORKERS = 8  # host threads preparing a batch's crops
PREPROCESS_MODES = ("host", "device")


class CropPreprocessor:
    """Runs a spec's `process_crops` where a `ZoomConfig` says; keeps one device-side processor per (processor, device)."""

    def __init__(self):
        self._device: dict[tuple[int, str], tuple[object, object]] = {}  # key -> (source processor, device processor)
        self.last_where: str | None = None  # where the last call ran: "host" or "device"

    def device_processor(self, image_processor, device: torch.device):
        """The torchvision form of `image_processor` on `device`, or None where there is none (warned once)."""
        key = (id(image_processor), str(device))
        found = self._device.get(key)
        if found is None or found[0] is not image_processor:  # the id of a processor that is gone may come back
            fast = _compat.fast_image_processor(image_processor, device)
            if fast is None:
                warnings.warn(f"crop_preprocess='device': no torchvision-backed form of {type(image_processor).__name__} "
                              "here (torchvision missing, or the family has none); crops are processed on the host",
                              stacklevel=4)
            found = self._device[key] = (image_processor, fast)
        return found[1]

    def __call__(self, spec, image_processor, images: list, cfg, device: torch.device) -> dict:
        """`pixel_values` and `image_grid_thw` of PIL `images` on `device`, at the config's crop budget."""
        fast = self.device_processor(image_processor, device) if cfg.crop_preprocess == "device" else None
        if fast is not None:
            try:
                out = spec.process_crops(fast, images, cfg.crop_min_pixels, cfg.crop_max_pixels)
            except (RuntimeError, TypeError, ValueError) as err:  # e.g. an op this device lacks: host from now on
                self._device[(id(image_processor), str(device))] = (image_processor, None)
                warnings.warn(f"crop_preprocess='device' failed ({type(err).__name__}: {err}); crops are processed "
                              "on the host", stacklevel=3)
            else:
                self.last_where = "device"
                return {k: v.to(device) for k, v in out.items()}
        self.last_where = "host"
        return _on_host(spec, image_processor, images, cfg, device)


def _on_host(spec, image_processor, images: list, cfg, device) -> dict:
    def one(image):
        return spec.process_crops(image_processor, [image], cfg.crop_min_pixels, cfg.crop_max_pixels)

    if len(images) == 1:
        parts = [one(images[0])]
    else:
        with ThreadPoolExecutor(max_workers=min(len(images), CROP_WORKERS)) as pool:
            parts = list(pool.map(one, images))
    return {k: torch.cat([part[k] for part in parts]).to(device, non_blocking=True) for k in parts[0]}
