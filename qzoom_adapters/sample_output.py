"""One sample's `ZoomOutput` (and trace) from what the passes of a batch produced."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .outputs import ZoomOutput
from .positions import RoiSequence
from .roi import Crop


@dataclass
class Regions:
    """What the twig found for the zoom-wanting samples of a batch, keyed by batch row."""

    heatmaps: dict[int, torch.Tensor]  # (h_t, w_t) twig logits
    blurred: dict[int, torch.Tensor]  # (h_t, w_t) blurred foreground map
    crops: dict[int, Crop]  # only rows with a non-empty mask or a caller's box: these zoom


@dataclass
class Answer:
    """One row's greedy tokens and the logits of its first decoding step."""

    tokens: list[int]
    first_logits: torch.Tensor


def detokenize(tokenizer, tokens) -> str | None:
    if tokens is None or tokenizer is None:
        return None
    return tokenizer.decode(tokens, skip_special_tokens=True)


def sample_output(i: int, global_ids: torch.Tensor, image_token_id: int, tokenizer, gate_prob, regions: Regions,
                  roi: dict[int, Answer], direct: dict[int, Answer], roi_seqs: dict[int, RoiSequence],
                  return_trace: bool, roi_image: int) -> ZoomOutput:
    """Row `i`'s output; `global_ids`: its pass-A ids (the global view's image tokens are counted there)."""
    zoomed = i in roi
    d, r = direct.get(i), roi.get(i)
    answer = r if zoomed else d
    seq = roi_seqs.get(i)
    crop = regions.crops.get(i)
    n_global = int((global_ids == image_token_id).sum())
    n_roi = int((seq.ids == image_token_id).sum()) - n_global if zoomed else 0  # ids hold both
    out = ZoomOutput(
        tokens=answer.tokens,
        text=detokenize(tokenizer, answer.tokens),
        zoomed=zoomed,
        gate_prob=None if gate_prob is None else float(gate_prob[i]),
        heatmap=regions.heatmaps.get(i),
        bbox=crop.box_px if zoomed else None,
        visual_tokens=n_global + n_roi,
        direct_tokens=d.tokens if d else None,
        roi_tokens=r.tokens if r else None,
        direct_text=detokenize(tokenizer, d.tokens if d else None),
        roi_image=roi_image,
    )
    if return_trace:
        out.trace = {
            "heatmap_logits": regions.heatmaps.get(i),
            "blurred_map": regions.blurred.get(i),
            "gate_prob": out.gate_prob,
            "bbox_tokens": crop.box_tok if crop else None,
            "bbox_pixels": crop.box_px if crop else None,
            "roi_image_grid_thw": seq.grid.cpu() if zoomed else None,
            "roi_input_ids": seq.ids.cpu() if zoomed else None,
            "roi_position_ids": seq.pos.float().cpu() if zoomed else None,
            "first_logits": answer.first_logits.cpu(),
            "direct_first_logits": d.first_logits.cpu() if d else None,
            "roi_image": roi_image,
        }
    return out
