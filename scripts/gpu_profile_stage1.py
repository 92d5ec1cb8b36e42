"""Where the stage-1 recipe spends its time on the GPU (one batch of 16, Qwen2.5-VL-3B shapes, random bf16).

Usage: python scripts/gpu_profile_stage1.py WORKDIR OUT_JSON
Times (device-synchronised): image loading + processor, HF `generate` (128 tokens, with and without
`suppress_tokens`), the library's own greedy loop (QZoom never zooming), the attention probe, and
one twig training step split into collate and forward + backward.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


def timed(fn, repeat: int = 1):
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    torch.cuda.synchronize()
    return out, (time.perf_counter() - t) / repeat


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_recipes import build

    import qzoom_adapters as qz
    from qzoom_adapters.probe import probe_attention
    from qzoom_adapters.recipes.config import load_config
    from qzoom_adapters.recipes.data import load_image, read_records
    from qzoom_adapters.recipes.label_store import LabelWriter
    from qzoom_adapters.recipes.models import batch_to, freeze, load_backbone, placeholder_ids
    from qzoom_adapters.recipes.stage1 import Stage1Collate, Stage1Dataset, TwigObjective, stage1_prompt
    from qzoom_adapters.recipes.label_store import LabelStore
    from qzoom_adapters.recipes.teacher import Teacher, response_rows

    work, out = Path(sys.argv[1]), Path(sys.argv[2])
    build(work, 32, 1)
    cfg = load_config(work / "recipe.yaml")
    sec = cfg.labels_stage1
    model, processor, spec = load_backbone(cfg.model)
    teacher = Teacher(model, processor, spec, sec.grid, sec.max_new_tokens)
    recs = read_records(sec.records)[:16]
    res = {"batch": 16, "new_tokens": 128}
    images, res["load_images_s"] = timed(lambda: [load_image(r) for r in recs])
    prompts = [stage1_prompt(r, sec) for r in recs]
    inputs, res["prepare_inputs_s"] = timed(lambda: teacher.prepare(images, prompts))
    inputs = batch_to(inputs, model.device)
    S = inputs["input_ids"].shape[1]
    gen = dict(do_sample=False, eos_token_id=sorted(teacher.eos), pad_token_id=teacher.pad_id)
    model.generate(**inputs, max_new_tokens=4, **gen)  # warm-up
    seq, res["generate_s"] = timed(lambda: model.generate(**inputs, max_new_tokens=128, min_new_tokens=128,
                                                          suppress_tokens=placeholder_ids(spec), **gen))
    _, res["generate_no_suppress_s"] = timed(lambda: model.generate(**inputs, max_new_tokens=128,
                                                                    min_new_tokens=128, **gen))
    twig = qz.TwigRPN.from_backbone(model, K=cfg.K, T=cfg.T)
    zoom = qz.QZoom(model, processor, twig=twig, config=qz.ZoomConfig(gate_threshold=2.0))
    never = qz.QZoom(model, processor, twig=twig, gate=qz.DynamicGate.from_backbone(model, K=cfg.K, T=cfg.T),
                     config=qz.ZoomConfig(gate_threshold=2.0))
    del zoom
    never.generate_from_inputs(inputs, images, max_new_tokens=4)
    outs, res["own_greedy_loop_s"] = timed(lambda: never.generate_from_inputs(inputs, images, max_new_tokens=128))
    res["own_greedy_tokens"] = [len(o.tokens) for o in outs]
    resp, resp_mask, rows, row_mask = response_rows(S, seq.cpu(), teacher.eos, teacher.pad_id)
    ids = torch.cat([inputs["input_ids"], resp.cuda()], dim=1)
    mask = torch.cat([inputs["attention_mask"], resp_mask.cuda()], dim=1)
    layers = [8, 20, 21, 22]
    _, res["probe_s"] = timed(lambda: probe_attention(teacher.trunk, ids, mask, inputs["pixel_values"],
                                                      spec.image_grids(inputs), rows.cuda(), layers))
    # one training step on hand-made labels
    folder = work / "prof_labels"
    writer = LabelWriter(folder, {"grid": sec.grid}, 64)
    for r in recs:
        A = torch.full((sec.grid, sec.grid), 1e-3)
        A[3, 5] = 0.5
        writer.add(r.id, A, torch.zeros_like(A), {"mode": r.mode})
    writer.flush()
    freeze(model)
    ds = Stage1Dataset(recs, LabelStore(folder), spec, cfg.stage1.rules)
    collate = Stage1Collate(spec, processor)
    batch, res["train_collate_s"] = timed(lambda: collate([ds[i] for i in range(16)]))
    objective = TwigObjective(model, twig.float().requires_grad_(True))

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = objective(batch)
        loss.backward()
        return loss

    step()
    _, res["train_fwd_bwd_s"] = timed(step, repeat=3)
    res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
