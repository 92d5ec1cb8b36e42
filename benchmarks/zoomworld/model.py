"""The ZoomWorld default model: a Qwen2.5-VL-architecture VLM small enough to ship (~6M parameters).

It uses the project's offline character tokenizer and chat template (`qzoom_adapters.backbones.tiny_processor`), so
the model + processor folder is an ordinary Hugging Face directory that `AutoProcessor` and the
Qwen2.5-VL class load. Stored in bf16 it is ~12 MB.
"""
from __future__ import annotations

from qzoom_adapters import compat
from qzoom_adapters.backbones.qwen2_5_vl import Qwen2_5_VLSpec
from qzoom_adapters.backbones.tiny_processor import TINY_VOCAB_SIZE, tiny_qwen2_5_vl_processor

BUDGETS = (64, 128, 256, 576, 1024)  # visual tokens the model is trained and benchmarked at
FACTOR = 28  # 14-px patches merged 2x2

TEXT = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=192, intermediate_size=512, num_hidden_layers=8,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192, rms_norm_eps=1e-6,
            tie_word_embeddings=True, **compat.mrope_text_kwargs([8, 8, 8], rope_theta=10000.0))
# Every vision block attends globally: HF's sdpa path runs one attention call per window (a Python loop
# over ~64 windows per image at 1024 tokens), per image it is one call; at 4096 patches global is cheap.
VISION = dict(depth=4, hidden_size=192, intermediate_size=512, num_heads=4, out_hidden_size=192, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[0, 1, 2, 3])


def zoomworld_config():
    cls = Qwen2_5_VLSpec.model_class()
    tok = zoomworld_processor().tokenizer
    ids = dict(bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    text = dict(TEXT, **ids)
    flat = {k: v for k, v in text.items() if k not in compat.ROPE_KEYS}  # rope settings only in text_config
    cfg = cls.config_class(text_config=text, vision_config=dict(VISION), **{**Qwen2_5_VLSpec.TINY_IDS, **flat})
    cfg._attn_implementation = "sdpa"
    return cfg


def new_model(seed: int = 0):
    import torch

    torch.manual_seed(seed)
    model = Qwen2_5_VLSpec.model_class()._from_config(zoomworld_config())
    processor = zoomworld_processor()
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model, processor


def zoomworld_processor():
    """Default budget 256 tokens; every call in training and benchmarks sets its own (min = max pixels)."""
    return tiny_qwen2_5_vl_processor(min_pixels=256 * FACTOR**2, max_pixels=256 * FACTOR**2)
