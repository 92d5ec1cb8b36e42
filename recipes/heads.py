"""`qzoom heads`: choose the stage-1 (layer, head) pairs for a new backbone.

Method (documented in README "Choosing heads for a new backbone"): run the teacher exactly as
`qzoom labels stage1` does on a few hundred records that carry a ground-truth `box`, read every
head of the candidate layers, and score each head per prompt mode by
* grounding lift = (share of its image attention inside the box) / (share of the grid the box
  covers), averaged over samples: > 1 means the head looks where the answer is;
* sink share = the largest share of its image attention on a single cell outside the box,
  averaged: heads that park attention on the same few cells (attention sinks).
Ground-truth boxes are used to **select** heads here (not only to evaluate them). The suggestion
is the top grounding heads (by lift) and the top sink heads (by sink share among heads with lift
below 1); copy it into the recipe's `labels_stage1` section, then check the labels it gives.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


from qzoom_adapters.errors import QZoomError
from qzoom_adapters.labels import cells_inside

from .config import RecipeConfig
from .data import chunks, load_image, read_records
from .models import load_backbone
from .progress import progress
from .stage1 import stage1_prompt
from .teacher import Teacher


def rank_heads(cfg: RecipeConfig, layers: list[int] | None = None, limit: int | None = None,
               top: int = 4, show_progress: bool = True) -> dict:
    sec = cfg.section("labels_stage1")
    model, processor, spec = load_backbone(cfg.model)
    records = [r for r in read_records(sec.records) if r.box is not None][:limit]
    if not records:
        raise QZoomError(f"head selection needs records with a ground-truth `box`; {sec.records} has none")
    layers = list(range(len(spec.layers))) if layers is None else layers
    teacher = Teacher(model, processor, spec, sec.grid, sec.max_new_tokens)
    lift, sink, count = defaultdict(float), defaultdict(float), defaultdict(int)
    bar = progress(total=len(records), desc="scoring heads", disable=not show_progress)
    for batch in chunks(records, sec.batch_size):
        images = [load_image(r) for r in batch]
        out = teacher.run(images, [stage1_prompt(r, sec) for r in batch], layers)
        for b, rec in enumerate(batch):
            rows = out.row_mask[b].to(out.image_mask.device)
            if not bool(rows.any()):
                continue  # a one-token response has no decode step to read
            inside = cells_inside(rec.box, images[b].size, (sec.grid, sec.grid)).flatten().to(out.image_mask.device)
            frac = float(inside.float().mean())
            if frac == 0.0 or frac == 1.0:
                continue
            for layer in layers:
                a = out.attn[layer][b][:, rows][..., out.image_mask[b]].mean(dim=1)  # (H, cells)
                share = a / a.sum(dim=1, keepdim=True).clamp(min=1e-12)
                lifts = (share[:, inside].sum(dim=1) / frac).tolist()
                sinks = share[:, ~inside].max(dim=1).values.tolist()
                for h, (li, si) in enumerate(zip(lifts, sinks)):
                    key = (rec.mode, layer, h)
                    lift[key] += li
                    sink[key] += si
                    count[key] += 1
        bar.update(len(batch))
    bar.close()
    report = {}
    for mode in ("textual", "natural"):
        heads = sorted(({"layer": l, "head": h, "lift": lift[(m, l, h)] / n, "sink": sink[(m, l, h)] / n, "n": n}
                        for (m, l, h), n in count.items() if m == mode), key=lambda d: -d["lift"])
        if not heads:
            continue
        pairs, sinks = defaultdict(list), defaultdict(list)
        for d in heads[:top]:
            pairs[d["layer"]].append(d["head"])
        for d in sorted((d for d in heads if d["lift"] < 1.0), key=lambda d: -d["sink"])[:2]:
            sinks[d["layer"]].append(d["head"])
        report[mode] = {"suggested_pairs": dict(pairs), "suggested_sink_pairs": dict(sinks), "heads": heads}
    return report


def write_report(report: dict, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=1))
