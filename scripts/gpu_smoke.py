"""CUDA smoke check: reference parity in float32 on the GPU, and batched zoomed runs per family.

Runs every registered family too (CUDA fp32 vs CPU fp32, then bf16).

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
sys.path[:0] = [str(ROOT)]
import qzoom_adapters as qz  # noqa: E402
from qzoom_adapters import compat as _compat  # noqa: E402
from qzoom_adapters.testing import make_kit  # noqa: E402

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

torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # compare fp32 with fp32
for family, spec_cls in sorted(qz.registered_families().items()):
    kit = make_kit(spec_cls)
    inputs = kit.inputs(kit.images, kit.questions)
    cfg = dict(gate_threshold=0.0, roi_threshold=0.0, emit_direct=True)
    cpu = kit.zoom(**cfg).generate_from_inputs(inputs, kit.images, max_new_tokens=8, return_trace=True)
    model = kit.fresh_model(0).to(dev)
    gpu = kit.zoom(model, **cfg).generate_from_inputs({k: v.to(dev) for k, v in inputs.items()}, kit.images,
                                                      max_new_tokens=8, return_trace=True)
    err = max((a.trace["first_logits"] - b.trace["first_logits"].cpu()).abs().max().item() for a, b in zip(cpu, gpu))
    same = all((a.tokens, a.bbox, a.direct_tokens) == (b.tokens, b.bbox, b.direct_tokens) for a, b in zip(cpu, gpu))
    model = model.to(torch.bfloat16)
    # after a first forward: transformers may install its own output-capturing hooks then
    hooks = {n: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for n, m in model.named_modules()}
    bf = {k: (v.to(dev, torch.bfloat16) if v.is_floating_point() else v.to(dev)) for k, v in inputs.items()}
    t = time.perf_counter()
    outs = kit.zoom(model, **cfg).generate_from_inputs(bf, kit.images, max_new_tokens=8)
    torch.cuda.synchronize()
    clean = hooks == {n: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for n, m in model.named_modules()}
    print(f"{family:11s} cuda fp32 == cpu fp32: tokens/boxes {same}, first logits max err {err:.1e} | bf16 batch of 3: "
          f"zoomed={[o.zoomed for o in outs]} {time.perf_counter() - t:.2f}s hooks clean: {clean}")
