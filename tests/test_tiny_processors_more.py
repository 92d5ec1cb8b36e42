"""Tests for the offline tiny Qwen2-VL, Qwen3-VL and LLaVA processors (backbones/tiny_processor.py)."""

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from qzoom_adapters.backbones.tiny_processor import (TINY_LLAVA_VOCAB_SIZE, TINY_VOCAB_SIZE, tiny_llava_processor,
                                      tiny_llava_tokenizer, tiny_qwen2_vl_processor, tiny_qwen3_vl_processor)

FACTORIES = {"qwen2_vl": tiny_qwen2_vl_processor, "qwen3_vl": tiny_qwen3_vl_processor, "llava": tiny_llava_processor}
PARENTS = {"qwen2_vl": transformers.Qwen2VLProcessor, "qwen3_vl": transformers.Qwen3VLProcessor,
           "llava": transformers.LlavaProcessor}
QUESTIONS = ["What is written on the sign?", "Hi"]


def _image(width, height, seed):
    """A random RGB PIL image."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _messages(question, n_images=1):
    """One user turn: `n_images` image items, then the question."""
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": question}]}]


def _runs(ids, token_id):
    """Number of contiguous blocks of `token_id` in a 1-D id tensor."""
    hits = (ids == token_id).int()
    return int((hits[1:] > hits[:-1]).sum() + hits[0])


def _expected_image_tokens(name, out):
    """Image tokens per image: grid.prod() // merge**2 for Qwen, (84 / 14)**2 for LLaVA."""
    if name == "llava":
        return [36] * out["pixel_values"].shape[0]
    return [int(g.prod()) // 4 for g in out["image_grid_thw"]]


@pytest.fixture(scope="module", params=list(FACTORIES))
def case(request):
    """(name, processor, texts, images, processor output) for a left-padded batch of two prompts."""
    name, proc = request.param, FACTORIES[request.param]()
    texts = [proc.apply_chat_template(_messages(q), add_generation_prompt=True, tokenize=False) for q in QUESTIONS]
    images = [_image(300, 200, 0), _image(120, 260, 1)]
    out = proc(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
    return name, proc, texts, images, out


def test_class_and_no_video_processor(case):
    name, proc, *_ = case
    assert isinstance(proc, PARENTS[name])
    assert getattr(proc, "video_processor", None) is None
    assert proc.image_token_id == proc.tokenizer.convert_tokens_to_ids(proc.image_token)


def test_image_token_count_matches_grid(case):
    name, proc, _, _, out = case
    expected = _expected_image_tokens(name, out)
    assert len(expected) == 2
    for i in range(2):
        assert int((out["input_ids"][i] == proc.image_token_id).sum()) == expected[i]
        assert _runs(out["input_ids"][i], proc.image_token_id) == 1
    if name == "llava":
        assert tuple(out["pixel_values"].shape) == (2, 3, 84, 84)  # any aspect -> 84x84 crop
    else:
        assert not torch.equal(out["image_grid_thw"][0], out["image_grid_thw"][1])
        assert 16 <= min(expected) and max(expected) <= 48  # default pixel budgets: 16..48 merged tokens
        if "mm_token_type_ids" in out:  # transformers 5.x
            assert torch.equal(out["mm_token_type_ids"].bool(), out["input_ids"] == proc.image_token_id)


def test_left_padding(case):
    _, proc, _, _, out = case
    ids, mask = out["input_ids"], out["attention_mask"]
    lengths = mask.sum(-1)
    assert lengths[0] != lengths[1] and bool(mask[:, -1].all())
    short = int(lengths.argmin())
    n_pad = ids.shape[1] - int(lengths[short])
    assert bool((ids[short, :n_pad] == proc.tokenizer.pad_token_id).all()) and not mask[short, :n_pad].any()
    assert proc.tokenizer.pad_token_id == 0


def test_decode_round_trip(case):
    _, proc, texts, _, out = case
    tok = proc.tokenizer
    s = "Hello, World! 123 ~{}[]\n\n  x  y . 'q' \"dq\" a-b_c\\d <b>"
    assert tok.decode(tok(s)["input_ids"]) == s and len(tok(s)["input_ids"]) == len(s)
    expected = list(texts)
    for special in tok.convert_ids_to_tokens(range(tok.convert_tokens_to_ids("\n"))):  # fixed ids before the chars
        expected = [t.replace(special, "") for t in expected]
    assert tok.batch_decode(out["input_ids"], skip_special_tokens=True) == expected


@pytest.mark.parametrize("nested", [True, False])
def test_two_images_give_two_blocks(case, nested):
    name, proc, *_ = case
    text = proc.apply_chat_template(_messages("Which is brighter?", 2), add_generation_prompt=True, tokenize=False)
    assert text.count(proc.image_token) == 2
    pair = [_image(100, 100, 2), _image(64, 200, 3)]
    out = proc(text=[text], images=[pair] if nested else pair, padding=True, padding_side="left",
               return_tensors="pt")
    ids = out["input_ids"][0]
    assert _runs(ids, proc.image_token_id) == 2
    assert int((ids == proc.image_token_id).sum()) == sum(_expected_image_tokens(name, out))
    if name != "llava":
        assert out["image_grid_thw"].shape == (2, 3) and int((ids == 3).sum()) == 2  # two <|vision_start|>


def test_save_load_same_ids(case, tmp_path):
    name, proc, texts, images, out = case
    proc.save_pretrained(tmp_path)
    loaded = transformers.AutoProcessor.from_pretrained(tmp_path, local_files_only=True)
    assert type(loaded) is type(proc) and getattr(loaded, "video_processor", None) is None
    out2 = loaded(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
    assert out2.keys() == out.keys()
    for key in out:
        assert torch.allclose(out2[key].double(), out[key].double()), key


def test_qwen_tokenizer_and_qwen3_attributes():
    proc = tiny_qwen3_vl_processor()
    assert len(proc.tokenizer) == TINY_VOCAB_SIZE
    assert (proc.image_token_id, proc.video_token_id) == (5, 6)
    assert (proc.vision_start_token, proc.vision_start_token_id) == ("<|vision_start|>", 3)
    assert (proc.vision_end_token, proc.vision_end_token_id) == ("<|vision_end|>", 4)
    assert proc.image_processor.patch_size == 16 and proc.image_processor.merge_size == 2


def test_llava_tokenizer_ids():
    tok = tiny_llava_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in ["<pad>", "<s>", "</s>", "<image>", "<unk>"]}
    assert ids == {"<pad>": 0, "<s>": 1, "</s>": 2, "<image>": 3, "<unk>": 4}
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 4)
    assert len(tok) == TINY_LLAVA_VOCAB_SIZE == 101
    assert tok("\n")["input_ids"] == [5] and tok("é")["input_ids"] == [4]
    assert tok("<s>a<image>")["input_ids"] == [1, tok.convert_tokens_to_ids("a"), 3]  # no bos added


def test_llava_chat_template():
    proc = tiny_llava_processor()
    render = proc.apply_chat_template
    assert render(_messages("What?"), add_generation_prompt=True, tokenize=False) == \
        "<s>USER: <image>\nWhat? ASSISTANT:"
    assert render(_messages("Two?", 2), add_generation_prompt=True, tokenize=False) == \
        "<s>USER: <image>\n<image>\nTwo? ASSISTANT:"
    chat = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": [{"type": "text", "text": "Hi"}]},
            {"role": "user", "content": [{"type": "text", "text": "Bye"}]}]
    assert render(chat, add_generation_prompt=False, tokenize=False) == \
        "<s>USER: Hello ASSISTANT: Hi</s>USER: Bye "
