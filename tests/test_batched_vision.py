"""One vision-tower call per batch: the global images of a batch go through the tower together, and so do its crops;
either equals encoding image by image."""
from __future__ import annotations

import pytest
import torch

from qzoom_adapters.config import ZoomConfig
from qzoom_adapters.crop_preprocess import CropPreprocessor
from qzoom_adapters.spec import get_spec


def _encode_each(spec, pixel_values, grids):
    rows = (grids[:, 0] * grids[:, 1] * grids[:, 2]).tolist()
    parts = [spec.encode_images(pv, g[None]) for pv, g in zip(pixel_values.split(rows), grids)]
    return torch.cat([p.embeds for p in parts]), [torch.cat(d) for d in zip(*(p.deepstack for p in parts))]


@pytest.mark.parametrize("family", ["qwen25", "qwen3"])
@torch.no_grad()
def test_pipeline_calls_the_tower_once_for_the_globals_and_once_for_the_crops(family, request, one_thread):
    kit = request.getfixturevalue(family)
    spec = get_spec(kit.model)
    calls = []
    handle = spec.vision_tower.register_forward_pre_hook(lambda module, args, kwargs: calls.append(
        int(kwargs.get("grid_thw", args[1] if len(args) > 1 else None).shape[0])), with_kwargs=True)
    try:
        zoom = kit.zoom(gate_threshold=0.0, roi_threshold=0.0)
        outs = zoom.generate_from_inputs(kit.inputs(kit.images, kit.questions), kit.images, max_new_tokens=2)
        assert all(o.zoomed for o in outs)
        assert calls == [3, 3]  # three global images in one call, three crops in one call
        calls.clear()
        zoom.with_config(gate_threshold=2.0).generate_from_inputs(kit.inputs(kit.images, kit.questions), kit.images,
                                                                  max_new_tokens=2)
        assert calls == [3]  # nobody zooms: no crop call
    finally:
        handle.remove()


@pytest.mark.parametrize("family", ["qwen25", "qwen3"])
@torch.no_grad()
def test_batched_global_and_crop_features_equal_image_by_image(family, request, one_thread):
    kit = request.getfixturevalue(family)
    spec = get_spec(kit.model)
    inputs = kit.inputs(kit.images, kit.questions)
    batch = spec.encode_images(inputs["pixel_values"], inputs["image_grid_thw"])
    each, each_deep = _encode_each(spec, inputs["pixel_values"], inputs["image_grid_thw"])
    torch.testing.assert_close(batch.embeds, each, rtol=0, atol=1e-5)
    for a, b in zip(batch.deepstack, each_deep, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    crops = [im.crop((10, 20, 10 + im.width // 2, 20 + im.height // 2)) for im in kit.images]
    enc = CropPreprocessor()(spec, kit.image_processor, crops, ZoomConfig(), torch.device("cpu"))
    one_by_one = [spec.process_crops(kit.image_processor, [c], None, None) for c in crops]
    assert torch.equal(enc["pixel_values"], torch.cat([o["pixel_values"] for o in one_by_one]))
    assert torch.equal(enc["image_grid_thw"], torch.cat([o["image_grid_thw"] for o in one_by_one]))
    crop_each, _ = _encode_each(spec, enc["pixel_values"], enc["image_grid_thw"])
    torch.testing.assert_close(spec.encode_images(enc["pixel_values"], enc["image_grid_thw"]).embeds, crop_each,
                               rtol=0, atol=1e-5)
