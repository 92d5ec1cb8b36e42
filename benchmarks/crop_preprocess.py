"""How far crop preprocessing on the device (`ZoomConfig(crop_preprocess="device")`) is from the host path.

On a few crops of the source image (a centred box, a small one that gets upsampled, a wide strip) at a budget:
whether both paths give the same grids, the max / mean absolute difference of their `pixel_values`, the time each
takes for the crops of a batch, and, for a batch whose every sample zooms, whether the generated answers match.
Where this environment has no torchvision-backed processor, it says so instead.

Run by `qzoom bench speed`; alone: `python -m qzoom_adapters.benchmarks.crop_preprocess [--budget 576]`.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time

import torch

from qzoom_adapters import compat
from qzoom_adapters.config import ZoomConfig
from qzoom_adapters.crop_preprocess import CropPreprocessor


def sample_boxes(size: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """A centred box a quarter of each side, a small box near a corner (upsampled), a wide strip."""
    W, H = size
    return [(3 * W // 8, 3 * H // 8, 5 * W // 8, 5 * H // 8), (W // 10, H // 10, W // 10 + max(28, W // 40),
            H // 10 + max(28, H // 40)), (0, H // 2, W, H // 2 + max(28, H // 8))]


def _median_ms(fn, device, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


@torch.no_grad()
def crop_preprocess_report(zoom, image, budget: int, device, inputs_for, batch: int = 4, n_tokens: int = 16) -> dict:
    """The comparison for `zoom` (a `QZoom` whose crop budget is the one to test) on crops of `image`;
    `inputs_for(images, budget)` gives processed inputs on the device."""
    device = torch.device(device)
    ip, spec = zoom.image_processor, zoom.spec
    fast = compat.fast_image_processor(ip, device)
    if fast is None:
        has_tv = importlib.util.find_spec("torchvision") is not None
        return {"available": False, "budget": budget,
                "reason": f"no torchvision-backed form of {type(ip).__name__} "
                          f"({'torchvision installed' if has_tv else 'torchvision not installed'})"}
    cfg = zoom.config
    lo, hi = cfg.crop_min_pixels, cfg.crop_max_pixels
    boxes = sample_boxes(image.size)
    crops = [image.convert("RGB").crop(b) for b in boxes]
    host = spec.process_crops(ip, crops, lo, hi)
    dev = {k: v.cpu() for k, v in spec.process_crops(fast, crops, lo, hi).items()}
    out = {"available": True, "budget": budget, "processor": type(fast).__name__, "crops": batch,
           "grids_equal": torch.equal(host["image_grid_thw"], dev["image_grid_thw"])}
    if out["grids_equal"]:
        d = (host["pixel_values"].float() - dev["pixel_values"].float()).abs()
        out.update(max_abs=float(d.max()), mean_abs=float(d.mean()))
    else:
        out.update(max_abs=float("nan"), mean_abs=float("nan"), host_grids=host["image_grid_thw"].tolist(),
                   device_grids=dev["image_grid_thw"].tolist())
    pre = CropPreprocessor()
    many = [crops[i % len(crops)] for i in range(batch)]
    for where in ("host", "device"):
        c = ZoomConfig(crop_min_pixels=lo, crop_max_pixels=hi, crop_preprocess=where)
        out[f"{where}_ms"] = _median_ms(lambda: pre(spec, ip, many, c, device), device)
    inputs = inputs_for([image] * batch, budget)
    answer_boxes = [boxes[i % len(boxes)] for i in range(batch)]
    tokens = {}
    for where in ("host", "device"):
        z = zoom.with_config(crop_preprocess=where)
        tokens[where] = [o.tokens for o in z.generate_from_inputs(inputs, [image] * batch, max_new_tokens=n_tokens,
                                                                  force_zoom=[True] * batch, boxes=answer_boxes)]
    pairs = [(a, b) for ra, rb in zip(tokens["host"], tokens["device"]) for a, b in zip(ra, rb)]
    out.update(answers=batch, answers_equal=sum(a == b for a, b in zip(tokens["host"], tokens["device"])),
               token_agreement=sum(a == b for a, b in pairs) / max(1, len(pairs)))
    return out


def main(argv=None) -> int:
    from qzoom_adapters.benchmarks import speed

    p = argparse.ArgumentParser(description="crop preprocessing on the device vs the host, on random-weight "
                                            "Qwen2.5-VL-7B shapes (tiny_qwen2_5_vl without CUDA)")
    p.add_argument("--backbone", default=None, help="default: qwen2_5_vl_7b on CUDA, tiny_qwen2_5_vl otherwise")
    p.add_argument("--budget", type=int, default=576)
    args = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = args.backbone or ("qwen2_5_vl_7b" if dev.type == "cuda" else "tiny_qwen2_5_vl")
    bb = speed.build_backbone(name, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32, "sdpa")
    image = speed.source_image(quick=dev.type != "cuda")
    report = crop_preprocess_report(speed.pipeline(bb, args.budget, gate=True), image, args.budget, dev,
                                    lambda images, budget: speed.processed(bb, images, budget, dev))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
