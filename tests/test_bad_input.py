"""Bad input gets a clear error or a defined behaviour (issue check 8)."""
from __future__ import annotations

import pytest
import torch

import qzoom_adapters as qz
from backbones import _compat
from conftest import IMG, VE, VS, make_inputs, synthetic_image


@pytest.fixture(scope="module")
def zoom(model, ip):
    twig = qz.TwigRPN.from_backbone(model, K=3, T=3)
    gate = qz.DynamicGate.from_backbone(model, K=3, T=3)
    return qz.QZoom(model, image_processor=ip, twig=twig, gate=gate, config=qz.ZoomConfig(gate_threshold=0.0))


def test_no_image_tokens(zoom, ip):
    img = synthetic_image(200, 150)
    inputs = make_inputs([img], [[40, 41]], ip)
    inputs["input_ids"] = torch.where(inputs["input_ids"] == IMG, 40, inputs["input_ids"])
    inputs["input_ids"] = torch.where(inputs["input_ids"] == VS, 41, inputs["input_ids"])
    with pytest.raises(qz.QZoomError, match="no image tokens"):
        zoom.generate_from_inputs(inputs, [img])


def test_two_images_per_sample(zoom, ip):
    imgs = [synthetic_image(200, 150, 1), synthetic_image(200, 150, 2)]
    enc = ip(images=imgs, return_tensors="pt", **_compat.budget_kwargs(12544, 37632))
    n = int(enc["image_grid_thw"][0].prod()) // 4
    ids = torch.tensor([[1, 9, 7, VS] + [IMG] * n + [VE, VS] + [IMG] * n + [VE, 40, 2, 7, 1, 10, 7]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **enc}
    with pytest.raises(qz.QZoomError, match="more than one image per sample"):
        zoom.generate_from_inputs(inputs, imgs[:1])


def test_video_input(zoom, ip):
    img = synthetic_image(200, 150)
    inputs = make_inputs([img], [[40]], ip)
    inputs["pixel_values_videos"] = torch.zeros(4, 1176)
    with pytest.raises(qz.QZoomError, match="video"):
        zoom.generate_from_inputs(inputs, [img])


def test_empty_heatmap_mask_answers_directly(zoom, ip):
    img = synthetic_image(200, 150)
    inputs = make_inputs([img], [[40, 41]], ip)
    zoom.config = qz.ZoomConfig(gate_threshold=0.0, roi_threshold=2.0)
    direct = qz.ZoomConfig(gate_threshold=2.0)
    try:
        out = zoom.generate_from_inputs(inputs, [img], max_new_tokens=4, return_trace=True)[0]
        zoom.config = direct
        ref = zoom.generate_from_inputs(inputs, [img], max_new_tokens=4, return_trace=True)[0]
    finally:
        zoom.config = qz.ZoomConfig(gate_threshold=0.0)
    assert not out.zoomed and out.bbox is None and out.heatmap is not None
    assert out.tokens == ref.tokens
    assert torch.equal(out.trace["first_logits"], ref.trace["first_logits"])


def test_image_smaller_than_min_crop(zoom, ip):
    small = synthetic_image(20, 120)
    inputs = make_inputs([synthetic_image(200, 150)], [[40]], ip)
    with pytest.raises(qz.QZoomError, match="20x120 px"):
        zoom.generate_from_inputs(inputs, [small])


def test_source_images_must_match_batch(zoom, ip):
    img = synthetic_image(200, 150)
    with pytest.raises(qz.QZoomError, match="1 source images for a batch of 2"):
        zoom.generate_from_inputs(make_inputs([img, img], [[40], [41]], ip), [img])


def test_right_padding_rejected(zoom, ip):
    imgs = [synthetic_image(200, 150), synthetic_image(200, 150)]
    inputs = make_inputs(imgs, [[40], [41, 42, 43]], ip)
    inputs["input_ids"] = inputs["input_ids"].flip(1)
    inputs["attention_mask"] = inputs["attention_mask"].flip(1)
    with pytest.raises(qz.QZoomError, match="padding_side='left'"):
        zoom.generate_from_inputs(inputs, imgs)


def test_corrupt_adapter_file(zoom, tmp_path, model):
    zoom.save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(qz.QZoomError, match="corrupt"):
        qz.QZoom.from_pretrained(tmp_path, model=model)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(qz.QZoomError, match="not a valid adapter config"):
        qz.QZoom.from_pretrained(tmp_path, model=model)
    with pytest.raises(qz.QZoomError, match="no adapter_config.json"):
        qz.QZoom.from_pretrained(tmp_path / "missing", model=model)


def test_unknown_config_keys_warn_and_bad_values_fail():
    with pytest.warns(UserWarning, match="unknown keys"):
        cfg = qz.ZoomConfig.model_validate({"gate_threshold": 0.1, "from_the_future": 1})
    assert cfg.gate_threshold == 0.1
    with pytest.raises(ValueError):
        qz.ZoomConfig(position_mode="diagonal")
    with pytest.raises(ValueError):
        qz.ZoomConfig(blur_kernel=4)


def test_unregistered_model_fails_clearly():
    with pytest.raises(qz.QZoomError, match="has no `config.model_type`"):
        qz.get_spec(torch.nn.Linear(2, 2))
