"""Tool-loop runner (DeepEyes / Chain-of-Focus / Mini-o3 grammars) and the Q-Zoom first-round shortcut.

Tiny random models write garbage, so most tests force each round's text with a logits processor
(`tool_loop_latency.ForcedText`) that leaves everything else real: the chat template, the processor (several
images per conversation, left padding), `model.generate`, the stop strings and the crops.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qzoom_adapters.backbones.qwen2_5_vl import Qwen2_5_VLSpec
from qzoom_adapters.backbones.qwen3_vl import Qwen3VLSpec
from qzoom_adapters.backbones.tool_boxes import from_pixels
from qzoom_adapters.backbones.tool_grammars import CHAIN_OF_FOCUS, COF_USER, DEEPEYES, DEEPEYES_USER, MINI_O3
from qzoom_adapters.backbones.tool_loop import QZoomShortcut, ToolLoop, ZoomDecision
from qzoom_adapters.benchmarks import tool_loop_latency
from qzoom_adapters.benchmarks.tool_loop_latency import forced_rounds
from qzoom_adapters.errors import QZoomError
from qzoom_adapters.testing import make_kit
from qzoom_adapters.testing.kit import synthetic_image

# The chat template Qwen2.5-VL-7B-Instruct ships in chat_template.json, which DeepEyes-7B, Chain-of-Focus and
# Mini-o3 keep: their tools are described in the system prompt and the calls are plain assistant text.
QWEN25_VL_RELEASED_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE = synthetic_image(300, 200, 5)  # the tiny processor shows it at 224 x 140 (8 x 5 merged tokens)
SEEN = (224, 140)


def _released_processor():
    processor = Qwen2_5_VLSpec.tiny_processor()
    processor.chat_template = QWEN25_VL_RELEASED_TEMPLATE
    return processor


@pytest.fixture(scope="module")
def kit():
    return make_kit(Qwen2_5_VLSpec, make_processor=_released_processor)


def scripted(kit, plan, calls=None):
    """`generate_kwargs` for `ToolLoop.run`: `plan[sample][round]` is that round's forced text (None or past the
    end: the model's own). Records (round, sample indices) of every generate call in `calls`."""
    forced = forced_rounds(kit.processor.tokenizer, plan)

    def kwargs(r, samples, inputs):
        if calls is not None:
            calls.append((r, list(samples)))
        return forced(r, samples, inputs)

    return kwargs


def run(kit, grammar, plan, images=None, calls=None, **loop_kw):
    images = images or [IMAGE] * len(plan)
    loop = ToolLoop(kit.model, kit.processor, grammar, max_new_tokens=loop_kw.pop("max_new_tokens", 200), **loop_kw)
    return loop.run(images, [f"Q{i}" for i in range(len(plan))], generate_kwargs=scripted(kit, plan, calls))


def short(grammar):
    """`grammar` with a one-line system prompt: the tiny tokenizer spells every character, and the families'
    tool descriptions are ~1,500 of them per round (the exact prompts are checked in the first test)."""
    return dataclasses.replace(grammar, system_prompt="S")


def deepeyes_call(box, name="image_zoom_in_tool"):
    args = json.dumps({"name": name, "arguments": {"bbox_2d": box}})
    return f"<tool_call>{args}</tool_call>"


def images_of(message):
    return [p["image"] for p in message["content"] if p.get("type") == "image"]


def same_pixels(a, b):
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


# --- one call, each frame ---------------------------------------------------------------------------------
def test_deepeyes_call_returns_the_crop_in_a_user_turn(kit):
    call = ('<think>zoom</think>\n<tool_call>\n{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [30, 40, 130, 120]}}'
            '\n</tool_call>')
    res, = run(kit, DEEPEYES, [[call + " trailing", "<answer>red</answer>"]], keep_inputs=True)
    r1, r2 = res.rounds
    assert r1.text.endswith("</tool_call> trailing")  # DeepEyes generates to EOS: the whole text stays
    assert r1.call.box == (30, 40, 130, 120) and r1.box == (30, 40, 130, 120) and not r1.malformed
    assert res.answer == "red" and not res.hit_round_limit and r2.call is None
    system, user, assistant, tool, last = res.messages
    assert system["content"].startswith("You are a helpful assistant.\n\n# Tools")
    assert user["content"][1]["text"] == "Q0" + DEEPEYES_USER and assistant["content"] == r1.text
    assert [p["type"] for p in tool["content"]] == ["text", "image", "text"]
    assert tool["content"][0]["text"] == "<tool_response>"
    assert tool["content"][2]["text"] == DEEPEYES_USER + "</tool_response>"
    assert same_pixels(images_of(tool)[0], IMAGE.crop((30, 40, 130, 120))) and r1.crop_size == (100, 80)
    assert last == {"role": "assistant", "content": "<answer>red</answer>"}
    vision_start = kit.processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert [ids.count(vision_start) for ids in (r1.input_ids, r2.input_ids)] == [1, 2]  # the crop is a new image


FRAMES = {"source": [75, 40, 225, 100], "seen": [56, 28, 168, 70], "relative": [0.25, 0.2, 0.75, 0.5],
          "norm1000": [250, 200, 750, 500]}


@pytest.mark.parametrize("coords", sorted(FRAMES))
def test_each_frame_crops_the_same_source_region(kit, coords):
    grammar = dataclasses.replace(DEEPEYES, coords=coords, system_prompt="S")
    res, = run(kit, grammar, [[deepeyes_call(FRAMES[coords]), "<answer>a</answer>"]])
    assert res.rounds[0].box == (75, 40, 225, 100)
    assert same_pixels(images_of(res.messages[3])[0], IMAGE.crop((75, 40, 225, 100)))


# --- batches and limits -----------------------------------------------------------------------------------
def test_batched_samples_finish_in_different_rounds(kit):
    call = deepeyes_call([10, 10, 110, 90])
    plan = [["<answer>0</answer>"], [call, "<answer>1</answer>"], [call, call, "<answer>2</answer>"]]
    calls = []
    results = run(kit, short(DEEPEYES), plan, calls=calls)
    assert calls == [(0, [0, 1, 2]), (1, [1, 2]), (2, [2])]  # finished samples leave the batch
    assert [len(r.rounds) for r in results] == [1, 2, 3]
    assert [r.answer for r in results] == ["0", "1", "2"]
    assert [sum(len(images_of(m)) for m in r.messages if isinstance(m["content"], list)) for r in results] == [1, 2, 3]


def test_round_limit_stops_a_sample_that_keeps_calling(kit):
    call = deepeyes_call([10, 10, 110, 90])
    res, = run(kit, short(DEEPEYES), [[call, call, call]], max_rounds=2)
    assert res.hit_round_limit and len(res.rounds) == 2
    assert res.rounds[0].crop_size == (100, 80) and res.rounds[1].crop_size is None  # the last call is not executed
    assert res.messages[-1]["role"] == "assistant"
    assert sum(len(images_of(m)) for m in res.messages if isinstance(m["content"], list)) == 2


# --- malformed calls and box behaviours --------------------------------------------------------------------
MALFORMED = {
    "bad_json": ('<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1, 2, 3, 4]}</tool_call>',
                 "not valid JSON"),
    "missing_box": ('<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox": [1, 2, 30, 40]}}</tool_call>',
                    "need bbox_2d"),
    "unknown_tool": (deepeyes_call([1, 2, 30, 40], name="image_rotate_tool"), "unknown tool 'image_rotate_tool'"),
    "non_numeric": (deepeyes_call([1, 2, "30", 40]), "four finite numbers"),
    "unclosed": ('<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1, 2, 30, 40]}}',
                 "no closing </tool_call>"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_call_gets_the_error_turn_and_the_model_goes_on(kit, case):
    text, message = MALFORMED[case]
    res, = run(kit, short(DEEPEYES), [[text, "<answer>ok</answer>"]])
    r1 = res.rounds[0]
    assert r1.malformed and message in r1.error and r1.box is None and r1.crop_size is None
    assert res.messages[3] == {"role": "user", "content": [{"type": "text", "text": "Error: " + r1.error}]}
    assert res.answer == "ok" and len(res.rounds) == 2


@pytest.mark.parametrize("box, message", [([400, 10, 500, 90], "lies outside the image (width 300, height 200"),
                                          ([50, 60, 50, 120], "has no area")])
def test_unusable_box_gets_the_error_turn(kit, box, message):
    res, = run(kit, short(DEEPEYES), [[deepeyes_call(box), "<answer>ok</answer>"]])
    r1 = res.rounds[0]
    assert not r1.malformed and r1.call.box == tuple(box) and message in r1.error and r1.box is None
    assert res.messages[3]["content"] == [{"type": "text", "text": "Error: " + r1.error}]


@pytest.mark.parametrize("box, placed", [
    ([250, -30, 340, 60], (250, 0, 300, 60)),  # partly outside: clipped
    ([100, 100, 104, 110], (88, 91, 116, 119)),  # 4 x 10 px: each side grown to 28 about the centre
    ([0, 195, 5, 200], (0, 172, 28, 200)),  # grown at a corner: shifted inside the image
])
def test_box_is_clipped_or_grown(kit, box, placed):
    res, = run(kit, short(DEEPEYES), [[deepeyes_call(box), "<answer>ok</answer>"]])
    assert res.rounds[0].box == placed and res.rounds[0].error is None
    assert same_pixels(images_of(res.messages[3])[0], IMAGE.crop(placed))


def test_chain_of_focus_enlarges_scales_and_sends_the_whole_image_on_failure(kit):
    ok = deepeyes_call([56, 28, 168, 70])  # "seen" pixels -> source (75, 40, 225, 100), then enlarged 1.5x
    outside = deepeyes_call([100, 50, 230, 100])  # not inside the 224 x 140 image: rejected
    res, = run(kit, short(CHAIN_OF_FOCUS), [[ok + "<answer>no</answer>", outside, "<answer>ok</answer>"]])
    r1, r2, _ = res.rounds
    assert r1.box == (37, 25, 263, 115)  # centre (150, 70), 225 x 90; the answer did not win over the call
    assert r1.crop_size == (337, 126)  # the crop's size in the seen frame (168.7 x 63) times 2
    assert res.messages[3]["content"][1] == {"type": "text", "text": COF_USER}
    assert r2.error and "is not inside" in r2.error and r2.box is None
    whole = images_of(res.messages[5])[0]  # no error turn: the whole image, scaled 2x as seen
    assert whole.size == (448, 280) and [p["type"] for p in res.messages[5]["content"]] == ["image", "text"]


def test_mini_o3_stops_at_the_tag_and_crops_observations(kit):
    first = '<think>a</think><grounding>{"bbox_2d": [0.25, 0.2, 0.75, 0.5], "source": "original_image"}</grounding>'
    second = '<grounding>{"bbox_2d": [0.5, 0.5, 1.0, 1.0], "source": "observation_1"}</grounding>'
    missing = '<grounding>{"bbox_2d": [0.1, 0.1, 0.9, 0.9], "source": "observation_7"}</grounding>'
    res, = run(kit, short(MINI_O3), [[first + "IGNORED", second, missing, "<answer>x</answer>"]])
    r1, r2, r3, r4 = res.rounds
    assert r1.text == first  # generation stopped at </grounding>
    assert r1.box == (75, 40, 225, 100) and r2.box == (150, 70, 225, 100)  # observation_1 is r1's crop
    assert same_pixels(images_of(res.messages[5])[0], IMAGE.crop((150, 70, 225, 100)))
    assert res.messages[3]["content"][0]["text"] == (
        "After the above Action 0, here is the the zoom-in image (Observation 1):\n")
    assert res.messages[5]["content"][0]["text"].startswith("After the above Action 1, here is")
    assert "there is no observation_7" in r3.error and not r3.malformed
    assert res.messages[7]["content"][0]["text"].startswith(
        "ERROR occurs during grounding. Error Information: there is no observation_7")
    assert res.answer == "x" and r4.call is None


# --- the real model: batched == one by one ---------------------------------------------------------------
@pytest.mark.parametrize("spec_cls", [Qwen2_5_VLSpec, Qwen3VLSpec], ids=lambda c: c.family)
def test_batched_equals_one_by_one_greedy(spec_cls):
    kit = make_kit(spec_cls)
    images = [IMAGE, synthetic_image(180, 260, 2)]
    plan = [[deepeyes_call([20, 20, 120, 90])], [deepeyes_call([10, 30, 170, 200])]]  # round 2: the model's own
    loop = ToolLoop(kit.model, kit.processor, short(DEEPEYES), max_new_tokens=120, max_rounds=2)
    tok = kit.processor.tokenizer
    vocab = kit.model.get_output_embeddings().weight.shape[0]
    unprintable = [i for i in range(vocab) if i >= len(tok) or i in tok.added_tokens_decoder]
    free = {"max_new_tokens": 8, "suppress_tokens": unprintable}  # round 2: 8 characters of the real model

    def kwargs(plan):
        forced = scripted(kit, plan)
        return lambda r, samples, inputs: forced(r, samples, inputs) if r == 0 else dict(free)

    batched = loop.run(images, ["Q0", "Q1"], generate_kwargs=kwargs(plan))
    for i in range(2):
        single, = loop.run([images[i]], [f"Q{i}"], generate_kwargs=kwargs([plan[i]]))
        assert [r.text for r in single.rounds] == [r.text for r in batched[i].rounds]
        assert [r.box for r in single.rounds] == [r.box for r in batched[i].rounds]
    assert all(len(r.rounds) == 2 and r.rounds[0].crop_size and len(r.rounds[1].text) == 8 for r in batched)


# --- the Q-Zoom shortcut ------------------------------------------------------------------------------------
def _hooks(model):
    return [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()
            if m._forward_hooks or m._forward_pre_hooks]


@pytest.mark.parametrize("grammar", [DEEPEYES, MINI_O3], ids=lambda g: g.name)
def test_shortcut_writes_round_one_as_the_grammars_call(kit, grammar):
    zoom = kit.zoom(gate_threshold=0.0, roi_threshold=0.0)
    loop = ToolLoop(kit.model, kit.processor, short(grammar), max_new_tokens=40, first_round=QZoomShortcut(zoom))
    state, hooks = {k: v.clone() for k, v in kit.model.state_dict().items()}, _hooks(kit.model)
    calls = []
    images = [IMAGE, synthetic_image(220, 260, 3)]
    results = loop.run(images, ["Q0", "Q1"], generate_kwargs=scripted(kit, [["<answer>a</answer>"] * 2] * 2, calls))
    assert calls == [(1, [0, 1])]  # the model never wrote round 1
    inputs = loop._inputs(loop._samples(images, ["Q0", "Q1"]))
    twig = zoom.generate_from_inputs(inputs, images, max_new_tokens=1)
    for img, res, o in zip(images, results, twig):
        r1 = res.rounds[0]
        assert o.zoomed and r1.by_shortcut and r1.gate_prob == pytest.approx(o.gate_prob)
        seen = (inputs["image_grid_thw"][images.index(img)][[2, 1]] * 14).tolist()
        assert r1.text == grammar.format_call(from_pixels(tuple(map(float, o.bbox)), grammar.coords, img.size, seen))
        assert all(abs(a - b) <= 1 for a, b in zip(r1.box, o.bbox))  # written with the grammar's decimals
        assert res.messages[2] == {"role": "assistant", "content": r1.text} and r1.crop_size is not None
        assert len(images_of(res.messages[3])) == 1 and res.answer == "a" and len(res.rounds) == 2
    assert _hooks(kit.model) == hooks and all(torch.equal(v, state[k]) for k, v in kit.model.state_dict().items())


def test_shortcut_that_never_zooms_leaves_round_one_to_the_model(kit):
    zoom = kit.zoom(gate_threshold=1.5)
    loop = ToolLoop(kit.model, kit.processor, short(DEEPEYES), max_new_tokens=40, first_round=QZoomShortcut(zoom))
    calls = []
    res, = loop.run([IMAGE], ["Q0"], generate_kwargs=scripted(kit, [["<answer>b</answer>"]], calls))
    assert calls == [(0, [0])] and not res.rounds[0].by_shortcut and res.rounds[0].gate_prob is not None
    off = ToolLoop(kit.model, kit.processor, short(DEEPEYES), max_new_tokens=40)
    calls_off = []
    res_off, = off.run([IMAGE], ["Q0"], generate_kwargs=scripted(kit, [["<answer>b</answer>"]], calls_off))
    assert calls_off == [(0, [0])] and res_off.rounds[0].gate_prob is None and res_off.answer == res.answer == "b"


def test_bad_input_is_a_clear_error(kit):
    loop = ToolLoop(kit.model, kit.processor, DEEPEYES, max_new_tokens=4)
    with pytest.raises(QZoomError, match="one string per sample"):
        loop.run([IMAGE], "Q")
    with pytest.raises(QZoomError, match="got 1 images for 2 questions"):
        loop.run([IMAGE], ["a", "b"])
    with pytest.raises(QZoomError, match="image placeholder"):
        loop.run([IMAGE], ["look <|image_pad|>"])
    with pytest.raises(QZoomError, match="grammar must be a ToolGrammar"):
        ToolLoop(kit.model, kit.processor, "deepeyes")
    with pytest.raises(QZoomError, match="max_rounds must be a positive integer"):
        ToolLoop(kit.model, kit.processor, DEEPEYES, max_rounds=0)
    with pytest.raises(QZoomError, match="coords must be one of"):
        dataclasses.replace(DEEPEYES, coords="pixels")
    wrong = ToolLoop(kit.model, kit.processor, DEEPEYES, max_new_tokens=4, first_round=lambda inputs, imgs: [])
    with pytest.raises(QZoomError, match="one ZoomDecision"):
        wrong.run([IMAGE], ["Q"])
    outside = ToolLoop(kit.model, kit.processor, DEEPEYES, max_new_tokens=4,
                       first_round=lambda inputs, imgs: [ZoomDecision((0, 0, 400, 50))])
    with pytest.raises(QZoomError, match=r"inside the 300x200 px source image"):
        outside.run([IMAGE], ["Q"])


def test_latency_benchmark_runs_tiny_and_writes_nothing_without_out(tmp_path, monkeypatch, capsys):
    results = Path(tool_loop_latency.__file__).parent / "results"
    before = sorted((p.name, p.stat().st_mtime_ns) for p in results.iterdir())
    monkeypatch.chdir(tmp_path)
    report = tool_loop_latency.main(["--tiny", "--grammar", "mini_o3"])
    assert sorted((p.name, p.stat().st_mtime_ns) for p in results.iterdir()) == before and not any(tmp_path.iterdir())
    rounds = report["rounds"]
    assert [r["by_shortcut"] for r in rounds["shortcut"]] == [True, False]
    assert [r["by_shortcut"] for r in rounds["model_round1"]] == [False, False] == [
        r["by_shortcut"] for r in rounds["shortcut_declined"]]
    assert rounds["shortcut"][0]["box"] == rounds["model_round1"][0]["box"] == tuple(report["box"])
    assert report["ratio_shortcut_to_model"] == report["latency_s"]["shortcut"] / report["latency_s"]["model_round1"]
    assert "ratio" in capsys.readouterr().out
