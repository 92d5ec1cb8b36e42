"""Qwen2-VL (2B/7B/72B): a family the paper does not cover, and the worked example of CONTRIBUTING.md.

Everything generic (decoder structure, q/k for the heatmap, input checks, chat prompts) comes
from `VisionLanguageSpec`; this file says only how Qwen2-VL turns an image into tokens and
positions and how a crop is re-encoded.
"""
from __future__ import annotations

import torch

from qzoom_adapters import compat
from qzoom_adapters.errors import QZoomError
from qzoom_adapters.spec import VisualFeatures

from .base import VisionLanguageSpec


# registered by name in qzoom_adapters.spec.BUILTIN_BACKBONES (imported on the first registry lookup)
class Qwen2VLSpec(VisionLanguageSpec):
    """`Qwen2VLForConditionalGeneration`: M-RoPE (t, h, w), 14-px patches merged 2x2 (factor 28)."""

    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
    rope_axes = 3  # position ids are (3, B, S)
    default_position_mode = "aligned"
    grid_keeps_aspect = True  # smart_resize keeps the aspect ratio up to a token of rounding per side
    MAX_CROP_TOKENS = 16384  # the Qwen-VL processors' own default ceiling (max_pixels = 16384 merged tokens)
    # checkpoints of the transformers <= 4.51 layout (the released Q-Zoom Qwen2.5-VL ones): decoder under `model.`,
    # vision tower under `visual.`; io.map_checkpoint_keys applies these where transformers did not convert a key
    checkpoint_key_renames = ((r"^model\.(?!language_model\.|visual\.)", "model.language_model."),
                              (r"^visual\.", "model.visual."))
    vision_attention_config = "vision_config"  # its vision attention takes cu_seqlens (qzoom_adapters.vision_attention)

    @property
    def vision_tower(self):
        return self.core.visual

    @property
    def merge_size(self) -> int:
        return self.config.vision_config.spatial_merge_size

    @property
    def factor(self) -> int:
        """Source pixels per merged token side (28 for 14-px patches merged 2x2)."""
        return self.config.vision_config.patch_size * self.merge_size

    def budget_pixels(self, tokens: int) -> int:
        return int(tokens) * self.factor**2

    def view_kwargs(self, pixels: int | None) -> dict:
        return {} if pixels is None else compat.budget_kwargs(pixels, pixels)

    def validate_inputs(self, inputs: dict) -> None:
        """The generic checks, and as many `pixel_values` rows (patches) as the grids say."""
        super().validate_inputs(inputs)
        grid, pixel_values = self.image_grids(inputs), inputs["pixel_values"]
        patches = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
        if pixel_values.dim() != 2 or pixel_values.shape[0] != patches:
            raise QZoomError(f"pixel_values have shape {tuple(pixel_values.shape)} but the image grids need "
                             f"{patches} patch rows; pass the processor's pixel_values and image_grid_thw together")

    # --- image -> tokens -----------------------------------------------------------------
    def encode_images(self, pixel_values, grids) -> VisualFeatures:
        embeds, deepstack = compat.image_features(self.core, pixel_values, grids)
        return VisualFeatures(torch.cat(embeds), deepstack)

    def token_grid(self, grid_row) -> tuple[int, int]:
        """(h_t, w_t) merged tokens of one image from its `image_grid_thw` row (t, h, w patches)."""
        _, h, w = (int(x) for x in grid_row)
        return h // self.merge_size, w // self.merge_size

    def position_ids(self, input_ids, attention_mask, grids) -> torch.Tensor:
        """The backbone's own M-RoPE positions (3, B, S) for left-padded inputs."""
        pos, _ = compat.rope_index(
            self.core, input_ids, grids, attention_mask, self.image_token_id, self.video_token_id
        )
        return pos

    # --- crops ----------------------------------------------------------------------------
    def global_budget(self, image_processor) -> tuple[int, int]:
        """(min_pixels, max_pixels) of the global view, read from the image processor."""
        size = getattr(image_processor, "size", None) or {}
        lo = getattr(image_processor, "min_pixels", None) or size.get("shortest_edge")
        hi = getattr(image_processor, "max_pixels", None) or size.get("longest_edge")
        if lo is None or hi is None:
            raise QZoomError(f"cannot read min/max pixels from {type(image_processor).__name__}; "
                             "set crop_min_pixels/crop_max_pixels")
        return int(lo), int(hi)

    def check_crop_budget(self, image_processor, min_pixels, max_pixels) -> None:
        """A crop budget beyond every sane size (it would allocate the crop's patches first) is refused.

        The limit is the larger of the global view's max_pixels and `MAX_CROP_TOKENS` merged tokens.
        """
        try:
            _, hi = self.global_budget(image_processor)
        except QZoomError:  # a processor without budgets: only the fixed ceiling applies
            hi = 0
        limit = max(hi, self.MAX_CROP_TOKENS * self.factor**2)
        for name, px in (("crop_min_pixels", min_pixels), ("crop_max_pixels", max_pixels)):
            if px is not None and px > limit:
                raise QZoomError(
                    f"{name}={px} asks for about {px // self.factor**2} visual tokens per crop; the limit is "
                    f"{limit} px "
                    f"({limit // self.factor**2} tokens: the larger of the processor's max_pixels and "
                    f"{self.MAX_CROP_TOKENS} tokens); lower {name}"
                )

    def process_crops(self, image_processor, crops, min_pixels, max_pixels) -> dict:
        """Re-encode crops at a pixel budget (default: the global view's, SPEC §2.8)."""
        self.check_crop_budget(image_processor, min_pixels, max_pixels)
        if min_pixels is None or max_pixels is None:
            lo, hi = self.global_budget(image_processor)
            min_pixels, max_pixels = min_pixels or lo, max_pixels or hi
        out = image_processor(images=crops, return_tensors="pt", **compat.budget_kwargs(min_pixels, max_pixels))
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    # --- building blocks for tests and the demo ------------------------------------------------
    # bos/eos None: Qwen's defaults (151643/151645) lie outside the tiny vocabulary; whoever pairs the model with a
    # tokenizer sets its eos on generation_config (the kit, `qzoom tiny`)
    TINY_TEXT = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, **compat.mrope_text_kwargs([2, 3, 3], rope_theta=1000.0),
    )
    TINY_VISION = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2)
    TINY_IDS = dict(image_token_id=5, video_token_id=6, vision_start_token_id=3, vision_end_token_id=4, pad_token_id=0)

    @staticmethod
    def model_class():
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration

    @classmethod
    def tiny_config(cls, text: dict | None = None, **overrides):
        """A tiny random-init config (token ids of `qzoom_adapters.backbones.tiny_processor`); `text` overrides text fields."""
        text = {**cls.TINY_TEXT, **(text or {})}
        flat = {k: v for k, v in text.items() if k not in compat.ROPE_KEYS}  # rope settings only in text_config
        cfg = cls.model_class().config_class(text_config=text, vision_config=dict(cls.TINY_VISION), **cls.TINY_IDS,
                                             **flat, **overrides)
        cfg._attn_implementation = "sdpa"
        return cfg

    @staticmethod
    def tiny_processor():
        from .tiny_processor import tiny_qwen2_vl_processor

        return tiny_qwen2_vl_processor()
