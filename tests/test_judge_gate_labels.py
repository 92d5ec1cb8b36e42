"""Stage-2 judges (metrics, RuleJudge, likelihood-constrained HFJudge) and stage-3 gate labels."""
from __future__ import annotations

import random
import re

import pytest
import torch
import transformers

from qzoom_adapters.backbones.tiny_processor import QWEN_CHAT_TEMPLATE, TINY_VOCAB_SIZE, tiny_qwen_tokenizer
from qzoom_adapters.errors import QZoomError
from qzoom_adapters.recipes.gate_labels import (EASY, HARD, NON_MONOTONIC, UNSTABLE, WRONG_TOP, GateDrawDataset, GateItem,
                                 build_pool, classify, collate_drop_none, draw, match)
from qzoom_adapters.recipes.judge import (JUDGE_PROMPT, HFJudge, JudgeItem, RuleJudge, anls, judge_prompt, make_judge,
                           normalize_answer, parse_number, relaxed_match, vqa_accuracy)

# ---------------------------------------------------------------------------------------------- metrics


def test_normalize_answer():
    assert normalize_answer("  The Red Car. ") == "red car"
    assert normalize_answer("an apple, a pear!") == "apple pear"
    assert normalize_answer("Two dogs") == "2 dogs"
    assert normalize_answer("ten") == "10"
    assert normalize_answer("left-hand  side") == "left hand side"
    assert normalize_answer("don't") == "dont"
    assert normalize_answer("1,234") == "1234"
    assert normalize_answer("3.5%") == "3.5"  # decimal point kept, % dropped
    assert normalize_answer("theatre") == "theatre"  # only whole-word articles go


def test_vqa_accuracy():
    gts = ["two", "2", "3", "3", "3", "4", "5", "6", "7", "8"]
    assert vqa_accuracy("2", gts) == pytest.approx(2 / 3)
    assert vqa_accuracy("3", gts) == 1.0
    assert vqa_accuracy("9", gts) == 0.0
    assert vqa_accuracy("Paris.", ["paris"]) == 1.0  # a single ground truth can reach 1
    with pytest.raises(QZoomError, match="ground truths"):
        vqa_accuracy("x", [])


def test_anls():
    assert anls("helo", ["hello"]) == pytest.approx(0.8)
    assert anls("hello", ["world", "Hello"]) == 1.0
    assert anls("abc", ["xyz"]) == 0.0  # similarity 0 < tau
    assert anls("hxxlo", ["hello"]) == 0.6
    assert anls("hxxxo", ["hello"]) == 0.0  # 0.4 is below tau = 0.5
    assert anls("hxxxo", ["hello"], tau=0.3) == pytest.approx(0.4)


def test_relaxed_match():
    assert parse_number("1,234") == 1234.0
    assert parse_number("12%") == 12.0
    assert parse_number("$3.5") == 3.5
    assert parse_number("-0.7") == -0.7
    assert parse_number("12 apples") is None
    assert relaxed_match("10.4", ["10"]) == 1.0
    assert relaxed_match("11", ["10"]) == 0.0
    assert relaxed_match("1234", ["1,234"]) == 1.0
    assert relaxed_match("12", ["12%"]) == 1.0
    assert relaxed_match("Yes", ["yes"]) == 1.0
    assert relaxed_match("no", ["yes"]) == 0.0


def test_rule_judge():
    items = [JudgeItem("How many?", ["10"], {"A": "10.4", "B": "11"}),
             JudgeItem("Name?", ["hello world"], {"A": "Hello world.", "B": "goodbye"}),
             JudgeItem("Colour?", ["red"] * 3 + ["blue"] * 7, {"A": "red", "B": "green"})]
    verdicts = RuleJudge().judge(items)
    assert [v.correct for v in verdicts] == [{"A": True, "B": False}] * 3
    assert RuleJudge("relaxed").judge(items[:1])[0].correct == {"A": True, "B": False}
    assert RuleJudge("vqa").judge(items[:1])[0].correct == {"A": False, "B": False}  # "10.4" != "10"
    assert RuleJudge("anls", threshold=0.9).judge(items[1:2])[0].correct == {"A": True, "B": False}
    assert make_judge("rule", metric="vqa").metric == "vqa"
    with pytest.raises(QZoomError, match="metric"):
        RuleJudge("bleu")
    with pytest.raises(QZoomError, match="unknown judge"):
        make_judge("gpt")
    with pytest.raises(QZoomError, match="path"):
        make_judge("hf")


# ---------------------------------------------------------------------------------------------- HF judge

def _tiny_judge(chat: bool = True, seed: int = 0, std: float = 0.02) -> HFJudge:
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=TINY_VOCAB_SIZE, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                                   max_position_embeddings=4096, initializer_range=std)
    model = transformers.Qwen2ForCausalLM._from_config(cfg).float().eval()
    tok = tiny_qwen_tokenizer()
    tok.chat_template = QWEN_CHAT_TEMPLATE if chat else None
    return HFJudge(model, tok, max_length=1024, batch_size=3)


ITEMS = [JudgeItem("What is written on the plate?", ["XK7"], {"A": "XK7", "B": "XR7"}),
         JudgeItem("How many cats?", ["2", "two"], {"A": "2", "B": "3 cats sitting on a very long sofa"}),
         JudgeItem("Colour?", ["red"], {"A": "blue", "B": "red"}),
         JudgeItem("Year?", ["1999"], {"A": "1998", "B": "nineteen ninety-nine, I believe"})]
RAW = re.compile(r"A: (Yes|No)\nB: (Yes|No)")


@pytest.mark.parametrize("chat", [True, False])
def test_hf_judge_is_always_parseable(chat):
    judge = _tiny_judge(chat)
    verdicts = judge.judge(ITEMS)
    assert len(verdicts) == len(ITEMS)
    for v in verdicts:
        m = RAW.fullmatch(v.raw)
        assert m, v.raw
        assert v.correct == {"A": m.group(1) == "Yes", "B": m.group(2) == "Yes"}


def test_judge_prompt_names_everything():
    text = judge_prompt(ITEMS[1])
    assert "Question: How many cats?" in text and "Ground truth: 2 | two" in text
    assert "Response A: 2\n" in text and "Response B: 3 cats" in text
    assert text.endswith("A: Yes/No\nB: Yes/No")
    assert "{question}" in JUDGE_PROMPT


def test_hf_judge_batched_equals_one_by_one():
    for seed in range(20):  # large init weights make a model whose verdicts mix Yes and No
        judge = _tiny_judge(seed=seed, std=1.0)
        verdicts, margins = judge.judge_margins(ITEMS)  # batch_size 3 over 8 sequences: ragged chunks, left padding
        if len({c for v in verdicts for c in v.correct.values()}) == 2:
            break
    else:
        pytest.fail("no seed gave a judge with both Yes and No verdicts")
    for item, v, mg in zip(ITEMS, verdicts, margins):
        v1, mg1 = judge.judge_margins([item])
        assert v1[0] == v
        assert mg1[0] == pytest.approx(mg, abs=1e-3)


def _bias_logits(model, token_ids, value=30.0):
    """A forward hook adding `value` to the logits of token_ids (an LM-head bias without touching weights)."""
    bias = torch.zeros(model.config.vocab_size)
    bias[token_ids] = value
    return model.lm_head.register_forward_hook(lambda mod, args, out: out + bias)


@pytest.mark.parametrize("word,expected", [("Yes", True), ("No", False)])
def test_hf_judge_follows_the_logits(word, expected):
    judge = _tiny_judge()
    ids = judge.tokenizer.convert_tokens_to_ids(list(" " + word))  # char-level tokenizer
    handle = _bias_logits(judge.model, ids)
    try:
        verdicts = judge.judge(ITEMS)
    finally:
        handle.remove()
    assert all(v.correct == {"A": expected, "B": expected} for v in verdicts)
    assert {v.raw for v in verdicts} == {f"A: {word}\nB: {word}"}


def test_hf_judge_clips_long_responses():
    judge = _tiny_judge()
    judge.max_length = 400
    long = JudgeItem("Q?", ["yes"], {"A": "yes " * 300, "B": "no"})
    assert RAW.fullmatch(judge.judge([long])[0].raw)
    judge.max_length = 50
    with pytest.raises(QZoomError, match="max_length"):
        judge.judge([long])


# ---------------------------------------------------------------------------------------------- gate labels

def test_match():
    assert match("The Red car", "red")
    assert match("red", "red car.")
    assert not match("red", "blue")
    assert not match("", "red") and not match("the", "red")  # empty after normalisation never matches


@pytest.mark.parametrize("answers,kind,wrong", [
    (["blue", "green", "red", "red", "red"], HARD, [0, 1]),
    (["red", "red car", "red", "red"], EASY, []),
    (["blue", "red", "red", "green"], UNSTABLE, []),
    (["red", "blue", "blue"], WRONG_TOP, []),
    (["red", "blue", "red", "red"], NON_MONOTONIC, [1]),
])
def test_classify(answers, kind, wrong):
    c = classify(answers, ["red"])
    assert (c.kind, c.wrong) == (kind, wrong)


def test_classify_needs_three_budgets():
    with pytest.raises(QZoomError, match=">= 3 budgets"):
        classify(["red", "red"], ["red"])


def _items():
    kinds = [HARD] * 5 + [EASY] * 20 + [UNSTABLE] * 3 + [WRONG_TOP] * 2 + [NON_MONOTONIC]
    return [GateItem(i, 5, k, [0] if k == HARD else []) for i, k in enumerate(kinds)]


def test_build_pool_balance_and_determinism():
    pool, stats = build_pool(_items(), seed=1)
    assert stats == {HARD: 5, EASY: 20, UNSTABLE: 3, WRONG_TOP: 2, NON_MONOTONIC: 1, "pool": 10}
    assert sum(p.kind == HARD for p in pool) == 5 and sum(p.kind == EASY for p in pool) == 5
    assert [p.sample for p in build_pool(_items(), seed=1)[0]] == [p.sample for p in pool]
    others = {tuple(p.sample for p in build_pool(_items(), seed=s)[0]) for s in range(2, 8)}
    assert len(others) > 1  # the seed picks the EASY items
    few = [GateItem(0, 4, EASY, []), GateItem(1, 4, HARD, [0]), GateItem(2, 4, HARD, [0, 1])]
    assert len(build_pool(few, seed=0)[0]) == 3  # fewer EASY than HARD: take them all
    dicts = [{"kind": HARD, "wrong": [0], "n_budgets": 3, "sample": "x"}, {"kind": EASY}]
    assert len(build_pool(dicts, seed=0)[0]) == 2


def test_draw_easy_never_draws_the_top_two():
    rng = random.Random(0)
    draws = {draw(EASY, [], 5, rng) for _ in range(500)}
    assert draws == {(0, 0), (1, 0), (2, 0)}
    assert draw(EASY, [], 3, rng) == (0, 0)


def test_draw_hard():
    rng = random.Random(0)
    draws = [draw(HARD, [0, 1, 2], 6, rng) for _ in range(2000)]  # correct non-top budget: 3
    ones = [d for d in draws if d[1] == 1]
    assert {d[0] for d in ones} == {1, 2}  # only the last two wrong budgets
    assert {d for d in draws if d[1] == 0} == {(3, 0)}
    assert abs(len(ones) / len(draws) - 0.9) <= 0.04
    assert {draw(HARD, [0], 4, rng) for _ in range(200)} == {(0, 1), (1, 0)}  # only one wrong budget
    no_correct = [draw(HARD, [0, 1], 4, rng) for _ in range(500)]  # no correct budget below the top two
    assert None in no_correct and set(no_correct) - {None} <= {(0, 1), (1, 1)}
    with pytest.raises(QZoomError, match="HARD and EASY"):
        draw(UNSTABLE, [], 5, rng)


def test_gate_draw_dataset_is_deterministic_per_seed_and_epoch():
    pool, _ = build_pool(_items() + [GateItem("h", 4, HARD, [0, 1])], seed=0)
    a, b = GateDrawDataset(pool, seed=3), GateDrawDataset(pool, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert [a[i] for i in range(len(a))] == [b[i] for i in range(len(b))]
    epochs = []
    for e in range(30):
        a.set_epoch(e)
        epochs.append([a[i] for i in range(len(a))])
    assert len({repr(e) for e in epochs}) > 1  # a new epoch re-draws
    assert all(d is None or d.keys() == {"sample", "budget_index", "label", "index"} for e in epochs for d in e)
    assert any(d is None for e in epochs for d in e)  # the HARD item with no correct low budget is sometimes ignored
    batch = collate_drop_none([None, {"label": 1}, None])
    assert batch == [{"label": 1}]
