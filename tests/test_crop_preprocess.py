"""Crop preprocessing on the device (`ZoomConfig(crop_preprocess="device")`): the torchvision form of the family's
processor where this environment has one; otherwise the host path, bit-exact, with one warning. How far the two
differ on a GPU: `benchmarks/crop_preprocess.py` (run by `qzoom bench speed`)."""
from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

from qzoom_adapters import QZoomError, compat
from qzoom_adapters.config import ZoomConfig
from qzoom_adapters.crop_preprocess import CropPreprocessor
from qzoom_adapters.spec import get_spec

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


def test_the_torchvision_form_is_named_per_transformers_line(qwen25, llava):
    for kit, base in ((qwen25, "Qwen2VLImageProcessor"), (llava, "CLIPImageProcessor")):
        assert not compat.torchvision_backed(kit.image_processor)  # the offline kits use the PIL form
        expected = base if compat.IS_V5 else base + "Fast"  # 5.x: <Name> beside <Name>Pil; 4.57: <Name>Fast
        assert compat.fast_image_processor_class_name(kit.image_processor) == expected


@pytest.mark.skipif(HAS_TORCHVISION, reason="torchvision is installed: the device path itself is tested below")
@torch.no_grad()
def test_device_mode_without_torchvision_is_the_host_path_bit_for_bit(qwen25, one_thread):
    assert compat.fast_image_processor(qwen25.image_processor, "cpu") is None
    zoom = qwen25.zoom(gate_threshold=0.0, roi_threshold=0.0)
    inputs, images = qwen25.inputs(qwen25.images, qwen25.questions), qwen25.images
    host = zoom.generate_from_inputs(inputs, images, max_new_tokens=3, return_trace=True)
    device = zoom.with_config(crop_preprocess="device")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = device.generate_from_inputs(inputs, images, max_new_tokens=3, return_trace=True)
        device.generate_from_inputs(inputs, images, max_new_tokens=3)
    said = [str(w.message) for w in caught if "crop_preprocess='device'" in str(w.message)]
    assert len(said) == 1 and "processed on the host" in said[0]  # once per processor and device, not per call
    assert device.crop_preprocessor.last_where == "host"
    for h, d in zip(host, first):
        assert h.zoomed and h.tokens == d.tokens and torch.equal(h.trace["first_logits"], d.trace["first_logits"])


@pytest.mark.skipif(not HAS_TORCHVISION, reason="needs torchvision (the torchvision-backed image processors)")
@torch.no_grad()
def test_device_mode_with_torchvision_runs_the_torchvision_form_close_to_the_host_path(qwen25):
    fast = compat.fast_image_processor(qwen25.image_processor, "cpu")
    assert compat.torchvision_backed(fast)
    spec, cfg = get_spec(qwen25.model), ZoomConfig(crop_preprocess="device")
    crops = [im.crop((0, 0, im.width // 2, im.height // 2)) for im in qwen25.images]
    pre = CropPreprocessor()
    dev = pre(spec, qwen25.image_processor, crops, cfg, torch.device("cpu"))
    assert pre.last_where == "device"
    host = pre(spec, qwen25.image_processor, crops, ZoomConfig(), torch.device("cpu"))
    assert torch.equal(dev["image_grid_thw"], host["image_grid_thw"])
    assert (dev["pixel_values"] - host["pixel_values"]).abs().max() < 0.2  # resampling differences only


def test_bad_crop_preprocess_values_fail_clearly(qwen25):
    with pytest.raises(QZoomError, match="crop_preprocess: Input should be 'host' or 'device'"):
        qwen25.zoom().config = {"crop_preprocess": "gpu"}
