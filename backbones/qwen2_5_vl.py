"""Qwen2.5-VL (3B/7B, and RL fine-tunes sharing its class): the reference family of Q-Zoom.

Inputs, positions and crops work as in Qwen2-VL (the model class derives from it in
transformers too); what differs is the vision tower's config and the sink mask of SPEC §2.
"""
from __future__ import annotations

import torch

from .qwen2_vl import Qwen2VLSpec


# registered by name in qzoom_adapters.spec.BUILTIN_BACKBONES (imported on the first registry lookup)
class Qwen2_5_VLSpec(Qwen2VLSpec):
    """`Qwen2_5_VLForConditionalGeneration` (M-RoPE, merged 2x2 patches, factor 28)."""

    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    default_K = {"3B": 24, "7B": 18}

    def sink_mask(self, h_t: int, w_t: int, **ctx) -> torch.Tensor:
        """SPEC §2.2: for grids over 256 tokens, drop an L-band at the top-left corner."""
        mask = torch.ones(h_t, w_t)
        if h_t * w_t > 256:
            mask[: max(1, h_t // 4), 0] = 0
            mask[0, : max(1, w_t // 4)] = 0
        return mask

    TINY_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])

    @staticmethod
    def model_class():
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    @staticmethod
    def tiny_processor():
        from .tiny_processor import tiny_qwen2_5_vl_processor

        return tiny_qwen2_5_vl_processor()
