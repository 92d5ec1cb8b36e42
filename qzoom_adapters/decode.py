"""Our own greedy decode loop over a prepared KV cache."""
from __future__ import annotations

import torch


def eos_ids(model) -> set[int]:
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def greedy(trunk, first_logits, attention_mask, last_pos, cache, max_new_tokens: int, eos: set[int]):
    """Greedy tokens per sample, each cut after its first EOS.

    Args:
        first_logits: (B, V) logits after the prompt; attention_mask: (B, S) of the cached sequence;
        last_pos: (axes, B) position of the last prompt token (decode step n gets last_pos + n).
    """
    B = first_logits.shape[0]
    tok = first_logits.argmax(-1)
    steps = [tok]
    done = torch.zeros(B, dtype=torch.bool, device=tok.device)
    eos_t = torch.tensor(sorted(eos), device=tok.device, dtype=tok.dtype) if eos else None
    for n in range(1, max_new_tokens):
        if eos_t is not None:
            done |= torch.isin(tok, eos_t)
            if bool(done.all()):
                break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
        pos = (last_pos + n)[:, :, None]
        tok = trunk.step(tok, attention_mask, pos, cache).argmax(-1)
        steps.append(tok)
    seq = torch.stack(steps, dim=1).tolist()
    out = []
    for row in seq:
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        out.append(row[:cut])
    return out
