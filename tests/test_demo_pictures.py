"""Demo pictures explain themselves: caption band, legend, overlay colours apart from the plates, skipped samples."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qzoom_adapters.benchmarks.zoomworld.generator import COLOURS
from qzoom_adapters.viz import (HEATMAP_RGB, PRED_BOX_RGB, TRUE_BOX_DASH, Caption, caption_lines, heatmap_overlay)

W, H = 640, 420
TRUE_BOX = (100, 80, 220, 160)
PRED_BOX = (60, 50, 300, 220)
MARGIN = 150  # RGB distance the overlay colours keep from every plate colour and clutter grey


def _noise(seed=0, w=W, h=H):
    """Mid-grey clutter-like noise (no pure colours anywhere)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(70, 190, (h, w, 3), dtype=np.uint8))


def _peak(h=14, w=20, at=(4, 6)):
    """Logits peaked around cell `at` (the twig's heatmap at token resolution)."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return 6.0 - ((yy - at[0]) ** 2 + (xx - at[1]) ** 2).float()


def _px(img):
    return np.asarray(img.convert("RGB")).astype(int)


def _has(arr, rgb):
    return bool((arr == np.array(rgb)).all(-1).any())


def _nearest_clutter_distance(rgb):
    """Smallest RGB distance to ZoomWorld clutter: grey g in 70..190 with each channel tinted by +-25."""
    best = 1e9
    for g in range(70, 191):
        c = np.clip(np.array(rgb), g - 25, g + 25)
        best = min(best, float(np.linalg.norm(np.array(rgb) - c)))
    return best


ZOOMED = Caption(question="What is written on the blue plate?", answer="K5M", truth="K5M", correct=True,
                 gate_prob=0.873, gate_threshold=0.5, zoomed=True)
SKIPPED = Caption(question="How many plates are there?", answer="3", truth="4", correct=False,
                  gate_prob=0.012, gate_threshold=0.5, zoomed=False)


def test_overlay_colours_cannot_be_taken_for_a_plate_or_clutter():
    for mark in (HEATMAP_RGB, PRED_BOX_RGB):
        for name, plate in COLOURS.items():
            assert np.linalg.norm(np.subtract(mark, plate)) > MARGIN, (mark, name)
        assert _nearest_clutter_distance(mark) > MARGIN, mark
    # the true box is told by its dashes: both dash colours are present and far apart
    assert np.linalg.norm(np.subtract(*TRUE_BOX_DASH)) > 400


def test_heatmap_over_grey_never_looks_like_a_plate():
    """Blended over any mid grey, no heatmap pixel comes near a plate colour (a red or green ramp would)."""
    img = Image.new("RGB", (W, H), (128, 128, 128))
    arr = _px(heatmap_overlay(img, _peak()))
    changed = arr[(arr != 128).any(-1)]
    assert len(changed) > 0.05 * W * H
    line = (arr == np.array(HEATMAP_RGB)).all(-1)
    assert 0 < line.sum() < 0.2 * len(changed)  # the solid half-peak line: a line, not a fill
    assert line[:, 60:-60].any(0).sum() > 100 and line[60:-60].any(1).sum() > 100  # around the peak
    for name, plate in COLOURS.items():
        assert np.linalg.norm(changed - np.array(plate), axis=1).min() > 60, name


def test_without_caption_the_picture_keeps_the_image_size():
    """Backward compatible: positional (image, heatmap, bbox[, true_box]) and the size of the image."""
    img = _noise()
    assert heatmap_overlay(img, _peak(), PRED_BOX).size == img.size
    assert heatmap_overlay(img, None, None, TRUE_BOX).size == img.size


def test_caption_band_goes_under_the_image_and_leaves_its_pixels_intact():
    img = _noise(1)
    out = heatmap_overlay(img, None, PRED_BOX, TRUE_BOX, caption=ZOOMED)
    assert out.width == W and out.height > H + 40
    arr, src = _px(out), _px(img)
    band = arr[H:]
    assert (band == band[0, 0]).all(-1).mean() > 0.5  # a plain band, not the image
    keep = np.ones((H, W), bool)  # everywhere but a few pixels around the two boxes
    for x1, y1, x2, y2 in (PRED_BOX, TRUE_BOX):
        keep[max(0, y1 - 12):y2 + 13, max(0, x1 - 12):x2 + 13] = False
    assert (arr[:H][keep] == src[keep]).all()
    assert not (arr[:H][~keep] == src[~keep]).all()  # and the boxes are drawn


def test_caption_says_question_answer_truth_gate_and_decision():
    zoomed = "\n".join(caption_lines(ZOOMED, drew_heatmap=True, bbox=PRED_BOX, true_box=TRUE_BOX))
    for text in ("What is written on the blue plate?", "'K5M'", "Truth", "RIGHT", "0.873", ">= threshold 0.5",
                 "ZOOMED into box (60, 50, 300, 220)", "heatmap", "predicted box", "true box"):
        assert text in zoomed, text
    skipped = "\n".join(caption_lines(SKIPPED, true_box=None))
    for text in ("How many plates are there?", "'3'", "'4'", "WRONG", "0.012", "< threshold 0.5",
                 "GATE SKIPPED: answered from the global view, no zoom", "no heatmap and no predicted box"):
        assert text in skipped, text
    assert "ZOOMED" not in skipped and "[pred]" not in skipped and "[heat]" not in skipped


def test_legend_is_drawn_in_the_band_with_the_marks_colours():
    img = _noise(2)
    out = _px(heatmap_overlay(img, _peak(), PRED_BOX, TRUE_BOX, caption=ZOOMED))
    band = out[H:]
    for rgb in (HEATMAP_RGB, PRED_BOX_RGB, *TRUE_BOX_DASH):
        assert _has(band, rgb), rgb
    bare = _px(heatmap_overlay(img, None, None, None, caption=SKIPPED))[H:]
    assert not _has(bare, HEATMAP_RGB) and not _has(bare, PRED_BOX_RGB)  # no legend for marks not drawn


def test_skipped_sample_says_so_and_has_no_marks():
    img = _noise(3)
    skipped = heatmap_overlay(img, None, None, None, caption=SKIPPED)
    zoomed = heatmap_overlay(img, _peak(), PRED_BOX, None, caption=ZOOMED)
    s, z = _px(skipped), _px(zoomed)
    assert (s[:H] == _px(img)).all()  # nothing drawn over the scene
    assert not _has(s[:H], PRED_BOX_RGB) and not _has(s[:H], HEATMAP_RGB)
    assert _has(z[:H], PRED_BOX_RGB) and _has(z[:H], HEATMAP_RGB)
    assert s.shape != z.shape or (s != z).any()
    from qzoom_adapters.viz import SKIP_RGB
    assert _has(s[H:], SKIP_RGB) and not _has(z[H:], SKIP_RGB)  # the highlighted "gate skipped" statement


@pytest.mark.parametrize("aspect", [(4, 3), (2, 3)])
def test_text_scales_with_the_image(aspect):
    """The font is relative to the image: twice the width, about twice the band (same wrapping)."""
    w, h = 300 * aspect[0], 300 * aspect[1]
    small = heatmap_overlay(Image.new("RGB", (w, h), (120, 120, 120)), None, caption=SKIPPED)
    big = heatmap_overlay(Image.new("RGB", (2 * w, 2 * h), (120, 120, 120)), None, caption=SKIPPED)
    assert big.width == 2 * w and small.width == w
    assert 1.7 < (big.height - 2 * h) / (small.height - h) < 2.3


def test_run_demo_draws_the_caption(tmp_path, monkeypatch):
    """run_demo hands each picture its question, answer, truth, correctness, gate and decision (no model load)."""
    import sys
    import types

    import qzoom_adapters.viz as viz
    from qzoom_adapters.benchmarks.zoomworld import shipped
    from qzoom_adapters.benchmarks.zoomworld.generator import make_sample
    from qzoom_adapters.config import ZoomConfig
    from qzoom_adapters.outputs import ZoomOutput

    samples = [make_sample(20_000_000, "detail"), make_sample(20_000_003, "global")]
    outs = [ZoomOutput(tokens=[1], text=samples[0].answer, zoomed=True, gate_prob=0.9, heatmap=_peak(),
                       bbox=(10, 20, 400, 300), visual_tokens=120),
            ZoomOutput(tokens=[1], text="wrong", zoomed=False, gate_prob=0.01, visual_tokens=60)]

    class FakeZoom:
        config = ZoomConfig(gate_threshold=0.5)
        model = type("M", (), {"device": torch.device("cpu")})()

        def with_config(self, **overrides):
            return self  # the demo's crop budget does not change the canned outputs

        def generate_from_inputs(self, inputs, images, max_new_tokens):
            return outs

    fake_bench = types.ModuleType("qzoom_adapters.benchmarks.zoomworld.bench")  # the real one imports transformers' processors
    fake_bench.view_inputs = lambda *a, **k: None
    monkeypatch.setitem(sys.modules, "qzoom_adapters.benchmarks.zoomworld.bench", fake_bench)
    seen = []
    real = viz.heatmap_overlay
    monkeypatch.setattr(viz, "heatmap_overlay", lambda *a, **k: seen.append(k["caption"]) or real(*a, **k))
    shipped.run_demo(FakeZoom(), None, None, samples, 64, tmp_path)
    assert [(c.question, c.answer, c.truth, c.correct, c.gate_prob, c.gate_threshold, c.zoomed) for c in seen] == [
        (samples[0].question, samples[0].answer, samples[0].answer, True, 0.9, 0.5, True),
        (samples[1].question, "wrong", samples[1].answer, False, 0.01, 0.5, False)]
    for i, s in enumerate(samples):
        with Image.open(tmp_path / f"sample_{i}.png") as png:
            assert png.width == s.image.width and png.height > s.image.height
            arr = _px(png)
    assert not _has(arr[:samples[1].image.height], PRED_BOX_RGB)  # the skipped one: no predicted box on the scene
