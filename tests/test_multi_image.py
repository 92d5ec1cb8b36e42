"""Several images per sample in the core: the RoI image (last by default, or `roi_image=`) gets the heatmap, the
crop and the RoI block; positions follow SPEC §3.2 in its frame; KV reuse equals a full recompute."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import qzoom_adapters as qz
from qzoom_adapters import spec as spec_module
from qzoom_adapters.backbones.qwen2_5_vl import Qwen2_5_VLSpec
from qzoom_adapters.likelihood import continuation_scores
from qzoom_adapters.roi import pixels_to_token_box
from qzoom_adapters.testing import make_kit, run_conformance
from qzoom_adapters.testing.checks import check_roi_of_image, roi_forward_logits

FAMILIES = ("qwen25", "qwen3")
Q = "Which picture shows the red plate?"


@pytest.fixture(params=FAMILIES)
def kit(request, one_thread):
    return request.getfixturevalue(request.param)


def _forced(kit, mode=None):
    return kit.zoom(gate_threshold=0.0, roi_threshold=0.0, **({"position_mode": mode} if mode else {}))


def _grid(kit, image):
    """(h_t, w_t) of `image` as the processor encodes it alone."""
    spec = qz.get_spec(kit.model)
    return spec.token_grid(spec.image_grids(kit.inputs([image], [Q]))[0])


@torch.no_grad()
def test_generate_two_images_end_to_end(kit):
    a, b, _ = kit.images
    zoom = _forced(kit)
    spec = zoom.spec
    last, first, from_end = (zoom.generate([[a, b]], [Q], max_new_tokens=3, return_trace=True, roi_image=r)[0]
                             for r in (None, [0], [-2]))
    assert last.zoomed and last.roi_image == 1 and isinstance(last.text, str)
    assert tuple(last.heatmap.shape) == _grid(kit, b) and tuple(first.heatmap.shape) == _grid(kit, a)
    assert first.roi_image == from_end.roi_image == 0 and first.tokens == from_end.tokens
    for out, image in ((last, b), (first, a)):
        x1, y1, x2, y2 = out.bbox
        assert 0 <= x1 < x2 <= image.width and 0 <= y1 < y2 <= image.height
        (h_r, w_r) = spec.token_grid(out.trace["roi_image_grid_thw"])
        assert out.visual_tokens == sum(h * w for h, w in (_grid(kit, a), _grid(kit, b))) + h_r * w_r
    # one image given as a list of one is the same call as the image itself
    plain, listed = (zoom.generate([im], [Q], max_new_tokens=3, return_trace=True)[0] for im in (a, [a]))
    assert plain.tokens == listed.tokens and plain.roi_image == listed.roi_image == 0
    assert torch.equal(plain.trace["first_logits"], listed.trace["first_logits"])


@torch.no_grad()
def test_heatmap_is_the_twig_logits_over_the_roi_images_tokens(kit):
    a, b, _ = kit.images
    zoom = _forced(kit)
    spec = zoom.spec
    inputs = kit.inputs([[a, b]], [Q])
    pa = zoom._pass_a(inputs, [[a, b]])
    scores, _ = zoom.twig.query_scores(spec, pa.hK, pa.kwargs, zoom.trunk, pa.mask.argmax(dim=1))
    cols = (inputs["input_ids"][0] == spec.image_token_id).nonzero()[:, 0]
    n_a = _grid(kit, a)[0] * _grid(kit, a)[1]
    for target, image_cols in ((0, cols[:n_a]), (1, cols[n_a:])):
        out = zoom.generate_from_inputs(inputs, [[a, b]], max_new_tokens=1, roi_image=[target])[0]
        assert out.heatmap.numel() == image_cols.numel()
        assert_close(out.heatmap.flatten(), scores[0, image_cols].cpu(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("target", [0, 1])
@pytest.mark.parametrize("mode", ["aligned", "sequential"])
@torch.no_grad()
def test_positions_and_kv_reuse_for_the_first_or_last_image(kit, mode, target):
    """RoI block right after image `target`; positions == SPEC §3.2 applied to it (sequential also == the backbone's
    own positions); RoI-pass logits with the reused cache == the unmodified model's forward of the whole sequence."""
    a, b, _ = kit.images
    inputs = kit.inputs([[a, b]], [Q])
    out = _forced(kit, mode).generate_from_inputs(inputs, [[a, b]], max_new_tokens=3, return_trace=True,
                                                  roi_image=[target])[0]
    check_roi_of_image(kit, inputs, [a, b], out, mode, target)


@pytest.mark.parametrize("mode", ["aligned", "sequential"])
@torch.no_grad()
def test_mixed_batch_with_left_padding_equals_full_recompute(kit, mode):
    a, b, c = kit.images
    groups, targets, questions = [[a, b], c, [c, a]], [0, None, 1], [Q, "What?", "Where is the red box?"]
    inputs = kit.inputs(groups, questions)
    assert not inputs["attention_mask"].bool().all(), "the batch should be left-padded"
    batch = _forced(kit, mode).generate_from_inputs(inputs, groups, max_new_tokens=3, return_trace=True,
                                                    roi_image=targets)
    for out, group, q, t in zip(batch, groups, questions, [0, 0, 1]):
        images = group if isinstance(group, list) else [group]
        check_roi_of_image(kit, kit.inputs([group], [q]), images, out, mode, t)


@torch.no_grad()
def test_plan_is_what_generate_would_do_without_the_layers_above_k(kit):
    """`plan_from_inputs`: the same zoom decisions, boxes and gate probabilities as `generate_from_inputs` with
    the same arguments (gate, forced decisions, caller boxes, RoI image), and no decoder layer at or above K runs."""
    a, b, c = kit.images
    groups = [[a, b], c, [c, a]]
    inputs = kit.inputs(groups, [Q, Q, Q])
    zoom = kit.zoom(gate_threshold=0.0, roi_threshold=0.0)
    probe = zoom.generate_from_inputs(inputs, groups, max_new_tokens=1)
    middle = sorted(o.gate_prob for o in probe)[1]
    zoom = zoom.with_config(gate_threshold=middle)  # the same adapters; the gate fires on some samples only
    calls = []
    above = [layer.register_forward_hook(lambda *_: calls.append(1)) for layer in zoom.spec.layers[zoom.K:]]
    try:
        for kwargs in ({}, {"force_zoom": [False, True, False]}, {"roi_image": [0, None, 1]},
                       {"boxes": [(10, 20, 280, 150), None, None], "roi_image": [0, None, None]}):
            plans = zoom.plan_from_inputs(inputs, groups, **kwargs)
            assert not calls, kwargs
            outs = zoom.generate_from_inputs(inputs, groups, max_new_tokens=2, **kwargs)
            got = [(p.zoomed, p.bbox, p.gate_prob, p.roi_image) for p in plans]
            assert got == [(o.zoomed, o.bbox, o.gate_prob, o.roi_image) for o in outs], kwargs
            calls.clear()
    finally:
        for h in above:
            h.remove()
    assert {p.zoomed for p in zoom.plan_from_inputs(inputs, groups)} == {True, False}


@torch.no_grad()
def test_force_zoom_and_boxes_use_the_roi_image(kit):
    a, b, _ = kit.images
    zoom = kit.zoom(gate_threshold=1.5, roi_threshold=0.0)  # the gate never fires
    groups = [[a, b], [b, a]]
    inputs = kit.inputs(groups, [Q, Q])
    forced = zoom.generate_from_inputs(inputs, groups, max_new_tokens=3, force_zoom=[True, False])
    assert [o.zoomed for o in forced] == [True, False] and forced[1].tokens == forced[1].direct_tokens
    box = (10, 20, 280, 150)  # inside a (300x200), not inside b (220 px wide)
    single = kit.inputs([[a, b]], [Q])
    out = zoom.generate_from_inputs(single, [[a, b]], max_new_tokens=3, return_trace=True, boxes=[box],
                                    roi_image=[0])[0]
    assert out.zoomed and out.roi_image == 0 and out.bbox == box
    assert out.trace["bbox_tokens"] == pixels_to_token_box(box, _grid(kit, a), a.size)
    assert_close(out.trace["first_logits"], roi_forward_logits(kit, single, [a, b], out, "aligned"), rtol=0,
                 atol=1e-4)  # the crop was cut from a's pixels
    with pytest.raises(qz.QZoomError, match="not a box inside the 220x260 px source image"):
        zoom.generate_from_inputs(single, [[a, b]], boxes=[box])  # the default RoI image is b


@torch.no_grad()
def test_bad_multi_image_input_fails_clearly(qwen25, one_thread):
    kit = qwen25
    a, b, _ = kit.images
    zoom = _forced(kit)
    spec = zoom.spec
    two = kit.inputs([[a, b]], [Q])
    for roi_image, match in (([2], r"roi_image\[0\] = 2, but sample 0 has 2 image\(s\)"),
                             ([-3], r"roi_image\[0\] = -3"),
                             (1, r"for one sample pass \[index\]"),
                             ([True], "must be None or an integer"),
                             ([0, 1], "roi_image has 2 entries for a batch of 1")):
        with pytest.raises(qz.QZoomError, match=match):
            zoom.generate_from_inputs(two, [[a, b]], roi_image=roi_image)
    with pytest.raises(qz.QZoomError, match="2 image.* in the inputs but 1 source image"):
        zoom.generate_from_inputs(two, [b])
    with pytest.raises(qz.QZoomError, match="1 image.* in the inputs but 2 source image"):
        zoom.generate_from_inputs(kit.inputs([a], [Q]), [[a, b]])
    with pytest.raises(qz.QZoomError, match=r"images\[0\] is an empty list"):
        zoom.generate([[]], [Q])
    with pytest.raises(qz.QZoomError, match="video"):
        zoom.generate_from_inputs(dict(two, pixel_values_videos=torch.zeros(4, 8)), [[a, b]])
    no_image = dict(two, input_ids=torch.where(two["input_ids"] == spec.image_token_id, 0, two["input_ids"]))
    with pytest.raises(qz.QZoomError, match=r"sample\(s\) \[0\] have no image tokens"):
        zoom.generate_from_inputs(no_image, [[a, b]])
    # steps that read one image per sample refuse several instead of guessing which one
    pa = zoom._pass_a(two, [[a, b]])
    with pytest.raises(qz.QZoomError, match="reads one image per sample"):
        pa.image_logits(torch.zeros(1, pa.ids.shape[1]), spec)  # stage 1 / stage 2 labels
    with pytest.raises(qz.QZoomError, match="one source image per sample here"):
        continuation_scores(zoom, [[a, b]], [Q], ["red"])


class _OneImage(Qwen2_5_VLSpec):
    multi_image = False


class _AfterTheFirstImage(Qwen2_5_VLSpec):
    """Puts the RoI block after the first image whatever the RoI image is: the kit must notice."""

    def roi_insert_index(self, ids):
        return int((ids == self.vision_end_id).nonzero()[0]) + 1


@pytest.mark.parametrize("spec_cls,passes", [(_OneImage, True), (_AfterTheFirstImage, False)])
def test_kit_checks_several_images(spec_cls, passes, monkeypatch, one_thread):
    monkeypatch.setattr(spec_module, "_REGISTRY", {**spec_module._REGISTRY, "qwen2_5_vl": spec_cls})
    kit = make_kit(spec_cls)
    if passes:  # a one-image family refuses two images with one line
        assert run_conformance(spec_cls, checks=["several_images_per_sample"], kit=kit) == ["several_images_per_sample"]
        a, b, _ = kit.images
        with pytest.raises(qz.QZoomError, match=r"qwen2_5_vl spec takes one image per sample .*\[2\]"):
            kit.zoom(gate_threshold=0.0).generate([[a, b]], [Q], max_new_tokens=1)
    else:
        with pytest.raises(AssertionError, match="several_images_per_sample"):
            run_conformance(spec_cls, checks=["several_images_per_sample"], kit=kit)
