"""The packed vision attention (`ZoomConfig(vision_attention="varlen")`, `qz.fast_vision_attention`): selected through
transformers' attention interface for the call only, one packed call per vision layer, restored exactly (also on
errors and when nested), and on CPU the same features as the model's own sdpa path."""
from __future__ import annotations

import copy

import pytest
import torch

import qzoom_adapters as qz
from qzoom_adapters import compat, vision_attention as va
from qzoom_adapters.backbones.qwen2_vl import Qwen2VLSpec
from qzoom_adapters.testing import make_kit

SELECTED = compat.VISION_ATTENTION_NAME if compat.vision_attention_route() == "registered_name" else "flash_attention_2"


@pytest.fixture(scope="module")
def qwen2():
    return make_kit(Qwen2VLSpec)


def _config_state(model) -> list[dict]:
    """Every config's whole attribute dict (not only its attention setting), deep-copied."""
    return [copy.deepcopy({k: v for k, v in vars(cfg).items() if k not in ("text_config", "vision_config")})
            for cfg, _ in compat.attn_settings(model)]


def _fa2_entry():
    from transformers import AttentionInterface

    return AttentionInterface().get("flash_attention_2")


def _features(kit, model, images):
    inputs = qz.get_spec(model).chat_inputs(kit.processor, images, ["q"] * len(images))
    feats = qz.get_spec(model).encode_images(inputs["pixel_values"], inputs["image_grid_thw"])
    return feats.embeds, feats.deepstack


@pytest.mark.parametrize("family", ["qwen25", "qwen3", "qwen2"])
@torch.no_grad()
def test_fallback_features_equal_the_stock_sdpa_path_with_one_call_per_layer(family, request, one_thread):
    kit = request.getfixturevalue(family)
    model, images = kit.model, kit.images  # three images of different sizes: segments of several images
    stock, stock_deep = _features(kit, model, images)
    depth = model.config.vision_config.depth
    va.CALLS.clear()
    with qz.fast_vision_attention(model):
        assert model.config.vision_config._attn_implementation == SELECTED
        assert model.config.text_config._attn_implementation == "sdpa"  # the text model keeps its own
        fast, fast_deep = _features(kit, model, images)
    assert va.CALLS == {"per_segment": depth}  # one packed call per layer (CPU: served per segment), never per window
    assert torch.equal(fast, stock)  # the very calls the model's sdpa path makes
    assert len(fast_deep) == len(stock_deep) and all(torch.equal(a, b) for a, b in zip(fast_deep, stock_deep))
    assert model.config.vision_config._attn_implementation == "sdpa"


@pytest.mark.parametrize("previous", ["sdpa", "eager"])
def test_restores_the_exact_previous_settings_also_after_errors_and_nesting(qwen25, previous):
    model = qwen25.fresh_model(1)
    model.set_attn_implementation({"vision_config": previous})
    before, fa2 = _config_state(model), _fa2_entry()
    with qz.fast_vision_attention(model):
        with qz.fast_vision_attention(model):  # nested: the inner exit keeps the outer selection
            pass
        assert model.config.vision_config._attn_implementation == SELECTED
    assert _config_state(model) == before and _fa2_entry() is fa2
    with pytest.raises(ZeroDivisionError):
        with qz.fast_vision_attention(model):
            1 / 0
    assert _config_state(model) == before and _fa2_entry() is fa2
    assert model.config.vision_config._attn_implementation == previous


def test_two_models_selected_at_once_each_get_their_own_route(qwen25, one_thread):
    a, b = qwen25.fresh_model(2), qwen25.fresh_model(3)
    before_a, before_b, fa2 = _config_state(a), _config_state(b), _fa2_entry()
    with qz.fast_vision_attention(a):
        with qz.fast_vision_attention(b):
            assert b.config.vision_config._attn_implementation == SELECTED
        assert a.config.vision_config._attn_implementation == SELECTED
        assert _config_state(b) == before_b
        stock_b = _features(qwen25, b, qwen25.images[:1])[0]
    assert _config_state(a) == before_a and _fa2_entry() is fa2
    assert torch.equal(stock_b, _features(qwen25, b, qwen25.images[:1])[0])


@torch.no_grad()
def test_pipeline_selects_for_the_call_only_and_answers_the_same(qwen25, one_thread):
    zoom = qwen25.zoom(gate_threshold=0.0, roi_threshold=0.0)
    inputs, images = qwen25.inputs(qwen25.images[:2], qwen25.questions[:2]), qwen25.images[:2]
    before = _config_state(qwen25.model)
    stock = zoom.generate_from_inputs(inputs, images, max_new_tokens=4, return_trace=True)
    hooks = {n: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for n, m in qwen25.model.named_modules()}
    state = {k: v.clone() for k, v in qwen25.model.state_dict().items()}
    va.CALLS.clear()
    fast = zoom.with_config(vision_attention="varlen").generate_from_inputs(inputs, images, max_new_tokens=4,
                                                                             return_trace=True)
    depth = qwen25.model.config.vision_config.depth
    assert va.CALLS == {"per_segment": 2 * depth}  # the global images' call and the crops' call
    assert all(o.zoomed for o in fast) and _config_state(qwen25.model) == before
    assert hooks == {n: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for n, m in qwen25.model.named_modules()}
    assert all(torch.equal(v, state[k]) for k, v in qwen25.model.state_dict().items())
    for s, f in zip(stock, fast):
        assert s.tokens == f.tokens and torch.equal(s.trace["first_logits"], f.trace["first_logits"])


def test_bad_values_and_families_fail_clearly(qwen25, llava):
    with pytest.raises(qz.QZoomError, match="vision_attention must be one of"):
        qz.fast_vision_attention(qwen25.model, "flash")
    with pytest.raises(qz.QZoomError, match="needs a vision tower that takes cu_seqlens"):
        qz.fast_vision_attention(llava.model)
    with pytest.raises(qz.QZoomError, match="vision_attention: Input should be 'model' or 'varlen'"):
        qwen25.zoom().config = {"vision_attention": "fast"}
    with pytest.raises(qz.QZoomError, match="the llava tower does not"):
        llava.zoom(vision_attention="varlen")
    with qz.fast_vision_attention(llava.model, "model"):  # "model" leaves any model as it is
        assert llava.model.config.vision_config._attn_implementation == "sdpa"


def test_the_function_refuses_masks_and_reports_why_varlen_cannot_run(qwen25):
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(qz.QZoomError, match="vision towers"):
        va.varlen_vision_attention(None, q, q, q, attention_mask=torch.ones(1, 1, 4, 4))
    assert "cpu" in va.varlen_unavailable(q)
    assert va._varlen_kernel()[0] is not None  # this torch has torch.nn.attention.varlen (CUDA fp16/bf16 only)
    out, weights = va.varlen_vision_attention(None, q, q, q, cu_seq_lens_q=torch.tensor([0, 1, 4], dtype=torch.int32))
    assert out.shape == (1, 4, 2, 8) and weights is None


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=None):
    """`varlen_attn`'s documented contract on the CPU: (T, H, D) packed q/k/v, each segment attends within itself."""
    out = torch.empty_like(q)
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        assert b - a <= max_q
        w = torch.einsum("shd,thd->hst", q[a:b], k[a:b]) * (scale if scale is not None else q.shape[-1] ** -0.5)
        out[a:b] = torch.einsum("hst,thd->shd", w.softmax(-1), v[a:b])
    return out


def test_the_varlen_call_packs_and_unpacks_like_the_per_segment_path(monkeypatch):
    """The layout around the CUDA kernel ((1, H, S, D) views -> (S, H, D) packed -> (1, S, H, D)), checked on CPU
    against the kernel's documented contract, for q/k/v strided the way the Qwen-VL towers hand them over."""
    torch.manual_seed(0)
    S, H, D = 11, 2, 8
    qkv = torch.randn(S, 3, H, D).permute(1, 0, 2, 3).unbind(0)  # (S, H, D) views of one projection, as the towers do
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in qkv)  # (1, H, S, D)
    cu = torch.tensor([0, 4, 5, 11], dtype=torch.int32)
    monkeypatch.setattr(va, "_varlen_kernel", lambda: (_reference_varlen, True))
    packed = va._varlen(q, k, v, cu, None, D**-0.5)
    torch.testing.assert_close(packed, va._per_segment(None, q, k, v, cu, D**-0.5, 0.0), rtol=0, atol=1e-6)
