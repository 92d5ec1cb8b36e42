"""TwigRPN (SPEC §1.1): a query-conditioned heatmap over image tokens from a branch at layer K."""
from __future__ import annotations

import math

import torch

from .branch import Branch


class TwigRPN(Branch):
    """T layers copied from the trunk; the last contributes only its q/k projections.

    `logit_j = mean over heads (q_last · k_j / sqrt(head_dim))`, with the backbone's RoPE and
    GQA repetition; no softmax, so any attention implementation works.
    """

    def query_scores(self, spec, hidden: torch.Tensor, kwargs: dict, trunk, first: torch.Tensor):
        """Scores against every key (B, S): head-mean of the last position's query (the heatmap), and
        of head 0's query at the first real token `first` (B,) (sink evidence, SPEC §2.2)."""
        h = self.run_body(hidden, kwargs, trunk, self.T - 1)
        B, S = h.shape[:2]
        rows = torch.stack([first.to(h.device), torch.full_like(first, S - 1, device=h.device)], dim=1)
        q, k = spec.query_key(self.layers[-1], h, kwargs, rows)  # q (B,H,2,D), k (B,KV,S,D)
        heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[-1]
        k = k.repeat_interleave(heads // kv_heads, dim=1).float()
        last = torch.einsum("bhd,bhkd->bhk", q[:, :, 1].float(), k).mean(dim=1) / math.sqrt(dim)
        sink = torch.einsum("bd,bhkd->bhk", q[:, 0, 0].float(), k).mean(dim=1) / math.sqrt(dim)
        return last, sink
