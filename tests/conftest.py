"""Tiny random Qwen2.5-VL models, synthetic images and processed inputs (no downloads)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from backbones import _compat
from backbones.qwen2_5_vl import Qwen2_5_VLSpec

MIN_PX, MAX_PX = 12544, 37632
IMG, VS, VE, PAD = 5, 3, 4, 0


def tiny_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = Qwen2_5_VLSpec.tiny_config(**overrides)
    model = Qwen2_5_VLSpec.model_class()._from_config(cfg).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model


def image_processor():
    return _compat.qwen_image_processor(min_pixels=MIN_PX, max_pixels=MAX_PX)


def synthetic_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    arr[h // 3 : h // 2, w // 2 : 3 * w // 4] = (255, 0, 0)
    return Image.fromarray(arr)


def make_inputs(images, questions, ip=None, extra_image_in=None):
    """Left-padded processor-like inputs: system, user(image + question), assistant prompt."""
    ip = ip or image_processor()
    enc = ip(images=images, return_tensors="pt", **_compat.budget_kwargs(MIN_PX, MAX_PX))
    rows = []
    for i, q in enumerate(questions):
        n = int(enc["image_grid_thw"][i].prod()) // 4
        rows.append([1, 8, 7, 30, 31, 2, 7, 1, 9, 7, VS] + [IMG] * n + [VE] + list(q) + [2, 7, 1, 10, 7])
    S = max(map(len, rows))
    ids = torch.full((len(rows), S), PAD)
    mask = torch.zeros(len(rows), S, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, S - len(r) :] = torch.tensor(r)
        mask[i, S - len(r) :] = 1
    out = {"input_ids": ids, "attention_mask": mask, "pixel_values": enc["pixel_values"],
           "image_grid_thw": enc["image_grid_thw"]}
    mm = _compat.mm_token_type_ids(ids, IMG, 6)
    if mm is not None:
        out["mm_token_type_ids"] = mm
    return out


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def ip():
    return image_processor()


@pytest.fixture(scope="module")
def batch3():
    images = [synthetic_image(300, 200, 1), synthetic_image(220, 260, 2), synthetic_image(180, 120, 3)]
    questions = [[40, 41, 42], [50, 51, 52, 53, 54], [60, 61]]
    return images, questions
