"""Pipeline behaviour beyond the conformance kit: hooks, branch points, Qwen3-VL deepstack and sinks, LLaVA boxes."""
from __future__ import annotations

import pytest
import torch

import qzoom_adapters as qz
from qzoom_adapters.backbones.qwen2_5_vl import Qwen2_5_VLSpec
from qzoom_adapters.backbones.qwen3_vl import Qwen3VLSpec
from qzoom_adapters.roi import box_to_pixels


@torch.no_grad()
def test_capture_hook_records_prefill_only_and_is_removed(qwen25):
    inputs = qwen25.inputs(qwen25.images[:1], qwen25.questions[:1])
    spec = qz.get_spec(qwen25.model)
    with qz.capture_layer_input(spec.layers[3]) as cap:
        qwen25.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert cap.calls == 1 and cap.hidden.shape[1] == inputs["input_ids"].shape[1]
    assert "position_embeddings" in cap.kwargs
    assert all(not m._forward_pre_hooks for m in qwen25.model.modules())
    before = cap.hidden.clone()  # the clone is independent of the backbone's later in-place writes
    qwen25.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert torch.equal(before, cap.hidden)


def test_branch_point_errors():
    torch.manual_seed(0)
    shallow = Qwen2_5_VLSpec.model_class()._from_config(Qwen2_5_VLSpec.tiny_config(text={"num_hidden_layers": 4}))
    with pytest.raises(qz.QZoomError, match="K\\+T <= 4"):
        qz.TwigRPN.from_backbone(shallow, K=2, T=3)
    qwen3 = Qwen3VLSpec.model_class()._from_config(Qwen3VLSpec.tiny_config())
    with pytest.raises(qz.QZoomError, match="branch at K >= 2"):  # deepstack writes after layers 0 and 1
        qz.DynamicGate.from_backbone(qwen3, K=1, T=3)


@torch.no_grad()
def test_qwen3_roi_pass_uses_the_crops_deepstack_features(qwen3):
    img, q = qwen3.images[0], qwen3.questions[0]
    inputs = qwen3.inputs([img], [q])
    zoom = qwen3.zoom(gate_threshold=0.0, roi_threshold=0.0)
    feats = zoom.spec.encode_images(inputs["pixel_values"], inputs["image_grid_thw"])
    assert len(feats.deepstack) == 2 and all(d.abs().sum() > 0 for d in feats.deepstack)
    with_ds = zoom.generate_from_inputs(inputs, [img], max_new_tokens=2, return_trace=True)[0]
    # the same run with the RoI tokens' deepstack features dropped (pass A keeps its own)
    zoom.spec.decoder_inputs = lambda mask, f: {} if mask.shape[1] < inputs["input_ids"].shape[1] else \
        Qwen3VLSpec.decoder_inputs(zoom.spec, mask, f)
    without = zoom.generate_from_inputs(inputs, [img], max_new_tokens=2, return_trace=True)[0]
    assert with_ds.bbox == without.bbox
    gap = (with_ds.trace["first_logits"] - without.trace["first_logits"]).abs().max()
    assert gap > 1e-3, f"dropping the crop's deepstack features changed the logits by only {gap}"


def test_qwen3_sink_mask_thresholds_first_token_scores():
    spec = Qwen3VLSpec.__new__(Qwen3VLSpec)
    scores = torch.tensor([[0.0, 2.0], [1.0986, 1.0987]])  # sigmoid: 0.5, 0.88, 0.74999, 0.75001
    mask = spec.sink_mask(2, 2, first_token_scores=scores)
    assert mask.tolist() == [[1.0, 0.0], [1.0, 0.0]]
    assert spec.sink_mask(2, 3).tolist() == [[1.0] * 3] * 2


@torch.no_grad()
def test_twig_heatmap_equals_eager_attention_logits(qwen3):
    """The twig's head-mean q·k equals what the layer's own eager attention computes (up to a per-head constant)."""
    model = qwen3.fresh_model(0)
    model.config._attn_implementation = "eager"
    model.config.text_config._attn_implementation = "eager"
    spec = qz.get_spec(model)
    inputs = qwen3.inputs(qwen3.images[:1], qwen3.questions[:1])
    twig = qz.TwigRPN.from_backbone(model, K=3, T=1)  # one layer: the heatmap comes from layers[3] itself
    zoom = qz.QZoom(model, qwen3.processor, twig=twig, config=qz.ZoomConfig(roi_threshold=2.0))
    a = zoom._pass_a(inputs, qwen3.images[:1])
    last, _ = twig.query_scores(spec, a.hK, a.kwargs, zoom.trunk, a.mask.argmax(dim=1))
    layer = twig.layers[0]
    kw = {k: v for k, v in a.kwargs.items() if k in ("position_embeddings", "attention_mask")}
    _, weights = layer.self_attn(hidden_states=layer.input_layernorm(a.hK), **kw)
    logp = weights[0, :, -1].log().mean(dim=0)  # (S,) head-mean log-probabilities of the last query
    torch.testing.assert_close(last[0] - last[0, 0], logp - logp[0], rtol=0, atol=1e-4)


def test_box_mapping_through_a_centre_crop_window(llava):
    spec = qz.get_spec(llava.model)
    window = spec.source_window(llava.image_processor, (300, 200))  # processor keeps the central 200x200
    assert window == pytest.approx((50.0, 0.0, 250.0, 200.0))
    assert box_to_pixels((0, 0, 3, 3), (6, 6), (300, 200), 28, window) == (50, 0, 150, 100)
    assert box_to_pixels((0, 0, 3, 3), (6, 6), (300, 200), 28) == (0, 0, 150, 100)
    with pytest.raises(qz.QZoomError, match="fixed size"):
        spec.process_crops(llava.image_processor, [llava.images[0]], 100, 200)
    with pytest.raises(qz.QZoomError, match="position_mode='sequential'"):
        zoom = llava.zoom(gate_threshold=0.0, roi_threshold=0.0, position_mode="aligned")
        zoom.generate_from_inputs(llava.inputs(llava.images[:1], ["What?"]), llava.images[:1], max_new_tokens=1)


def test_unset_position_mode_takes_the_backbone_default(qwen25, llava, tmp_path):
    assert qz.ZoomConfig().position_mode is None
    assert qwen25.zoom().config.position_mode == "aligned"  # SPEC §3.2: aligned for new M-RoPE adapters
    zoom = llava.zoom()
    assert zoom.config.position_mode == "sequential"  # 1-D RoPE: the crop continues the positions
    zoom.config = qz.ZoomConfig(gate_threshold=0.5)
    assert zoom.config.position_mode == "sequential"
    zoom.save_pretrained(tmp_path)
    assert '"position_mode": "sequential"' in (tmp_path / "adapter_config.json").read_text()


def test_branch_copies_do_not_take_over_trunk_hooks(qwen25):
    model = qwen25.fresh_model(0)
    layer = qz.get_spec(model).layers[3]
    handle = layer.register_forward_hook(lambda m, a, o: None)
    try:
        twig = qz.TwigRPN.from_backbone(model, K=3, T=2)
        assert not twig.layers[0]._forward_hooks and layer._forward_hooks  # the trunk keeps its hook
    finally:
        handle.remove()


def test_inputs_are_used_on_the_model_device_and_the_callers_stay_put():
    """`generate_from_inputs` (and so `generate`, whose processor output is on the CPU) works on copies of the
    inputs on the model's input device: a GPU model is given CPU processor output by `generate` itself."""
    from qzoom_adapters.trunk import inputs_on

    inputs = {"input_ids": torch.ones(1, 3, dtype=torch.long), "pixel_values": torch.zeros(4, 2), "note": "x"}
    moved = inputs_on(inputs, torch.device("meta"))
    assert moved is not inputs and moved["note"] == "x"
    assert all(v.device.type == "meta" for v in moved.values() if isinstance(v, torch.Tensor))
    assert all(v.device.type == "cpu" for v in inputs.values() if isinstance(v, torch.Tensor))
    assert moved["pixel_values"].dtype == torch.float32 and moved["input_ids"].dtype == torch.long
