"""Attention probe (SPEC §4.1): post-softmax attention of chosen query rows at chosen layers.

The probe captures what enters the chosen decoder layers during one forward of the whole
sequence (prompt + response, stopped after the last chosen layer) and recomputes their
attention from the layer's own q/k projections and rotary embeddings. Nothing switches the
model to eager attention or `output_attentions`, so the cost is a few (R x S) score matrices
per chosen layer, and every attention implementation works.
"""
from __future__ import annotations

from contextlib import ExitStack

import torch

from .errors import QZoomError
from .hooks import capture_layer_input, run_until
from .trunk import Trunk


def layer_inputs(trunk: Trunk, layer_ids: list[int], forward_kwargs: dict) -> dict[int, tuple[torch.Tensor, dict]]:
    """(hidden states, kwargs) entering each of `layer_ids` in one forward of the text model.

    The forward stops before the layer after the last one asked for.
    """
    layers = trunk.spec.layers
    last = max(layer_ids)
    with ExitStack() as stack:
        caps = {i: stack.enter_context(capture_layer_input(layers[i], prefill_only=False)) for i in layer_ids}
        if last + 1 < len(layers):
            run_until(trunk.spec.text_model, layers[last + 1], **forward_kwargs)
        else:
            trunk.spec.text_model(**forward_kwargs)
    return {i: (c.hidden, c.kwargs) for i, c in caps.items()}


def attention_rows(spec, layer, hidden: torch.Tensor, kwargs: dict, rows: torch.Tensor,
                   key_mask: torch.Tensor) -> torch.Tensor:
    """Post-softmax attention (B, H, R, S) of query positions `rows` (B, R) over all keys.

    Keys are restricted causally (key <= query position) and to `key_mask` (B, S) (padding);
    scores use the attention's own scaling (1/sqrt(head_dim) by default), softmax in float32.
    """
    q, k = spec.query_key(layer, hidden, kwargs, rows)
    heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[-1]
    k = k.repeat_interleave(heads // kv_heads, dim=1).float()
    scale = getattr(getattr(layer, "self_attn", None), "scaling", None) or dim**-0.5
    scores = torch.einsum("bhrd,bhsd->bhrs", q.float(), k) * scale
    S = k.shape[2]
    causal = torch.arange(S, device=rows.device)[None, None, :] <= rows[:, :, None]  # (B, R, S)
    allowed = causal & key_mask.bool()[:, None, :]
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no allowed key (padding) -> zeros


@torch.no_grad()
def probe_attention(trunk: Trunk, input_ids, attention_mask, pixel_values, grids, rows, layer_ids) -> dict:
    """{layer: (B, H, R, S) attention} of query positions `rows` (B, R) over a full processed sequence.

    `input_ids` may be padded on both sides (left-padded prompts followed by responses of
    different lengths); `attention_mask` marks the real tokens.
    """
    spec = trunk.spec
    if not layer_ids:
        raise QZoomError("the attention probe needs at least one layer")
    bad = [i for i in layer_ids if not 0 <= i < len(spec.layers)]
    if bad:
        raise QZoomError(f"probe layers {bad} do not exist: the model has {len(spec.layers)} decoder layers (0-indexed)")
    embeds, pos, _, extra = trunk.encode(input_ids, attention_mask, pixel_values, grids)
    forward = dict(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=trunk.model_positions(pos),
                   use_cache=False, **extra)
    captured = layer_inputs(trunk, sorted(set(layer_ids)), forward)
    return {i: attention_rows(spec, spec.layers[i], h, kw, rows, attention_mask) for i, (h, kw) in captured.items()}


def average_map(attn: dict, pairs: dict[int, list[int]], row_valid: torch.Tensor, image_mask: torch.Tensor) -> list:
    """Mean over valid rows and (layer, head) pairs of the attention to image tokens, per sample.

    Args:
        attn: {layer: (B, H, R, S)} from `probe_attention`; pairs: {layer: [heads]}.
        row_valid: (B, R) which query rows are real; image_mask: (B, S) image-token keys.
    Returns:
        per sample a 1-D tensor over its image tokens (zeros when it has no valid row).
    """
    total = None
    n_pairs = 0
    for layer, heads in pairs.items():
        a = attn[layer]
        if max(heads) >= a.shape[1]:
            raise QZoomError(f"layer {layer} has {a.shape[1]} heads; head {max(heads)} does not exist")
        part = a[:, list(heads)].sum(dim=1)  # (B, R, S)
        total = part if total is None else total + part
        n_pairs += len(heads)
    w = row_valid.float()
    per_row = (total * w[:, :, None]).sum(dim=1) / (w.sum(dim=1, keepdim=True).clamp(min=1) * n_pairs)  # (B, S)
    return [per_row[b][image_mask[b].bool()] for b in range(per_row.shape[0])]
