"""Invariants of the gated pipeline on tiny random Qwen2.5-VL models (issue checks 1-6)."""
from __future__ import annotations

import torch
import pytest

import qzoom_adapters as qz
from backbones import _compat
from qzoom_adapters.hooks import run_until
from qzoom_adapters.trunk import Trunk
from conftest import IMG, make_inputs, synthetic_image, tiny_model

K, T = 3, 3


def _zoom(model, ip, **cfg):
    twig = qz.TwigRPN.from_backbone(model, K=K, T=T)
    gate = qz.DynamicGate.from_backbone(model, K=K, T=T)
    return qz.QZoom(model, image_processor=ip, twig=twig, gate=gate, config=qz.ZoomConfig(**cfg))


def _pass_a(model, inputs):
    spec = qz.get_spec(model)
    trunk = Trunk(spec)
    emb = trunk.embed(inputs["input_ids"], torch.cat(spec.encode_images(inputs["pixel_values"], inputs["image_grid_thw"])))
    pos = spec.position_ids(inputs["input_ids"], inputs["attention_mask"], inputs["image_grid_thw"])
    return spec, trunk, emb, pos


@torch.no_grad()
def test_twig_copy_equals_trunk_layers(model, ip, batch3):
    images, qs = batch3
    inputs = make_inputs(images, qs, ip)
    spec, trunk, emb, pos = _pass_a(model, inputs)
    twig = qz.TwigRPN.from_backbone(model, K=K, T=T)
    for a, b in zip(twig.parameters(), torch.nn.ModuleList(spec.layers[K : K + T]).parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()  # equal values, separate storage
    kw = dict(inputs_embeds=emb, attention_mask=inputs["attention_mask"], position_ids=pos, use_cache=False)
    h_in = run_until(spec.text_model, spec.layers[K], **kw)
    h_out = run_until(spec.text_model, spec.layers[K + T], **kw)
    ours = trunk.run_layers(twig.layers, h_in.hidden, h_in.kwargs)
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(ours[valid], h_out.hidden[valid], rtol=0, atol=1e-5)


@torch.no_grad()
def test_never_zoom_equals_hf_generate(ip, batch3):
    model = tiny_model(seed=1)
    model.generation_config.eos_token_id = 2
    images, qs = batch3
    zoom = _zoom(model, ip, gate_threshold=1.5)
    for img, q in zip(images, qs):
        inputs = make_inputs([img], [q], ip)
        out = zoom.generate_from_inputs(inputs, [img], max_new_tokens=12)[0]
        ref = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        ref_tokens = ref[0, inputs["input_ids"].shape[1] :].tolist()
        if 2 in ref_tokens:
            ref_tokens = ref_tokens[: ref_tokens.index(2) + 1]
        assert not out.zoomed and out.tokens == ref_tokens
        assert out.gate_prob is not None and out.bbox is None and out.roi_tokens is None


def _full_recompute_logits(model, inputs, trace, roi_pixel_values):
    """Logits at the last position of the RoI sequence, computed from scratch (no cache reuse)."""
    spec = qz.get_spec(model)
    ids = trace["roi_input_ids"][None]
    glob = torch.cat(spec.encode_images(inputs["pixel_values"], inputs["image_grid_thw"]))
    roi = torch.cat(spec.encode_images(roi_pixel_values, trace["roi_image_grid_thw"][None]))
    emb = Trunk(spec).embed(ids, torch.cat([glob, roi]))
    out = spec.text_model(inputs_embeds=emb, position_ids=trace["roi_position_ids"][:, None], use_cache=False)
    return spec.lm_head(out.last_hidden_state[0, -1]).float()


def _spec_positions(pos, P, s0, grid_r, box, mode):
    """SPEC §3.2 written out element by element (independent of positions.py)."""
    h_r, w_r = grid_r
    p_e = float(pos[0, P])
    cols = [list(map(float, pos[:, j])) for j in range(P + 1)]
    cols.append([p_e + 1] * 3)
    x1, y1, x2, y2 = box
    for r in range(h_r):
        for c in range(w_r):
            if mode == "aligned":
                h = s0 + y1 + (r * (y2 - 1 - y1) / (h_r - 1) if h_r > 1 else 0.0)
                w = s0 + x1 + (c * (x2 - 1 - x1) / (w_r - 1) if w_r > 1 else 0.0)
            else:
                h, w = p_e + 2 + r, p_e + 2 + c
            cols.append([p_e + 2, h, w])
    cols.append([p_e + max(h_r, w_r) + 2] * 3)
    cols += [[float(v) + max(h_r, w_r) + 2 for v in pos[:, j]] for j in range(P + 1, pos.shape[1])]
    return torch.tensor(cols).T


@pytest.mark.parametrize("mode", ["aligned", "sequential"])
@torch.no_grad()
def test_forced_zoom_kv_reuse_equals_full_recompute(model, ip, batch3, mode):
    images, qs = batch3
    zoom = _zoom(model, ip, gate_threshold=0.0, roi_threshold=0.0, position_mode=mode)
    for img, q in zip(images, qs):
        inputs = make_inputs([img], [q], ip)
        out = zoom.generate_from_inputs(inputs, [img], max_new_tokens=4, return_trace=True)[0]
        tr = out.trace
        assert out.zoomed and out.roi_tokens == out.tokens
        x1, y1, x2, y2 = out.bbox
        W, H = img.size
        assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H and x2 - x1 >= 28 and y2 - y1 >= 28
        crop = img.crop(out.bbox)
        enc = ip(images=[crop], return_tensors="pt", **_compat.budget_kwargs(12544, 37632))
        assert torch.equal(enc["image_grid_thw"][0], tr["roi_image_grid_thw"])
        full = _full_recompute_logits(model, inputs, tr, enc["pixel_values"])
        torch.testing.assert_close(tr["first_logits"], full, rtol=0, atol=1e-4)
        # positions: the SPEC formulas, and sequential == the backbone's own two-image positions
        ids = inputs["input_ids"][0]
        pos = qz.get_spec(model).position_ids(inputs["input_ids"], inputs["attention_mask"], inputs["image_grid_thw"])[:, 0]
        P = int((ids == 4).nonzero()[0])
        s0 = int((ids == IMG).nonzero()[0])
        grid_r = (int(tr["roi_image_grid_thw"][1]) // 2, int(tr["roi_image_grid_thw"][2]) // 2)
        expected = _spec_positions(pos, P, s0, grid_r, tr["bbox_tokens"], mode)
        torch.testing.assert_close(tr["roi_position_ids"], expected, rtol=0, atol=1e-5)
        if mode == "sequential":
            grids = torch.stack([inputs["image_grid_thw"][0], tr["roi_image_grid_thw"]])
            own = qz.get_spec(model).position_ids(tr["roi_input_ids"][None], None, grids)[:, 0]
            assert torch.equal(own.float(), tr["roi_position_ids"])


@torch.no_grad()
def test_batch_with_mixed_gate_equals_single(model, ip, batch3):
    images, qs = batch3
    inputs = make_inputs(images, qs, ip)
    zoom = _zoom(model, ip, gate_threshold=0.0, roi_threshold=0.0, emit_direct=True)
    with torch.no_grad():
        zoom.gate.head.bias.fill_(0.0)
        zoom.gate.head.weight.normal_(0, 1.0)
    probs = sorted(o.gate_prob for o in zoom.generate_from_inputs(inputs, images, max_new_tokens=1))
    assert probs[0] < probs[1] < probs[2]
    zoom.config = qz.ZoomConfig(gate_threshold=(probs[0] + probs[1]) / 2, roi_threshold=0.0, emit_direct=True)
    batch = zoom.generate_from_inputs(inputs, images, max_new_tokens=6, return_trace=True)
    assert sorted(o.zoomed for o in batch) == [False, True, True]
    for i, (img, q) in enumerate(zip(images, qs)):
        single = zoom.generate_from_inputs(make_inputs([img], [q], ip), [img], max_new_tokens=6, return_trace=True)[0]
        b = batch[i]
        assert (b.tokens, b.zoomed, b.bbox, b.direct_tokens, b.roi_tokens, b.visual_tokens) == (
            single.tokens, single.zoomed, single.bbox, single.direct_tokens, single.roi_tokens, single.visual_tokens)
        torch.testing.assert_close(b.trace["first_logits"], single.trace["first_logits"], rtol=0, atol=1e-4)
        assert abs(b.gate_prob - single.gate_prob) < 1e-5
        if b.zoomed:
            assert b.direct_tokens is not None  # emit_direct
            torch.testing.assert_close(b.heatmap, single.heatmap, rtol=0, atol=1e-4)
            torch.testing.assert_close(b.trace["roi_position_ids"], single.trace["roi_position_ids"])


@torch.no_grad()
def test_save_load_same_outputs(model, ip, batch3, tmp_path):
    images, qs = batch3
    inputs = make_inputs(images, qs, ip)
    zoom = _zoom(model, ip, gate_threshold=0.3, roi_threshold=0.0, position_mode="sequential")
    with torch.no_grad():
        zoom.gate.head.weight.normal_(0, 1.0)
    before = zoom.generate_from_inputs(inputs, images, max_new_tokens=5, return_trace=True)
    zoom.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = qz.QZoom.from_pretrained(tmp_path, model=model, image_processor=ip)
    assert loaded.config == zoom.config
    after = loaded.generate_from_inputs(inputs, images, max_new_tokens=5, return_trace=True)
    for a, b in zip(before, after):
        assert (a.tokens, a.zoomed, a.bbox, a.gate_prob) == (b.tokens, b.zoomed, b.bbox, b.gate_prob)
        assert torch.equal(a.trace["first_logits"], b.trace["first_logits"])
    # only adapter tensors are stored
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert all(k.startswith(("twig.layers.", "gate.layers.", "gate.head.")) for k in keys)
    # overrides at load time
    over = qz.QZoom.from_pretrained(tmp_path, model=model, image_processor=ip, gate_threshold=2.0)
    assert over.config.gate_threshold == 2.0 and over.config.position_mode == "sequential"


def test_load_into_wrong_model_fails(model, ip, tmp_path):
    _zoom(model, ip).save_pretrained(tmp_path)
    shallow = tiny_model(text={"num_hidden_layers": 4})
    with pytest.raises(qz.QZoomError, match="K=3 with T=3 layers but the model has only 4"):
        qz.QZoom.from_pretrained(tmp_path, model=shallow)
    import json

    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["backbone_family"] = "llava"
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(qz.QZoomError, match="family 'llava'"):
        qz.QZoom.from_pretrained(tmp_path, model=model)
    with pytest.raises(qz.QZoomError, match="K\\+T <= 4"):
        qz.TwigRPN.from_backbone(shallow, K=2, T=3)


def _hooks_clean(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_backbone_untouched_and_no_hooks_left(model, ip, batch3):
    images, qs = batch3
    inputs = make_inputs(images, qs, ip)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    zoom = _zoom(model, ip, gate_threshold=0.0, roi_threshold=0.0, emit_direct=True)
    zoom.generate_from_inputs(inputs, images, max_new_tokens=3)
    assert _hooks_clean(model)
    # a run that fails midway (after pass A): no image processor to re-encode the crop
    broken = qz.QZoom(model, twig=zoom.twig, gate=zoom.gate, config=zoom.config)
    with pytest.raises(qz.QZoomError, match="image_processor"):
        broken.generate_from_inputs(inputs, images, max_new_tokens=3)
    assert _hooks_clean(model)
    # a forward that raises inside the hooked region
    spec = qz.get_spec(model)
    bad = spec.layers[1].register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    try:
        with pytest.raises(RuntimeError, match="boom"):
            zoom.generate_from_inputs(inputs, images, max_new_tokens=3)
    finally:
        bad.remove()
    assert _hooks_clean(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


@torch.no_grad()
def test_capture_hook_records_prefill_only_and_is_removed(model, ip, batch3):
    images, qs = batch3
    inputs = make_inputs(images[:1], qs[:1], ip)
    spec = qz.get_spec(model)
    with qz.capture_layer_input(spec.layers[K]) as cap:
        model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert cap.calls == 1 and cap.hidden.shape[1] == inputs["input_ids"].shape[1]
    assert "position_embeddings" in cap.kwargs and _hooks_clean(model)
    # the clone is independent of the backbone's later in-place writes
    before = cap.hidden.clone()
    model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert torch.equal(before, cap.hidden)
