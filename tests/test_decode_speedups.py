"""The fast paths give the same answers: static decode == dynamic decode, one merged decode loop == separate
runs, the gate's last-row computation == the full last layer, and the static loop reads nothing back per token."""
from __future__ import annotations

import time
from contextlib import contextmanager

import pytest
import torch
from torch.overrides import TorchFunctionMode

from qzoom_adapters import DynamicGate, QZoomError, ZoomConfig
from qzoom_adapters.decode import CHECK_EVERY
from qzoom_adapters.timing import StageTimer

FAMILIES = ["qwen25", "qwen3", "llava"]
HOST_READS = {"__bool__", "item", "tolist", "__int__", "__float__", "cpu", "numpy", "__index__"}


class HostReads(TorchFunctionMode):
    """Counts tensor -> Python reads (each one is a device sync on a GPU)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_READS:
            self.n += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def _eos(model, eos):
    """Set the shared (module-scoped) model's EOS for a block, and always put the old one back."""
    before = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = eos
    try:
        yield
    finally:
        model.generation_config.eos_token_id = before


def _run(kit, zoom, force, n_tokens=12):
    images, questions = kit.images[: len(force)], kit.questions[: len(force)]
    return zoom.generate_from_inputs(kit.inputs(images, questions), images, max_new_tokens=n_tokens,
                                     force_zoom=force, return_trace=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_static_decode_equals_dynamic_and_merged_equals_separate(family, request):
    kit = request.getfixturevalue(family)
    zoom = kit.zoom(roi_threshold=0.0)
    eos = kit.model.generation_config.eos_token_id
    force = [True, False, True][: len(kit.images)]
    out = {}
    with _eos(zoom.model, None):  # every row decodes all its steps
        for mode in ("dynamic", "static"):
            zoom.config = zoom.config.model_copy(update={"decode": mode})
            out[mode] = _run(kit, zoom, force)
            assert zoom.decoder.last_mode == mode
        assert [o.zoomed for o in out["static"]] == force
        assert [o.tokens for o in out["static"]] == [o.tokens for o in out["dynamic"]]
        assert all(len(o.tokens) == 12 for o in out["static"])
        # one merged loop (zoomed + direct rows right-aligned in one cache) == each sample on its own
        for i, z in enumerate(force):
            single = zoom.generate_from_inputs(kit.inputs(kit.images[i : i + 1], kit.questions[i : i + 1]),
                                               kit.images[i : i + 1], max_new_tokens=12, force_zoom=[z])[0]
            assert single.tokens == out["static"][i].tokens
            assert single.zoomed == z
    assert kit.model.generation_config.eos_token_id == eos  # the shared model is as the other tests expect it


def test_static_decode_reads_the_host_once_per_check_interval(qwen25):
    zoom = qwen25.zoom(roi_threshold=0.0, decode="static")
    n = 3 * CHECK_EVERY + 1
    for eos, bound in ((None, 1), (qwen25.processor.tokenizer.eos_token_id, 1 + n // CHECK_EVERY)):
        with _eos(zoom.model, eos):
            images, questions = qwen25.images[:2], qwen25.questions[:2]
            inputs = qwen25.inputs(images, questions)
            zoom.generate_from_inputs(inputs, images, max_new_tokens=n, force_zoom=[True, False])  # buffers exist

            reads = HostReads()
            original = zoom.decoder._static

            def counted(*args, **kwargs):
                with reads:
                    return original(*args, **kwargs)

            zoom.decoder._static = counted
            try:
                outs = zoom.generate_from_inputs(inputs, images, max_new_tokens=n, force_zoom=[True, False])
            finally:
                del zoom.decoder._static
            assert reads.n <= bound, f"{reads.n} host reads in a {n}-token static decode"
            if eos is None:
                assert all(len(o.tokens) == n for o in outs)
    assert zoom.model.generation_config.eos_token_id == qwen25.processor.tokenizer.eos_token_id


@pytest.mark.parametrize("family", FAMILIES)
def test_gate_last_row_equals_the_full_last_layer(family, request):
    kit = request.getfixturevalue(family)
    torch.manual_seed(0)
    gate = DynamicGate.from_backbone(kit.model, K=kit.K, T=kit.T)
    zoom = kit.zoom()
    images, questions = kit.images[:2], ["a much longer question so the other one is padded?", "hi"]
    a = zoom.trunk.prefill(kit.inputs(images, questions), kit.K, None)
    assert not bool(a.mask.all())  # left padding is exercised
    fast = gate.logits(zoom.spec, a.hK, a.kwargs, zoom.trunk)
    full = gate.head(gate.run_body(a.hK, a.kwargs, zoom.trunk, gate.T)[:, -1]).float().squeeze(-1)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)


def test_force_zoom_and_decode_mode_errors(qwen25):
    zoom = qwen25.zoom()
    images, questions = qwen25.images[:2], qwen25.questions[:2]
    with pytest.raises(QZoomError, match="force_zoom has 1 decisions for a batch of 2"):
        zoom.generate_from_inputs(qwen25.inputs(images, questions), images, force_zoom=[True])
    no_twig = type(zoom)(zoom.model, qwen25.processor, gate=zoom.gate)
    with pytest.raises(QZoomError, match="no twig"):
        no_twig.generate_from_inputs(qwen25.inputs(images, questions), images, force_zoom=[True, False])
    with pytest.raises(ValueError, match="decode"):
        ZoomConfig(decode="fast")


def _timed(zoom, inputs, images, force, n_tokens):
    with StageTimer() as timer:
        t0 = time.perf_counter()
        outs = zoom.generate_from_inputs(inputs, images, max_new_tokens=n_tokens, force_zoom=force)
        wall = time.perf_counter() - t0
    return timer, outs, wall


def test_stage_timer_names_every_stage_of_a_mixed_batch(qwen25):
    zoom = qwen25.zoom(roi_threshold=0.0)
    images, questions = qwen25.images[:2], qwen25.questions[:2]
    inputs = qwen25.inputs(images, questions)
    with _eos(zoom.model, None):  # every row decodes all 5 tokens: the step count is known
        timer, outs, wall = _timed(zoom, inputs, images, [True, False], 5)
        seconds = timer.seconds()
        assert set(seconds) == {"vision", "pass_a", "gate", "twig", "crop_encode", "roi_pass", "direct_pass", "decode"}
        assert all(v > 0 for v in seconds.values()), seconds
        # the stages follow one another inside the call: none overlaps another, together they are most of it
        marks = timer._marks
        assert all(a < b for _, a, b in marks) and all(m[2] <= n[1] for m, n in zip(marks, marks[1:]))
        assert 0.5 * wall < sum(seconds.values()) <= wall, (seconds, wall)
        assert [len(o.tokens) for o in outs] == [5, 5] and timer.counts == {"decode_steps": 5}
        # a batch that does not zoom runs (and times) no twig, crop or RoI pass
        plain, _, _ = _timed(zoom, inputs, images, [False, False], 3)
        assert set(plain.seconds()) == {"vision", "pass_a", "gate", "direct_pass", "decode"}
        assert plain.counts == {"decode_steps": 3}
    # outside a timer nothing is recorded
    zoom.generate_from_inputs(inputs, images, max_new_tokens=2, force_zoom=[False, False])
    assert timer.seconds() == seconds and timer.counts == {"decode_steps": 5}
