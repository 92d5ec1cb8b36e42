"""Adapter files (saved settings win, per-adapter depth, base-model record, model card) and the pipeline's seams
(forced boxes, config copies, the RoI layout in positions.py) - issue 18."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import qzoom_adapters as qz
from qzoom_adapters import pipeline, positions, roi
from qzoom_adapters.backbones.qwen2_5_vl import Qwen2_5_VLSpec
from qzoom_adapters.model_card import CARD_MARKER

CONFIG_NAME = "adapter_config.json"


def _zoom(kit, model=None, twig_T=3, gate_T=3, **cfg):
    model = model or kit.model
    twig = qz.TwigRPN.from_backbone(model, K=kit.K, T=twig_T) if twig_T else None
    gate = qz.DynamicGate.from_backbone(model, K=kit.K, T=gate_T) if gate_T else None
    return qz.QZoom(model, kit.processor, twig=twig, gate=gate, config=qz.ZoomConfig(**cfg))


def _same(a, b):
    assert (a.tokens, a.zoomed, a.bbox, a.gate_prob) == (b.tokens, b.zoomed, b.bbox, b.gate_prob)
    assert torch.equal(a.trace["first_logits"], b.trace["first_logits"])


# --- 1. saved settings win unless the caller sets them ---------------------------------------------------
def test_saved_settings_survive_a_config_that_does_not_set_them(qwen25, tmp_path):
    _zoom(qwen25, position_mode="sequential", gate_threshold=0.3, roi_threshold=0.2).save_pretrained(tmp_path)
    kw = dict(model=qwen25.model, processor=qwen25.processor)
    loaded = qz.QZoom.from_pretrained(tmp_path, config=qz.ZoomConfig(gate_threshold=0.5), **kw)
    assert (loaded.config.position_mode, loaded.config.gate_threshold, loaded.config.roi_threshold) == \
        ("sequential", 0.5, 0.2)
    loaded = qz.QZoom.from_pretrained(tmp_path, config={"position_mode": "aligned"}, roi_threshold=0.1, **kw)
    assert (loaded.config.position_mode, loaded.config.gate_threshold, loaded.config.roi_threshold) == \
        ("aligned", 0.3, 0.1)
    # with_config: a copy on the same model with other settings; the original keeps its own
    other = loaded.with_config(qz.ZoomConfig(emit_direct=True), gate_threshold=0.0)
    assert (other.config.emit_direct, other.config.gate_threshold, other.config.position_mode) == (True, 0.0, "aligned")
    assert (loaded.config.emit_direct, loaded.config.gate_threshold) == (False, 0.3)
    assert other.model is loaded.model and other.twig is loaded.twig and other.decoder is loaded.decoder


# --- 2. a twig and a gate of different depth; no adapters at all -------------------------------------------
@torch.no_grad()
def test_twig_and_gate_of_different_depth_round_trip(qwen25, tmp_path):
    zoom = _zoom(qwen25, twig_T=2, gate_T=3, gate_threshold=0.3, roi_threshold=0.0)
    torch.manual_seed(1)
    zoom.gate.head.weight.normal_(0, 1.0)
    inputs = qwen25.inputs(qwen25.images[:2], qwen25.questions[:2])
    before = zoom.generate_from_inputs(inputs, qwen25.images[:2], max_new_tokens=3, return_trace=True)
    zoom.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert (saved["twig_T"], saved["gate_T"]) == (2, 3)
    loaded = qz.QZoom.from_pretrained(tmp_path, model=qwen25.model, processor=qwen25.processor)
    assert (loaded.twig.T, loaded.gate.T) == (2, 3)
    after = loaded.generate_from_inputs(inputs, qwen25.images[:2], max_new_tokens=3, return_trace=True)
    for a, b in zip(before, after):
        _same(a, b)
    # a file written before per-adapter depths (one T for both) still loads
    _zoom(qwen25, twig_T=2, gate_T=2).save_pretrained(tmp_path / "old")
    old = json.loads((tmp_path / "old" / CONFIG_NAME).read_text())
    for key in ("twig_T", "gate_T", "base_model_name_or_path", "revision"):
        old.pop(key)
    (tmp_path / "old" / CONFIG_NAME).write_text(json.dumps(old))
    legacy = qz.QZoom.from_pretrained(tmp_path / "old", model=qwen25.model)
    assert (legacy.twig.T, legacy.gate.T) == (2, 2)


def test_qzoom_without_adapters_is_refused_at_construction(qwen25):
    with pytest.raises(qz.QZoomError, match="needs a twig and/or a gate"):
        qz.QZoom(qwen25.model, qwen25.processor)


# --- 3. the base model is recorded; another one warns or fails -------------------------------------------
def test_adapter_config_records_the_base_model(qwen25, tmp_path):
    model = qwen25.fresh_model(0)
    model.config._name_or_path = "org/base-a"
    model.config._commit_hash = "0123abcd"
    _zoom(qwen25, model=model).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert (saved["base_model_name_or_path"], saved["revision"]) == ("org/base-a", "0123abcd")
    assert (saved["model_type"], saved["num_hidden_layers"]) == ("qwen2_5_vl", len(qz.get_spec(model).layers))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same checkpoint name (here or in a local folder): no warning
        qz.QZoom.from_pretrained(tmp_path, model=model)
        model.config._name_or_path = "/models/base-a/"
        qz.QZoom.from_pretrained(tmp_path, model=model)
    model.config._name_or_path = "org/base-b"
    with pytest.warns(UserWarning, match="saved for base model 'org/base-a' but are loaded into 'org/base-b'") as rec:
        qz.QZoom.from_pretrained(tmp_path, model=model)
    assert all("\n" not in str(w.message) for w in rec)
    torch.manual_seed(0)
    deeper = Qwen2_5_VLSpec.model_class()._from_config(Qwen2_5_VLSpec.tiny_config(
        text={"num_hidden_layers": len(qz.get_spec(model).layers) + 2}))
    with pytest.raises(qz.QZoomError, match="decoder layers but this one has"):
        qz.QZoom.from_pretrained(tmp_path, model=deeper)


# --- 4. a model card beside the adapter files; never over the user's README ---------------------------------
def test_model_card_is_written_and_a_users_readme_is_kept(qwen25, tmp_path):
    zoom = _zoom(qwen25, twig_T=2, gate_T=3, gate_threshold=0.25)
    zoom.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert CARD_MARKER in card.splitlines() and card.startswith("---\nlibrary_name: qzoom-adapters")
    for text in ("K=3", "twig T=2", "gate T=3", "| gate threshold | 0.25 |", "QZoom.from_pretrained(",
                 f"qzoom-adapters {qz.__version__}", "qwen2_5_vl"):
        assert text in card, text
    zoom.config = qz.ZoomConfig(gate_threshold=0.75)
    zoom.save_pretrained(tmp_path)  # our card: rewritten
    assert "| gate threshold | 0.75 |" in (tmp_path / "README.md").read_text()
    mine = "# My adapters\n\nNotes I wrote.\n"
    (tmp_path / "README.md").write_text(mine)
    zoom.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == mine
    assert qz.QZoom.from_pretrained(tmp_path, model=qwen25.model).config.gate_threshold == 0.75


# --- 5. forced boxes through generate_from_inputs(boxes=...) ------------------------------------------------
@torch.no_grad()
def test_forced_box_equals_the_twig_path_with_that_box(qwen25):
    images = qwen25.images[:2]
    inputs = qwen25.inputs(images, qwen25.questions[:2])
    one = qwen25.inputs(images[:1], qwen25.questions[:1])
    zoom = _zoom(qwen25, gate_threshold=0.0)
    blurred = zoom.with_config(roi_threshold=2.0).generate_from_inputs(one, images[:1], 1, return_trace=True)
    zoom.config = qz.ZoomConfig(gate_threshold=0.0, roi_threshold=float(blurred[0].trace["blurred_map"].quantile(0.7)))
    twig = zoom.generate_from_inputs(one, images[:1], max_new_tokens=3, return_trace=True)[0]
    assert twig.zoomed and twig.bbox != (0, 0, *images[0].size)  # a box inside the image
    never = zoom.with_config(gate_threshold=2.0)  # the gate alone would not zoom
    forced = never.generate_from_inputs(one, images[:1], max_new_tokens=3, return_trace=True, boxes=[twig.bbox])[0]
    _same(forced, twig)  # same batch, same box: the same run
    assert forced.trace["bbox_tokens"] == twig.trace["bbox_tokens"]
    assert torch.equal(forced.heatmap, twig.heatmap)  # the twig still ran and reports its map
    both = never.generate_from_inputs(inputs, images, max_new_tokens=3, boxes=[twig.bbox, None])
    assert both[0].zoomed and both[0].bbox == twig.bbox and not both[1].zoomed and both[1].bbox is None
    off = never.generate_from_inputs(inputs, images, max_new_tokens=3, boxes=[twig.bbox, None],
                                     force_zoom=[False, False])
    assert not off[0].zoomed  # force_zoom wins over a box
    assert zoom.spec is zoom.trunk.spec is zoom.decoder.spec  # nothing swapped


@torch.no_grad()
def test_forced_box_needs_no_twig_and_bad_boxes_fail_clearly(qwen25):
    images = qwen25.images[:1]
    inputs = qwen25.inputs(images, qwen25.questions[:1])
    gate_only = _zoom(qwen25, twig_T=0, gate_threshold=2.0)
    W, H = images[0].size
    out = gate_only.generate_from_inputs(inputs, images, max_new_tokens=2, boxes=[(1.5, 2, W // 2, H // 2)],
                                         return_trace=True)[0]
    assert out.zoomed and out.bbox == (1, 2, W // 2, H // 2) and out.heatmap is None
    assert out.visual_tokens > int((inputs["input_ids"] == gate_only.spec.image_token_id).sum())
    with pytest.raises(qz.QZoomError, match="pass boxes= for those samples"):
        gate_only.generate_from_inputs(inputs, images, max_new_tokens=1, force_zoom=[True])
    for boxes, match in (([None, None], "boxes has 2 entries for a batch of 1"),
                         ([(0, 0, W + 5, 10)], "not a box inside the"),
                         ([(10, 10, 5, 20)], "not a box inside the"),
                         ([(0, 0, 10)], r"must be None or \(x1, y1, x2, y2\)"),
                         ((0, 0, 10, 10), r"one entry per sample.*\[box\]")):
        with pytest.raises(qz.QZoomError, match=match):
            gate_only.generate_from_inputs(inputs, images, max_new_tokens=1, boxes=boxes)


def test_benchmarks_force_boxes_without_touching_the_zoom(qwen25, tmp_path, monkeypatch):
    """The speed benchmark's box is a pixel box; probes' oracle box covers the plate; the demo leaves the caller's
    zoom and config as they were."""
    import sys
    import types

    from qzoom_adapters.benchmarks import speed
    from qzoom_adapters.benchmarks.zoomworld import probes, shipped
    from qzoom_adapters.benchmarks.zoomworld.generator import make_sample

    (x1, y1, x2, y2), = speed.fixed_boxes([qwen25.images[0]])
    W, H = qwen25.images[0].size
    assert 0.05 < (x2 - x1) * (y2 - y1) / (W * H) < 0.08 and abs((x1 + x2) / 2 - W / 2) <= 1
    box = probes.oracle_box((100, 80, 220, 160), (640, 420), (15, 23))
    assert box[0] <= 100 and box[1] <= 80 and box[2] >= 220 and box[3] >= 160
    assert roi.pixels_to_token_box(box, (15, 23), (640, 420)) == (2, 1, 9, 7)

    samples = [make_sample(20_000_000, "detail")]

    class FakeZoom:
        def __init__(self):
            self.config = qz.ZoomConfig(gate_threshold=0.5)
            self.model = type("M", (), {"device": torch.device("cpu")})()

        def with_config(self, **overrides):  # as QZoom.with_config: a copy with other settings
            other = copy.copy(self)
            other.config = self.config.model_copy(update=overrides)
            return other

        def generate_from_inputs(self, inputs, images, max_new_tokens):
            return [qz.ZoomOutput(tokens=[1], text="x", zoomed=False, gate_prob=0.1, visual_tokens=4)]

    fake_bench = types.ModuleType("qzoom_adapters.benchmarks.zoomworld.bench")
    fake_bench.view_inputs = lambda *a, **k: None
    monkeypatch.setitem(sys.modules, "qzoom_adapters.benchmarks.zoomworld.bench", fake_bench)
    zoom = FakeZoom()
    before = zoom.config
    shipped.run_demo(zoom, None, None, samples, 64, tmp_path)
    assert zoom.config is before and zoom.config.crop_min_pixels is None


# --- 6./7. the steps live in the files named after them -----------------------------------------------------
@torch.no_grad()
def test_roi_layout_lives_in_positions_and_crops_in_roi(qwen25):
    assert pipeline.crop_from_heatmap is roi.crop_from_heatmap  # recipes import it from the pipeline too
    images = qwen25.images[:2]
    inputs = qwen25.inputs(images, qwen25.questions[:2])
    zoom = _zoom(qwen25, gate_threshold=0.0, roi_threshold=0.0)
    a = zoom._pass_a(inputs, images)
    grids = torch.tensor([[1, 4, 6], [1, 6, 4]])
    lay = positions.roi_batch(zoom.spec, a.ids, a.mask, a.pos, [0, 1], grids, [(0, 0, 2, 3), (1, 1, 3, 3)],
                              zoom.position_mode)
    assert isinstance(lay, positions.RoiBatch) and all(isinstance(q, positions.RoiSequence) for q in lay.seqs)
    for j, q in enumerate(lay.seqs):
        assert torch.equal(lay.ids[j][lay.mask[j].bool()], q.ids)  # the row holds the sequence, padding aside
        assert q.pad + q.P <= lay.C and bool(lay.mask[j, -1])  # prefix ends by C, suffix at the last column
        assert torch.equal(lay.pos[:, j][:, lay.mask[j].bool()], q.pos)
