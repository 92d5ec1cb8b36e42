"""[global | RoI] training items for the ZoomWorld base model: the layout Q-Zoom's second pass shows it.

The shipped default read a plate no better than 69-77% even from the true plate's crop, and post-SFT on
[global | RoI] sequences (stage 2) read a few more codes but cost the plain answers it does not train. Here the
base model learns to read the RoI block while it keeps training on every other question, so nothing is traded:
a RoI batch is one more kind of batch in the stream (`AnswerCollate(roi_p=...)`).

A RoI item is a scene at one of the Q-Zoom budgets, with a box around one plate as the twig gives it (the plate
anywhere inside, each side 1.3-6x the plate's, snapped out to the global view's token cells), the crop of that
box encoded at the same budget, and the code questions of the plates wholly inside the crop. The sequence is the
pipeline's pass-B sequence (`positions.roi_sequence`: the RoI block right after the global image, aligned
positions), so what the model learns is what it is asked at inference.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qzoom_adapters.positions import roi_sequence
from qzoom_adapters.roi import box_to_pixels
from qzoom_adapters.spec import VisualFeatures

ROI_BUDGETS = (64, 128, 256)  # the budgets Q-Zoom runs at: the global view's and the crop's
SIDE_SCALE = (1.3, 6.0)  # box side / plate side (the shipped twig's boxes are ~16-26x the plate's area)
MIN_CROP_PX = 28  # SPEC 2.7's minimum crop side


def roi_box(plate_box, size, grid_hw, rng: random.Random, scale=SIDE_SCALE):
    """(token box in the global grid, source-pixel crop box) around `plate_box`: each side `scale`x the plate's,
    the plate anywhere inside, snapped out to whole token cells and mapped back to pixels as the pipeline does."""
    (x1, y1, x2, y2), (W, H), (h_t, w_t) = plate_box, size, grid_hw
    bw, bh = (x2 - x1) * rng.uniform(*scale), (y2 - y1) * rng.uniform(*scale)
    bw, bh = min(W, max(bw, x2 - x1)), min(H, max(bh, y2 - y1))
    left = rng.uniform(max(0.0, x2 - bw), min(float(x1), W - bw))
    top = rng.uniform(max(0.0, y2 - bh), min(float(y1), H - bh))
    tx1, ty1 = math.floor(left * w_t / W), math.floor(top * h_t / H)
    tx2 = min(w_t, max(tx1 + 1, math.ceil((left + bw) * w_t / W)))
    ty2 = min(h_t, max(ty1 + 1, math.ceil((top + bh) * h_t / H)))
    box_tok = (tx1, ty1, tx2, ty2)
    return box_tok, box_to_pixels(box_tok, (h_t, w_t), (W, H), MIN_CROP_PX)


def _inside(box, crop) -> bool:
    return box[0] >= crop[0] and box[1] >= crop[1] and box[2] <= crop[2] and box[3] <= crop[3]


def roi_item(item: dict, grid_hw, seed: int) -> dict | None:
    """`item` (a `stream_item`) as a RoI item: its crop, the crop's token box and glyphs, and only the code
    questions of plates wholly in the crop. None when no plate is wholly in view."""
    rng = random.Random(seed * 7907 + 29)
    plates = item.get("plates") or []
    if not plates:
        return None
    target = rng.choice(plates)
    box_tok, px = roi_box(target[2], item["image"].size, grid_hw, rng)
    inside = {code for _, code, box in plates if _inside(box, px)}
    qas = [(q, a) for q, a in item["qas"] if a in inside]  # code answers only: grounding answers are boxes/colours
    if not qas:
        return None
    l, t, r, b = px
    glyphs = [(ch, cx - l, cy - t, h) for ch, cx, cy, h in item["glyphs"] if l <= cx < r and t <= cy < b]
    return {**item, "qas": qas, "boxes": [None] * len(qas), "crop": item["image"].crop(px), "box_tok": box_tok,
            "crop_glyphs": glyphs}


@dataclass
class RoiTrainBatch:
    """A RoI batch in the pass-B layout, left-padded: ids, mask, float positions (3, B, L), labels, and the
    visual features in sequence order (each item's global image, then its crop)."""

    ids: torch.Tensor
    mask: torch.Tensor
    pos: torch.Tensor
    labels: torch.Tensor
    global_feats: VisualFeatures
    crop_feats: VisualFeatures
    feats: VisualFeatures


def roi_batch(objective, batch, ids, mask, pixels, grids, dev) -> RoiTrainBatch:
    """Every item's pass-B sequence (`positions.roi_sequence`, aligned) with the conversation after it."""
    spec, trunk = objective.spec, objective.trunk
    roi = batch["roi"]
    _, pos, feats, _ = trunk.encode(ids, mask, pixels, grids)
    crop_grids = roi["image_grid_thw"].to(dev)
    crop_feats = spec.encode_images(objective.layout.normalize(roi["pixel_values_u8"].to(dev, non_blocking=True)),
                                    crop_grids)
    labels = batch["labels"].to(dev)
    seqs, g_counts, r_counts = [], [], []
    for b, box_tok in enumerate(roi["box_tok"]):
        valid = mask[b].bool()
        s_ids, s_pos, s_lab = ids[b][valid], pos[:, b][:, valid], labels[b][valid]
        grid = spec.token_grid(crop_grids[b])
        new_ids, new_pos, at = roi_sequence(spec, s_ids, s_pos, grid, box_tok, "aligned")
        n_block = new_ids.shape[0] - s_ids.shape[0]
        new_lab = torch.cat([s_lab[:at], s_lab.new_full((n_block,), -100), s_lab[at:]])
        seqs.append((new_ids, new_pos.to(dev), new_lab))
        g_counts.append(int((s_ids == spec.image_token_id).sum()))
        r_counts.append(grid[0] * grid[1])
    L, B = max(s[0].shape[0] for s in seqs), len(seqs)
    out = RoiTrainBatch(ids.new_zeros(B, L), mask.new_zeros(B, L), torch.ones(3, B, L, dtype=torch.float32, device=dev),
                        labels.new_full((B, L), -100), feats, crop_feats, feats)
    for b, (s_ids, s_pos, s_lab) in enumerate(seqs):  # left padding, as pass B
        n = s_ids.shape[0]
        out.ids[b, L - n:], out.mask[b, L - n:], out.pos[:, b, L - n:], out.labels[b, L - n:] = s_ids, 1, s_pos, s_lab
    parts = []
    for g, r in zip(torch.split(feats.embeds, g_counts), torch.split(crop_feats.embeds, r_counts)):
        parts += [g, r]
    out.feats = VisualFeatures(torch.cat(parts), ())  # Qwen2.5-VL: no deepstack features
    return out


def roi_hidden(objective, rb: RoiTrainBatch) -> torch.Tensor:
    """The text model's last hidden states (B, L, D) over a RoI batch."""
    spec, trunk = objective.spec, objective.trunk
    embeds = trunk.embed(rb.ids, rb.feats.embeds)
    return spec.text_model(inputs_embeds=embeds, attention_mask=rb.mask, position_ids=trunk.model_positions(rb.pos),
                           use_cache=False, **spec.decoder_inputs(rb.ids == spec.image_token_id, rb.feats)).last_hidden_state


def roi_loss(objective, batch, ids, mask, pixels, grids, dev):
    """(answer loss, global features, crop features) of a RoI batch."""
    rb = roi_batch(objective, batch, ids, mask, pixels, grids, dev)
    hidden, target = roi_hidden(objective, rb)[:, :-1], rb.labels[:, 1:]
    sel = target != -100
    loss = F.cross_entropy(objective.spec.lm_head(hidden[sel]).float(), target[sel])
    return loss, rb.global_feats, rb.crop_feats
