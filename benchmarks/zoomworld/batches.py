"""ZoomWorld's fast training inputs: the Qwen2-VL processor's result, built cheaply in data-loader workers.

The HF image processor spends most of its time normalising and reordering float arrays in numpy
(~40 ms per image at 1024 tokens). Here a worker only resizes (PIL bicubic, as the processor does)
and reorders the *uint8* pixels into patches; `normalize_patches` does the float work on the GPU.
The text side is the processor's own chat template with the image placeholder expanded. A test
checks that ids, grids and normalised pixels equal `spec.chat_inputs` exactly.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


def budget_size(width: int, height: int, pixels: int, factor: int) -> tuple[int, int]:
    """(height, width), multiples of `factor`, as Qwen2-VL's smart_resize with min_pixels = max_pixels = `pixels`."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > pixels:
        beta = math.sqrt(height * width / pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < pixels:
        beta = math.sqrt(pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


class PatchLayout:
    """The processor's patch order and normalisation for one image processor (Qwen2-VL family)."""

    def __init__(self, image_processor):
        ip = image_processor
        self.patch, self.merge, self.temporal = ip.patch_size, ip.merge_size, ip.temporal_patch_size
        self.factor = self.patch * self.merge
        self.scale = float(ip.rescale_factor)
        self.mean, self.std = list(ip.image_mean), list(ip.image_std)

    def resize(self, image: Image.Image, pixels: int) -> tuple[Image.Image, tuple[int, int, int]]:
        """The image at `pixels` (PIL bicubic) and its (t, h, w) patch grid."""
        h, w = budget_size(image.width, image.height, pixels, self.factor)
        resized = image.convert("RGB").resize((w, h), Image.BICUBIC)
        return resized, (1, h // self.patch, w // self.patch)

    def patches_u8(self, image: Image.Image) -> torch.Tensor:
        """uint8 patches (h*w, C*T*P*P) in the processor's order: merge blocks of 2x2 patches, each flattened C,T,P,P."""
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # C, H, W
        C, H, W = x.shape
        p, m, t = self.patch, self.merge, self.temporal
        gh, gw = H // p, W // p
        x = x.unsqueeze(0).expand(t, C, H, W)  # one frame repeated to the temporal patch
        x = x.reshape(t, C, gh // m, m, p, gw // m, m, p).permute(2, 5, 3, 6, 1, 0, 4, 7)
        return x.reshape(gh * gw, C * t * p * p).contiguous()

    def normalize(self, patches_u8: torch.Tensor) -> torch.Tensor:
        """float32 pixel_values exactly as the processor gives them: (x * scale - mean) / std per channel."""
        per = patches_u8.shape[-1] // len(self.mean)
        dev = patches_u8.device
        mean = torch.tensor(self.mean, dtype=torch.float32, device=dev).repeat_interleave(per)
        std = torch.tensor(self.std, dtype=torch.float32, device=dev).repeat_interleave(per)
        return (patches_u8.float() * self.scale - mean) / std


class FastChatInputs:
    """`spec.chat_inputs(processor, images, questions, pixels)` for one image per sample, pixels left as uint8."""

    def __init__(self, processor):
        self.processor = processor
        self.layout = PatchLayout(processor.image_processor)
        tok = processor.tokenizer
        self.tok = tok
        self.image_token = getattr(processor, "image_token", "<|image_pad|>")
        self.image_token_id = tok.convert_tokens_to_ids(self.image_token)
        self.token_types = "mm_token_type_ids" in processor.model_input_names  # 5.x processors add them
        self._template = {}

    def _prompt(self, question: str) -> str:
        if question not in self._template:
            content = [{"type": "image"}, {"type": "text", "text": question}]
            self._template[question] = self.processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
        return self._template[question]

    def __call__(self, images, questions, pixels: int) -> dict:
        texts, patches, grids = [], [], []
        m2 = self.layout.merge ** 2
        for image, q in zip(images, questions):
            resized, grid = self.layout.resize(image, pixels)
            patches.append(self.layout.patches_u8(resized))
            grids.append(grid)
            n = grid[0] * grid[1] * grid[2] // m2
            texts.append(self._prompt(q).replace(self.image_token, self.image_token * n, 1))
        ids = [self.tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        S = max(len(i) for i in ids)
        input_ids = torch.full((len(ids), S), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(ids), S, dtype=torch.long)
        for b, i in enumerate(ids):  # left padding, as chat_inputs
            input_ids[b, S - len(i):] = torch.tensor(i)
            mask[b, S - len(i):] = 1
        out = {"input_ids": input_ids, "attention_mask": mask, "pixel_values_u8": torch.cat(patches),
               "image_grid_thw": torch.tensor(grids, dtype=torch.long)}
        if self.token_types:
            out["mm_token_type_ids"] = (input_ids == self.image_token_id).long()
        return out
