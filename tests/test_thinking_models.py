"""Thinking-with-image one-pass RL checkpoints (ZwZ-style) load through the existing specs."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import qzoom_adapters as qz
from qzoom_adapters.backbones.qwen2_5_vl import Qwen2_5_VLSpec
from qzoom_adapters.backbones.qwen3_vl import Qwen3VLSpec
from qzoom_adapters.backbones.thinking import final_answer, split_thinking
from qzoom_adapters.backbones.tiny_processor import QWEN_CHAT_TEMPLATE
from qzoom_adapters.testing import make_kit, run_conformance

THINK_SYSTEM = ("You are a helpful assistant. Look at the image, reason inside <think></think>, "
                "then give the final answer inside <answer></answer>.")
# what RL trainers typically leave in a saved config / generation config
RL_CONFIG_EXTRAS = {"use_cache": False, "torch_dtype": "bfloat16", "rl_algorithm": "grpo", "reward_model": None}
RL_GENERATION = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 2048}


def _write_checkpoint(spec_cls, path):
    """A tiny model saved the way an RL fine-tune is released: base class, extra config keys, thinking template."""
    torch.manual_seed(7)
    model = spec_cls.model_class()._from_config(spec_cls.tiny_config())
    model.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(RL_CONFIG_EXTRAS, architectures=[spec_cls.model_class().__name__])
    (path / "config.json").write_text(json.dumps(cfg))
    gen = json.loads((path / "generation_config.json").read_text())
    gen.update(RL_GENERATION, eos_token_id=[2, 0], pad_token_id=0)
    (path / "generation_config.json").write_text(json.dumps(gen))
    processor = spec_cls.tiny_processor()
    system = "<|im_start|>system\\n" + THINK_SYSTEM + "<|im_end|>\\n"
    processor.chat_template = QWEN_CHAT_TEMPLATE.replace(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", system.replace("\\n", "\n"))
    processor.save_pretrained(path)


@pytest.mark.parametrize("spec_cls", [Qwen2_5_VLSpec, Qwen3VLSpec], ids=lambda c: c.family)
def test_rl_checkpoint_loads_through_the_base_spec(spec_cls, tmp_path):
    _write_checkpoint(spec_cls, tmp_path)

    def load(seed=0):
        return AutoModelForImageTextToText.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()

    model = load()
    assert isinstance(qz.get_spec(model), spec_cls)
    processor = AutoProcessor.from_pretrained(tmp_path)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}],
                                         add_generation_prompt=True, tokenize=False)
    assert "<think></think>" in text
    kit = make_kit(spec_cls, make_model=load, make_processor=lambda: AutoProcessor.from_pretrained(tmp_path))
    run_conformance(spec_cls, kit=kit, checks=["never_zoom_equals_generate", "kv_reuse_equals_recompute",
                                               "batch_equals_single"])
    _zoomed_answers_are_greedy_and_read_back(kit)


def _printable_ids(tok):
    return [i for i in range(len(tok)) if i not in tok.added_tokens_decoder]


@torch.no_grad()
def _zoomed_answers_are_greedy_and_read_back(kit):
    """The zoomed answers of the RL checkpoint (sampling settings in its generation config) are the unmodified
    model's greedy continuation of the RoI sequence, and `final_answer` of their text is the expected string."""
    tok, spec = kit.processor.tokenizer, qz.get_spec(kit.model)
    keep = torch.zeros(spec.lm_head.weight.shape[0], dtype=torch.bool)
    keep[_printable_ids(tok)] = True
    spec.lm_head.weight[~keep] = 0.0  # the model now writes printable characters, so the text is not empty
    zoom = kit.zoom(gate_threshold=0.0, roi_threshold=0.0, position_mode="sequential")
    outs = zoom.generate(kit.images[:2], kit.questions[:2], max_new_tokens=4, return_trace=True)
    for img, q, o in zip(kit.images[:2], kit.questions[:2], outs):
        assert o.zoomed and len(o.tokens) == 4 and all(keep[t] for t in o.tokens)
        tr = o.trace
        ids = torch.cat([tr["roi_input_ids"], torch.tensor(o.tokens[:-1])])[None]
        crop = spec.process_crops(kit.image_processor, [img.crop(o.bbox)], None, None)
        inputs = kit.inputs([img], [q])
        grids = torch.cat([spec.image_grids(inputs), crop["image_grid_thw"]])
        pos = spec.position_ids(ids, None, grids)
        logits = kit.model_forward_logits(ids, torch.cat([inputs["pixel_values"], crop["pixel_values"]]), grids, pos)
        n = tr["roi_input_ids"].shape[0]
        assert logits[0, n - 1 :].argmax(-1).tolist() == o.tokens, "zoomed answer != greedy recomputation"
        expected = "".join(tok.convert_ids_to_tokens(o.tokens))  # one character per token, no thinking tags
        assert o.text == expected
        assert final_answer(o.text) == expected.strip()
        assert final_answer(f"<think>{q}</think><answer> {o.text} </answer>") == expected.strip()


def test_split_thinking():
    assert split_thinking("<think>the sign is left</think><answer> STOP </answer>") == ("the sign is left", "STOP")
    assert split_thinking("<think>a</think> b") == ("a", "b")
    assert split_thinking("plain") == ("", "plain")
    assert split_thinking("<think>cut off") == ("cut off", "")
    assert final_answer(None) is None
