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

    def query_scores(self, spec, hidden: torch.Tensor, kwargs: dict, trunk) -> torch.Tensor:
        """(B, S) logits of the last sequence position's query against every key."""
        h = self.run_body(hidden, kwargs, trunk, self.T - 1)
        q, k = spec.query_key(self.layers[-1], h, kwargs)  # q (B,H,1,D), k (B,KV,S,D)
        heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[-1]
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) / math.sqrt(dim)
        return scores.mean(dim=1)[:, -1]
