"""Thinking-with-image one-pass RL models (ZwZ-style fine-tunes of Qwen2.5-VL / Qwen3-VL).

These checkpoints keep their base architecture (`Qwen2_5_VLForConditionalGeneration`,
`Qwen3VLForConditionalGeneration`) and `model_type`, so they load through the existing specs:
nothing is registered here. What differs is the output: a reasoning trace before the answer,
in `<think>…</think>` and often `<answer>…</answer>` tags. Give them a generous
`max_new_tokens` and read the answer with `final_answer`. Q-Zoom decodes greedily; the
sampling settings such checkpoints ship in `generation_config.json` are not used.

Tool-loop models (several model calls with crops fed back: DeepEyes, Chain-of-Focus, Mini-o3) run
through `tool_loop.ToolLoop` with a grammar from `tool_grammars`.
"""
from __future__ import annotations

import re

_ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.S)
_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.S)


def split_thinking(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a thinking model's output; an unfinished trace yields an empty answer."""
    reasoning = "\n".join(m.group(0)[len("<think>"):].removesuffix("</think>").strip() for m in _THINK.finditer(text))
    if m := _ANSWER.search(text):
        return reasoning, m.group(1).strip()
    return reasoning, _THINK.sub("", text).strip()


def final_answer(text: str | None) -> str | None:
    """The answer part of `text` (the text itself when it has no thinking tags)."""
    return None if text is None else split_thinking(text)[1]
