"""The registered transformers pipeline ("qzoom-image-text-to-text") gives `QZoom.generate`'s answers, with the gate
probability, box and heatmap, one sample or a batch."""
from __future__ import annotations

import pytest
import torch

import qzoom_adapters.backbones.tiny_processor  # noqa: F401  (AutoProcessor loads the offline tiny processors)
import qzoom_adapters.hf_pipeline  # noqa: F401  (registers the task)
from qzoom_adapters.benchmarks.zoomworld.shipped import DEFAULT_DIR, demo_samples, load_default
from qzoom_adapters.errors import QZoomError
from qzoom_adapters.hf_pipeline import TASK, QZoomImageTextToTextPipeline

N = 4
GATE = 0.05  # at the processor's default resolution the gate seldom fires; this threshold mixes both paths


@pytest.fixture(scope="module")
def pipe():
    from transformers import pipeline

    return pipeline(TASK, model=str(DEFAULT_DIR / "model"), adapters=str(DEFAULT_DIR), dtype=torch.float32,
                    device="cpu")


@pytest.fixture(scope="module")
def reference():
    zoom, _, _ = load_default(gate_threshold=GATE)
    samples = demo_samples(N)
    return samples, zoom.generate([s.image for s in samples], [s.question for s in samples], max_new_tokens=8)


def test_the_task_is_registered_and_builds_our_class(pipe):
    from transformers.pipelines import PIPELINE_REGISTRY

    assert TASK in PIPELINE_REGISTRY.get_supported_tasks() and isinstance(pipe, QZoomImageTextToTextPipeline)
    assert pipe.zoom.config.gate_threshold == load_default()[0].config.gate_threshold  # the saved settings


def test_pipeline_answers_equal_qzoom_generate(pipe, reference, one_thread):
    samples, ref = reference
    pipe.zoom.config = pipe.zoom.config.model_copy(update={"gate_threshold": GATE})
    assert any(o.zoomed for o in ref) and not all(o.zoomed for o in ref)  # both paths are compared
    batch = pipe([{"image": s.image, "text": s.question} for s in samples], max_new_tokens=8, batch_size=2)
    single = [pipe({"image": s.image, "text": s.question}, max_new_tokens=8) for s in samples[:2]]
    keyword = pipe(images=[s.image for s in samples[:2]], text=[s.question for s in samples[:2]], max_new_tokens=8)
    for got in (batch, single, keyword):
        for out, o in zip(got, ref):
            assert out["generated_text"] == o.text and out["tokens"] == o.tokens
            assert out["zoomed"] == o.zoomed and out["bbox"] == o.bbox and out["visual_tokens"] == o.visual_tokens
            assert out["gate_prob"] == pytest.approx(o.gate_prob, abs=1e-6)
            assert (out["heatmap"] is None) == (o.heatmap is None)
            if o.heatmap is not None:
                torch.testing.assert_close(out["heatmap"], o.heatmap, rtol=0, atol=1e-5)


def test_zoom_settings_as_pipeline_keywords(one_thread):
    from transformers import pipeline

    samples = demo_samples(2)
    always = pipeline(TASK, model=str(DEFAULT_DIR / "model"), adapters=str(DEFAULT_DIR), dtype=torch.float32,
                      device="cpu", gate_threshold=0.0)
    assert always.zoom.config.gate_threshold == 0.0
    outs = always([{"image": s.image, "text": s.question} for s in samples], max_new_tokens=4)
    assert all(o["zoomed"] == (o["bbox"] is not None) for o in outs) and any(o["zoomed"] for o in outs)


def test_bad_inputs_fail_clearly(pipe):
    with pytest.raises(QZoomError, match="each input must be a dict with 'image' and 'text'"):
        pipe("What is written?")
    with pytest.raises(QZoomError, match="got 2 images for 1 texts"):
        pipe(images=[demo_samples(1)[0].image] * 2, text=["a"])
    with pytest.raises(QZoomError, match="unknown qzoom-image-text-to-text call options \\['temperature'\\]"):
        pipe({"image": demo_samples(1)[0].image, "text": "a"}, temperature=0.5)


def test_adapters_are_required():
    from transformers import pipeline

    with pytest.raises(QZoomError, match="needs adapters="):
        pipeline(TASK, model=str(DEFAULT_DIR / "model"), device="cpu")
