"""How close the packed vision attention (`qz.fast_vision_attention`) is to the model's own sdpa path, and how fast.

For each budget: two images (the source and a crop of it, so the packed sequence spans images of different sizes)
through the vision tower in fp32 and in bf16, with the model's own attention and with the fast path: max / mean
absolute difference of the merged vision features, which path the fast one took (`varlen` on CUDA bf16; fp32 and CPU
run exact per-segment sdpa), both bf16 paths against the fp32 sdpa features (the error bf16 makes anyway), and the
tower's latency alone in bf16 for both paths. For each dtype the tower's parameters are cast inside a block that
puts the very same parameter tensors back after it (`_parameters_in`), so the model is left exactly as it was.
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch

from qzoom_adapters import fast_vision_attention
from qzoom_adapters import vision_attention as va


def _features(spec, inputs) -> torch.Tensor:
    return spec.encode_images(inputs["pixel_values"], inputs["image_grid_thw"]).embeds.float()


@contextmanager
def _parameters_in(module: torch.nn.Module, dtype: torch.dtype):
    """`module`'s floating-point parameters in `dtype` inside the block (buffers, e.g. fp32 rotary tables, as they
    are); afterwards each parameter holds its own original tensor again."""
    saved = [(p, p.data) for p in module.parameters() if p.is_floating_point() and p.dtype != dtype]
    try:
        for p, data in saved:
            p.data = data.to(dtype)
        yield
    finally:
        for p, data in saved:
            p.data = data


def _diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = (a - b).abs()
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "ref_max_abs": float(b.abs().max())}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tower_ms(fn, device, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


@torch.no_grad()
def vision_closeness(bb, image, budgets, device, inputs_for) -> dict:
    """{budget: closeness and tower timings} for backbone `bb`; `inputs_for(images, budget)` gives processed inputs
    on the device."""
    spec, tower = bb.spec, bb.spec.vision_tower
    second = image.crop((0, 0, image.width // 2, image.height // 3))
    out = {}
    for budget in budgets:
        inputs = inputs_for([image, second], budget)
        feats, paths = {}, {}
        for dtype in (torch.float32, torch.bfloat16):
            name = str(dtype).replace("torch.", "")
            with _parameters_in(tower, dtype):
                ref = _features(spec, inputs)
                va.CALLS.clear()
                with fast_vision_attention(bb.model):
                    fast = _features(spec, inputs)
            paths[name] = dict(va.CALLS)
            feats[name] = (ref, fast)
        row = {"fast_vs_sdpa": {name: {**_diff(fast, ref), "path": "+".join(sorted(paths[name])) or "none"}
                                for name, (ref, fast) in feats.items()},
               "bf16_vs_fp32_sdpa": {"sdpa": _diff(feats["bfloat16"][0], feats["float32"][0])["max_abs"],
                                     "fast": _diff(feats["bfloat16"][1], feats["float32"][0])["max_abs"]},
               "patches": int(inputs["pixel_values"].shape[0])}
        if device.type == "cuda":  # the model as built (bf16); timings mean nothing on a busy CPU
            def fast_call():
                with fast_vision_attention(bb.model):
                    _features(spec, inputs)

            row["tower_ms"] = {"sdpa": _tower_ms(lambda: _features(spec, inputs), device),
                               "fast": _tower_ms(fast_call, device)}
        out[str(budget)] = row
    return out
