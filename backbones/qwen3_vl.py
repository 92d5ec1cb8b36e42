"""Qwen3-VL (4B/8B): interleaved M-RoPE, per-head q/k norms, deepstack, 16-px patches (factor 32).

Differences from Qwen2-VL that Q-Zoom must honour:
* deepstack: the vision tower also returns features that the decoder adds to the image tokens'
  hidden states after its first layers. The RoI tokens need the crop's deepstack features
  (`decoder_inputs`), or the model silently sees them without.
* the sink mask (SPEC §2.2) scores image tokens with the twig's query of head 0 at the first
  token; cells with `sigmoid(score) >= 0.75` are sinks.
The interleaved M-RoPE and the q/k norms need nothing here: rotary embeddings come from the
model's own rotary module and `VisionLanguageSpec.query_key` applies q_norm/k_norm.
"""
from __future__ import annotations

import torch

from qzoom_adapters import compat
from qzoom_adapters.spec import VisualFeatures

from .qwen2_vl import Qwen2VLSpec

SINK_PROB = 0.75


# registered by name in qzoom_adapters.spec.BUILTIN_BACKBONES (imported on the first registry lookup)
class Qwen3VLSpec(Qwen2VLSpec):
    """`Qwen3VLForConditionalGeneration`."""

    family = "qwen3_vl"
    model_types = ("qwen3_vl",)
    default_K = {"4B": 24, "8B": 24}

    @property
    def min_branch_layer(self) -> int:
        """Deepstack adds to the image tokens after layers 0..n-1; a branch must start after them."""
        return max(1, len(getattr(self.config.vision_config, "deepstack_visual_indexes", ()) or ()))

    def decoder_inputs(self, image_mask: torch.Tensor, features: VisualFeatures) -> dict:
        if not features.deepstack:
            return {}
        return {"visual_pos_masks": image_mask, "deepstack_visual_embeds": list(features.deepstack)}

    def sink_mask(self, h_t: int, w_t: int, first_token_scores: torch.Tensor | None = None, **ctx) -> torch.Tensor:
        """Keep cells where the first token's head-0 query does not strongly attend (SPEC §2.2)."""
        if first_token_scores is None:
            return torch.ones(h_t, w_t)
        return (torch.sigmoid(first_token_scores.float()) < SINK_PROB).float().reshape(h_t, w_t)

    TINY_TEXT = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, rms_norm_eps=1e-6,
        **compat.mrope_text_kwargs([2, 3, 3], rope_theta=1000.0, mrope_interleaved=True), tie_word_embeddings=False,
    )
    TINY_VISION = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                       spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                       deepstack_visual_indexes=[0, 1])

    @staticmethod
    def model_class():
        from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration

    @staticmethod
    def tiny_processor():
        from .tiny_processor import tiny_qwen3_vl_processor

        return tiny_qwen3_vl_processor()
