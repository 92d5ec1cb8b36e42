"""Qwen2.5-VL (3B/7B, and RL fine-tunes sharing its class): the reference family of Q-Zoom."""
from __future__ import annotations

import torch
from torch import nn

from qzoom_adapters.errors import QZoomError
from qzoom_adapters.spec import register_backbone

from . import _compat


@register_backbone
class Qwen2_5_VLSpec:
    """Spec for `Qwen2_5_VLForConditionalGeneration` (M-RoPE, merged 2x2 patches, factor 28)."""

    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    rope_axes = 3
    default_K = {"3B": 24, "7B": 18}

    def __init__(self, model: nn.Module):
        self.model = model
        self.core = model.model  # Qwen2_5_VLModel: .visual, .language_model
        self.config = model.config
        self.text_config = getattr(model.config, "text_config", model.config)

    # --- structure -------------------------------------------------------------------
    @property
    def text_model(self):
        return self.core.language_model

    @property
    def layers(self):
        return self.text_model.layers

    @property
    def norm(self):
        return self.text_model.norm

    @property
    def lm_head(self):
        return self.model.lm_head

    @property
    def embed_tokens(self):
        return self.text_model.embed_tokens

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    @property
    def video_token_id(self) -> int:
        return self.config.video_token_id

    @property
    def vision_start_id(self) -> int:
        return self.config.vision_start_token_id

    @property
    def vision_end_id(self) -> int:
        return self.config.vision_end_token_id

    @property
    def merge_size(self) -> int:
        return self.config.vision_config.spatial_merge_size

    # --- inputs ----------------------------------------------------------------------
    def validate_inputs(self, inputs: dict) -> None:
        ids = inputs["input_ids"]
        if inputs.get("pixel_values_videos") is not None or (ids == self.video_token_id).any():
            raise QZoomError("video input is not supported by Q-Zoom; pass one still image per sample")
        n_images = (ids == self.vision_start_id).sum(dim=1)
        if (n_images == 0).any() or not (ids == self.image_token_id).any(dim=1).all():
            raise QZoomError("every sample needs exactly one image, but some sample has no image tokens")
        if (n_images > 1).any():
            raise QZoomError(
                f"more than one image per sample is not supported yet (images per sample: {n_images.tolist()})"
            )
        grid = inputs.get("image_grid_thw")
        if grid is None or inputs.get("pixel_values") is None:
            raise QZoomError("inputs need `pixel_values` and `image_grid_thw` (the processor's output)")
        if grid.shape[0] != ids.shape[0]:
            raise QZoomError(f"image_grid_thw has {grid.shape[0]} rows for {ids.shape[0]} samples")
        per_sample = (ids == self.image_token_id).sum(dim=1)
        expected = grid.prod(-1) // self.merge_size**2
        if not torch.equal(per_sample.cpu(), expected.cpu()):
            raise QZoomError(f"image tokens per sample {per_sample.tolist()} do not match image_grid_thw {expected.tolist()}")

    def encode_images(self, pixel_values, grid_thw) -> list[torch.Tensor]:
        return _compat.image_features(self.core, pixel_values, grid_thw)

    def token_grid(self, grid_thw_row) -> tuple[int, int]:
        _, h, w = (int(x) for x in grid_thw_row)
        return h // self.merge_size, w // self.merge_size

    def position_ids(self, input_ids, attention_mask, grid_thw) -> torch.Tensor:
        pos, _ = _compat.rope_index(
            self.core, input_ids, grid_thw, attention_mask, self.image_token_id, self.video_token_id
        )
        return pos

    def global_budget(self, image_processor) -> tuple[int, int]:
        lo = getattr(image_processor, "min_pixels", None)
        hi = getattr(image_processor, "max_pixels", None)
        size = getattr(image_processor, "size", None) or {}
        lo = lo or size.get("shortest_edge")
        hi = hi or size.get("longest_edge")
        if lo is None or hi is None:
            raise QZoomError(f"cannot read min/max pixels from {type(image_processor).__name__}; set crop_min_pixels/crop_max_pixels")
        return int(lo), int(hi)

    def process_crops(self, image_processor, crops: list, min_pixels: int, max_pixels: int) -> dict:
        out = image_processor(images=crops, return_tensors="pt", **_compat.budget_kwargs(min_pixels, max_pixels))
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def chat_inputs(self, processor, images: list, questions: list[str]) -> dict:
        texts = [
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                add_generation_prompt=True,
                tokenize=False,
            )
            for q in questions
        ]
        return dict(processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt"))

    # --- layers ----------------------------------------------------------------------
    def call_layer(self, layer, hidden, kwargs) -> torch.Tensor:
        return _compat.layer_output(layer(hidden_states=hidden, **kwargs))

    def query_key(self, layer, hidden, kwargs):
        """Post-RoPE query of the last position (B,H,1,D) and keys of all positions (B,KV,S,D)."""
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        B, S, _ = x.shape
        d = attn.head_dim
        q = attn.q_proj(x[:, -1:]).view(B, 1, -1, d)
        k = attn.k_proj(x).view(B, S, -1, d)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = kwargs["position_embeddings"]
        q, _ = _compat.apply_mrope(q, q, cos[..., -1:, :], sin[..., -1:, :], attn)
        k, _ = _compat.apply_mrope(k, k, cos, sin, attn)
        return q, k

    def sink_mask(self, h_t: int, w_t: int, **ctx) -> torch.Tensor:
        """SPEC §2.2: for grids over 256 tokens, drop an L-band at the top-left corner."""
        mask = torch.ones(h_t, w_t)
        if h_t * w_t > 256:
            mask[: max(1, h_t // 4), 0] = 0
            mask[0, : max(1, w_t // 4)] = 0
        return mask

    # --- reference checkpoints ---------------------------------------------------------
    @staticmethod
    def model_class():
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    @staticmethod
    def tiny_config(**overrides):
        """A tiny random-init config for tests and the CPU demo."""
        from transformers import Qwen2_5_VLConfig

        text = dict(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, rope_theta=1000.0, rms_norm_eps=1e-6,
            rope_scaling={"type": "mrope", "rope_type": "default", "mrope_section": [2, 3, 3]},
            tie_word_embeddings=False,
        )
        text.update(overrides.pop("text", {}))
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
        cfg = Qwen2_5_VLConfig(
            text_config=text, vision_config=vision, image_token_id=5, video_token_id=6,
            vision_start_token_id=3, vision_end_token_id=4, pad_token_id=0, **text, **overrides,
        )
        cfg._attn_implementation = "sdpa"
        return cfg
