"""LLaVA-1.5 (7B/13B, HF `LlavaForConditionalGeneration`): CLIP grid, 1-D RoPE, no vision markers.

How Q-Zoom maps onto it (SD-RPN's LLaVA variant):
* the global view is the processor's fixed-size square (24x24 = 576 tokens at 336 px); the
  crop is padded to a square with the processor's mean colour (LLaVA-1.5's `expand2square`)
  and encoded at the same fixed size, so crop budgets do not apply;
* the RoI block is the crop's image tokens appended right after the global image tokens (no
  start/end markers); positions are 1-D and sequential (the crop continues the positions);
* HF's CLIP processor resizes the short side and centre-crops: the token grid then covers only
  the central square of the source image, and boxes are mapped through that window;
* no sink mask.
"""
from __future__ import annotations

import torch
from PIL import Image

from qzoom_adapters import compat
from qzoom_adapters.errors import QZoomError
from qzoom_adapters.spec import VisualFeatures

from .base import VisionLanguageSpec


# registered by name in qzoom_adapters.spec.BUILTIN_BACKBONES (imported on the first registry lookup)
class LlavaSpec(VisionLanguageSpec):
    """`LlavaForConditionalGeneration` with a CLIP tower and a Llama-style decoder."""

    family = "llava"
    model_types = ("llava",)
    # the transformers <= 4.51 layout (SD-RPN's LLaVA-1.5 checkpoints): io.map_checkpoint_keys applies these where
    # transformers did not convert a key
    checkpoint_key_renames = ((r"^language_model\.model\.", "model.language_model."),
                              (r"^language_model\.lm_head\.", "lm_head."),
                              (r"^(vision_tower|multi_modal_projector)\.", r"model.\1."))
    rope_axes = 1
    default_position_mode = "sequential"
    default_K = {"7B": 15}

    @property
    def patch_grid(self) -> int:
        vision = self.config.vision_config
        return vision.image_size // vision.patch_size

    def budget_pixels(self, tokens: int) -> None:
        """LLaVA-1.5 sees every image at the processor's fixed size: only that grid's token count is valid."""
        if int(tokens) != self.patch_grid**2:
            raise QZoomError(f"LLaVA encodes images at a fixed {self.patch_grid}x{self.patch_grid} grid "
                             f"({self.patch_grid**2} tokens); a budget of {tokens} tokens is not possible")
        return None

    # --- image -> tokens -----------------------------------------------------------------
    def image_grids(self, inputs: dict) -> torch.Tensor:
        pixel_values = inputs.get("pixel_values")
        if pixel_values is None or pixel_values.dim() != 4:
            raise QZoomError("LLaVA inputs need `pixel_values` of shape (B, 3, H, W) (the processor's output)")
        g = self.patch_grid
        return torch.tensor([[1, g, g]] * pixel_values.shape[0], device=pixel_values.device)

    def token_grid(self, grid_row) -> tuple[int, int]:
        return int(grid_row[1]), int(grid_row[2])

    def encode_images(self, pixel_values, grids) -> VisualFeatures:
        embeds, _ = compat.image_features(self.core, pixel_values)
        return VisualFeatures(torch.cat(list(embeds)))

    def position_ids(self, input_ids, attention_mask, grids) -> torch.Tensor:
        """1-D positions counting only real tokens (what HF generate uses for left padding), (1, B, S)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pos = attention_mask.long().cumsum(-1) - 1
        return pos.masked_fill(attention_mask == 0, 1)[None]

    def source_window(self, image_processor, image_size) -> tuple[float, float, float, float]:
        """The centre square a resize-short-side + centre-crop processor keeps; else the whole image."""
        W, H = image_size
        if not getattr(image_processor, "do_center_crop", False):
            return 0.0, 0.0, float(W), float(H)
        short = image_processor.size["shortest_edge"]
        ch, cw = image_processor.crop_size["height"], image_processor.crop_size["width"]
        scale = min(W, H) / short  # source pixels per processed pixel
        rw, rh = W / scale, H / scale
        left, top = max(0.0, (rw - cw) / 2) * scale, max(0.0, (rh - ch) / 2) * scale
        return left, top, min(float(W), left + cw * scale), min(float(H), top + ch * scale)

    # --- crops ----------------------------------------------------------------------------
    def process_crops(self, image_processor, crops, min_pixels, max_pixels) -> dict:
        """Pad each crop to a square with the mean colour, encode at the processor's fixed size."""
        if min_pixels is not None or max_pixels is not None:
            raise QZoomError("LLaVA encodes every crop at the processor's fixed size; unset "
                             "crop_min_pixels/crop_max_pixels")
        fill = tuple(int(round(255 * m)) for m in image_processor.image_mean)
        squares = []
        for crop in crops:
            side = max(crop.size)
            square = Image.new("RGB", (side, side), fill)
            square.paste(crop, ((side - crop.width) // 2, (side - crop.height) // 2))
            squares.append(square)
        pixel_values = image_processor(images=squares, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, "image_grid_thw": self.image_grids({"pixel_values": pixel_values})}

    # --- building blocks for tests and the demo ------------------------------------------------
    @staticmethod
    def model_class():
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    @classmethod
    def tiny_config(cls, text: dict | None = None, **overrides):
        """A tiny random-init config: CLIP 84 px / 14 px patches (6x6 tokens), 8-layer Llama."""
        from transformers import LlavaConfig

        text = {**dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rope_theta=1000.0,
                       rms_norm_eps=1e-6, pad_token_id=0, tie_word_embeddings=False), **(text or {})}
        vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, image_size=84, patch_size=14, projection_dim=32)
        cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=3, projector_hidden_act="gelu",
                          vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=0, **overrides)
        cfg._attn_implementation = "sdpa"
        cfg.text_config._attn_implementation = "sdpa"
        return cfg

    @staticmethod
    def tiny_processor():
        from .tiny_processor import tiny_llava_processor

        return tiny_llava_processor()
