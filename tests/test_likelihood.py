"""`continuation_scores`: the continuation is scored along the path that answers (RoI pass when zoomed, direct
otherwise): its first step is the first decoding step `generate` takes, and the greedy answer scores as greedy."""
from __future__ import annotations

import pytest
import torch

from qzoom_adapters.errors import QZoomError
from qzoom_adapters.likelihood import continuation_scores


@pytest.mark.parametrize("cfg,zoomed", [({"gate_threshold": 0.0, "roi_threshold": 0.0}, True),
                                        ({"gate_threshold": 1.5}, False)], ids=["roi-path", "direct-path"])
@pytest.mark.parametrize("mode", ["aligned", "sequential"])
def test_scores_follow_the_answering_path(qwen25, cfg, zoomed, mode, one_thread):
    zoom = qwen25.zoom(position_mode=mode, **cfg)
    img, q = qwen25.images[1], qwen25.questions[1]
    out = zoom.generate([img], [q], max_new_tokens=4, return_trace=True)[0]
    assert out.zoomed == zoomed
    full = continuation_scores(zoom, [img], [q], [out.tokens])[0]
    first = continuation_scores(zoom, [img], [q], [out.tokens[:1]])[0]
    expected = torch.log_softmax(out.trace["first_logits"].float(), -1)[out.tokens[0]]
    assert first.zoomed == full.zoomed == zoomed and full.tokens == 4
    assert first.logprob == pytest.approx(float(expected), abs=1e-4)
    assert full.is_greedy and full.logprob <= first.logprob
    other = [(out.tokens[0] + 1) % zoom.model.config.text_config.vocab_size]
    assert not continuation_scores(zoom, [img], [q], [other])[0].is_greedy


def test_bad_continuations_fail_clearly(qwen25):
    zoom = qwen25.zoom(gate_threshold=1.5)
    with pytest.raises(QZoomError, match="has no tokens"):
        continuation_scores(zoom, qwen25.images[:1], qwen25.questions[:1], [""])
    with pytest.raises(QZoomError, match="one of each per sample"):
        continuation_scores(zoom, qwen25.images[:2], qwen25.questions[:1], ["a"])
