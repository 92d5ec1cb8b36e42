"""What the decoder keeps between calls: static buffer sets of recent shapes, bounded by count and bytes (least
recently used out first), and nothing at all after `QZoom.release_buffers()`."""
from __future__ import annotations

import gc
import weakref

import torch


def _run(kit, zoom, n_images: int, n_tokens: int):
    images = kit.images[:n_images]
    return [o.tokens for o in zoom.generate_from_inputs(kit.inputs(images, kit.questions[:n_images]), images,
                                                        max_new_tokens=n_tokens)]


@torch.no_grad()
def test_release_drops_every_buffer_and_the_next_call_rebuilds_them(qwen25, one_thread):
    zoom = qwen25.zoom(gate_threshold=0.0, roi_threshold=0.0, decode="static")
    first = _run(qwen25, zoom, 2, 5)
    assert zoom.decoder.last_mode == "static" and len(zoom.decoder.kept_shapes) == 1
    state = next(iter(zoom.decoder._states.values()))
    buffers = [weakref.ref(t) for t in (*state.kv.keys, *state.kv.values, state.mask, state.out)]
    held = zoom.decoder.buffer_bytes()
    assert held == state.nbytes() > sum(t.numel() * t.element_size() for t in state.kv.keys)
    del state
    copy = zoom.with_config(gate_threshold=0.0)  # shares the decoder: its buffers go too
    assert copy.release_buffers() == held
    gc.collect()
    assert zoom.decoder.kept_shapes == [] and zoom.decoder.buffer_bytes() == 0
    assert all(ref() is None for ref in buffers), "a released buffer is still referenced"
    assert _run(qwen25, zoom, 2, 5) == first  # rebuilt on demand, same answers
    assert len(zoom.decoder.kept_shapes) == 1


@torch.no_grad()
def test_kept_sets_are_bounded_by_count_and_bytes_least_recently_used_first(qwen25, one_thread):
    zoom = qwen25.zoom(gate_threshold=2.0, decode="static")
    dec = zoom.decoder
    dec.max_states = 2
    for n_tokens in (3, 4, 5):  # three shapes (the step count is part of a set's key)
        _run(qwen25, zoom, 1, n_tokens)
    assert [key[2] for key in dec.kept_shapes] == [4, 5]  # the oldest went first
    _run(qwen25, zoom, 1, 4)  # reuse moves it to the most recent end
    assert [key[2] for key in dec.kept_shapes] == [5, 4]
    one = dec._states[dec.kept_shapes[-1]].nbytes()
    dec.max_bytes = one + 1  # room for one set only
    _run(qwen25, zoom, 1, 3)
    assert [key[2] for key in dec.kept_shapes] == [3] and dec.buffer_bytes() <= one + 1
    dec.max_bytes = 1  # below one set: the set in use still stays
    _run(qwen25, zoom, 1, 6)
    assert [key[2] for key in dec.kept_shapes] == [6]
