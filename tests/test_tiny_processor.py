"""Tests for the offline tiny Qwen2.5-VL processor (backbones/tiny_processor.py)."""

import pytest
import torch
import transformers
from PIL import Image

from qzoom_adapters.backbones.tiny_processor import SPECIAL_TOKENS, TINY_VOCAB_SIZE, tiny_qwen2_5_vl_processor, tiny_qwen_tokenizer

EXPECTED_IDS = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<|vision_start|>": 3,
                "<|vision_end|>": 4, "<|image_pad|>": 5, "<|video_pad|>": 6}
IMAGE_PAD_ID = 5


@pytest.fixture(scope="module")
def proc():
    return tiny_qwen2_5_vl_processor()


@pytest.fixture(scope="module")
def batch(proc):
    """Two chat prompts of different lengths with two images of different sizes, left padded."""
    prompts = ["What is written?", "Hi"]
    texts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
                                      add_generation_prompt=True, tokenize=False) for p in prompts]
    images = [Image.new("RGB", (300, 200), (200, 30, 30)), Image.new("RGB", (200, 260), (30, 30, 200))]
    out = proc(text=texts, images=images, padding=True, return_tensors="pt", padding_side="left")
    return texts, images, out


def test_fixed_special_ids_and_vocab():
    tok = tiny_qwen_tokenizer()
    assert SPECIAL_TOKENS == list(EXPECTED_IDS)
    assert {t: tok.convert_tokens_to_ids(t) for t in EXPECTED_IDS} == EXPECTED_IDS
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 0
    assert len(tok) == TINY_VOCAB_SIZE <= 256
    assert tok("é")["input_ids"] == [tok.unk_token_id]  # outside the char set -> unknown token


def test_chat_template(proc, batch):
    texts, _, _ = batch
    assert texts[0] == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                        "<|vision_start|><|image_pad|><|vision_end|>What is written?<|im_end|>\n"
                        "<|im_start|>assistant\n")


def test_image_pad_expansion(proc, batch):
    _, _, out = batch
    grid = out["image_grid_thw"]
    assert grid.shape == (2, 3) and not torch.equal(grid[0], grid[1])
    merge = proc.image_processor.merge_size
    for i in range(2):
        n_image_pad = int((out["input_ids"][i] == IMAGE_PAD_ID).sum())
        assert n_image_pad == int(grid[i].prod()) // merge**2
    assert out["pixel_values"].shape[0] == int(grid.prod(-1).sum())  # one row per patch


def test_left_padding(proc, batch):
    _, _, out = batch
    ids, mask = out["input_ids"], out["attention_mask"]
    lengths = mask.sum(-1)
    assert lengths[0] != lengths[1]  # padding actually happened
    assert bool(mask[:, -1].all())  # every row ends with a real token
    for i in range(2):
        n_pad = ids.shape[1] - int(lengths[i])
        assert bool((mask[i, :n_pad] == 0).all()) and bool((ids[i, :n_pad] == 0).all())
        assert int(ids[i, n_pad]) == EXPECTED_IDS["<|im_start|>"]
    assert proc.tokenizer.padding_side == "right"  # per-call kwarg did not mutate the tokenizer


def test_decode_round_trip(proc, batch):
    texts, _, out = batch
    expected = texts
    for tok in SPECIAL_TOKENS:
        expected = [t.replace(tok, "") for t in expected]
    assert proc.batch_decode(out["input_ids"], skip_special_tokens=True) == expected
    s = "Hello, World! 123 ~{}[]\n\n  x  y . , 'quoted' \"dq\" a-b_c\\d"
    assert proc.tokenizer.decode(proc.tokenizer(s)["input_ids"]) == s
    assert len(proc.tokenizer(s)["input_ids"]) == len(s)  # one token per character


def test_save_load_same_ids(proc, batch, tmp_path):
    texts, images, out = batch
    proc.save_pretrained(tmp_path)
    loaded = transformers.AutoProcessor.from_pretrained(tmp_path, local_files_only=True)
    assert isinstance(loaded, transformers.Qwen2_5_VLProcessor)
    out2 = loaded(text=texts, images=images, padding=True, return_tensors="pt", padding_side="left")
    assert torch.equal(out2["input_ids"], out["input_ids"])
    assert torch.equal(out2["attention_mask"], out["attention_mask"])
    assert torch.equal(out2["image_grid_thw"], out["image_grid_thw"])
    assert torch.allclose(out2["pixel_values"], out["pixel_values"])
    assert loaded.batch_decode(out2["input_ids"], skip_special_tokens=True) == \
        proc.batch_decode(out["input_ids"], skip_special_tokens=True)
