"""CUDA smoke check: reference parity in float32 on the GPU, and a batched bf16 zoomed run.

Usage: python scripts/gpu_smoke.py FIXTURE_DIR   (a refparity case folder, e.g. ../shared/fixtures/refparity/qwen25_a)
"""
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import qzoom_adapters as qz  # noqa: E402
from backbones import _compat  # noqa: E402
from conftest import make_inputs, synthetic_image, tiny_model  # noqa: E402

d, dev = Path(sys.argv[1]), "cuda"
meta = json.loads((d / "meta.json").read_text())
out = load_file(str(d / "outputs.safetensors"))
inp = {k: v.to(dev) for k, v in load_file(str(d / "inputs.safetensors")).items()}
mm = _compat.mm_token_type_ids(inp["input_ids"], 5, 6)
if mm is not None:
    inp["mm_token_type_ids"] = mm
ip = AutoImageProcessor.from_pretrained(str(d / "processor"))
src = Image.open(d / "source.png").convert("RGB")
for run, mode in (("direct", "aligned"), ("roi_reuse", "aligned"), ("roi_std", "sequential")):
    rec = meta["runs"][run]
    z = qz.QZoom.from_reference_checkpoint(d / "model", image_processor=ip, device=dev, gate_threshold=rec["high_res_thresh"],
                                           roi_threshold=rec["roi_conf_thresh"], position_mode=mode)
    o = z.generate_from_inputs(inp, [src], max_new_tokens=8, return_trace=True)[0]
    err = (o.trace["first_logits"].cpu() - out[f"{run}.logits_steps"][0]).abs().max().item()
    print(f"cuda fp32 {run}: tokens_equal={o.tokens == out[f'{run}.tokens'].tolist()} zoomed={o.zoomed} "
          f"box={o.bbox} first_logits_err={err:.2e}")

model = tiny_model().to(dev, torch.bfloat16)
zoom = qz.QZoom(model, image_processor=ip, twig=qz.TwigRPN.from_backbone(model, 3, 3),
                gate=qz.DynamicGate.from_backbone(model, 3, 3),
                config=qz.ZoomConfig(gate_threshold=0.0, roi_threshold=0.0, emit_direct=True))
images = [synthetic_image(300, 200, 1), synthetic_image(220, 260, 2), synthetic_image(180, 120, 3)]
inputs = {k: v.to(dev) for k, v in make_inputs(images, [[40, 41], [50, 51, 52], [60]], ip).items()}
inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
t = time.perf_counter()
outs = zoom.generate_from_inputs(inputs, images, max_new_tokens=8, return_trace=True)
torch.cuda.synchronize()
print(f"cuda bf16 batch of 3: zoomed={[o.zoomed for o in outs]} boxes={[o.bbox for o in outs]} "
      f"tokens={[len(o.tokens) for o in outs]} {time.perf_counter() - t:.2f}s")
print("hooks clean:", all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules()))
