"""Tool-call grammars of thinking-with-image families: how a zoom call is written, read and answered.

A `ToolGrammar` says, for one family, how to find a tool call in a round's text, which coordinate frame its box
is in, how the crop (or an error) comes back as the next user turn, and where generation stops. The runner
(`qzoom_adapters.backbones.tool_loop`) does the rest. What was checked against each family's public code (prompt
strings compared character for character; the rest read):

* `DEEPEYES` — Visual-Agent/DeepEyes `eval/eval_vstar.py` (prompts, call parsing, crop of the original, turn
  layout, 11 calls, no stop string) and `verl/workers/agent/envs/mm_process_engine/visual_toolbox_v5.py` (clip,
  28-px growth, aspect <= 100, ``Error: …`` turn); `examples/agent/train_grpo_mm_multi_node_v5_7b_gqa21k_xianshi.sh`
  (no custom stop in training either).
* `CHAIN_OF_FOCUS` — xtong-zhang/Chain-of-Focus `eval/vstar/vllm_inference.py` (prompts, resized-image frame,
  bounds check, 1.5x enlarge, 2x scale-up, whole image back on failure, 6 calls, no stop string).
* `MINI_O3` — youthHan/Mini-o3 (a copy of Mini-o3/Mini-o3 with the same paths; the official name is not in the
  searchable index): `verl/trainer/constants.py` (system prompt, tool-response and error turns),
  `verl/workers/rollout/vllm_rollout/function_tools.py` (``source``, relative coordinates, clip, aspect < 200),
  `verl/workers/rollout/vllm_rollout/vllm_async_engine.py` (stop at ``</grounding>``, Action/Observation numbers,
  round limit, raw crops as observations), `README.md` (``val_max_generation_round=12``,
  ``use_relative_coordinates=True``).

Thyme (lmms-eval's `thyme` model) is not a box grammar: it writes Python in `<code>` blocks that a sandbox runs,
so it is not supported here.

Coordinate frames (`ToolGrammar.coords`), always of the image the call names (`source`: 0 = the original):
``"source"`` absolute pixels of that image as given to the runner; ``"seen"`` absolute pixels of that image as
the processor resized it for the vision tower; ``"relative"`` fractions 0-1 of its width/height;
``"norm1000"`` 0-1000 of its width/height.
"""
from __future__ import annotations

import json
import math
import numbers
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

from qzoom_adapters.errors import QZoomError

FRAMES = ("source", "seen", "relative", "norm1000")
Box = tuple[float, float, float, float]


class ToolCallError(ValueError):
    """A tool call the runner cannot execute; the message is what the model is told (never raised to the user)."""


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: its text between the tags, the box as written (grammar's frame) and the image it names."""

    body: str
    box: Box
    source: int = 0


def _number_box(value, what: str = "bbox_2d") -> Box:
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise ToolCallError(f"{what} must be a list of four numbers [x1, y1, x2, y2], got {json.dumps(value)}")
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise ToolCallError(f"{what} must hold four finite numbers, got {json.dumps(value)}")
    return tuple(float(v) for v in value)


def _json_object(body: str) -> dict:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as err:
        raise ToolCallError(f"the tool call is not valid JSON ({err.msg} at char {err.pos}): {body}") from None
    if not isinstance(obj, dict):
        raise ToolCallError(f"the tool call must be a JSON object, got: {body}")
    return obj


def _fmt(v: float, decimals: int) -> float | int:
    return int(round(v)) if decimals == 0 else round(v, decimals)


@dataclass(frozen=True)
class ToolGrammar(ABC):
    """What differs between tool-loop families (see the module docstring). Instances are frozen: adapt one with
    `dataclasses.replace(DEEPEYES, system_prompt=..., max_rounds=...)`.

    Args:
        name: the family.
        open_tag, close_tag: around one call; `close_tag` is also where generation stops.
        coords: the box's frame, one of `FRAMES`.
        system_prompt: the system turn (None: the chat template's default).
        question_template: text after the image in the first user turn, with ``{question}``.
        response_before, response_after: text around the crop in the tool-response user turn (``{action}`` is
            the 0-based round that made the call, ``{observation}`` that plus one).
        error_template: the user turn after a call that cannot be executed (``{message}``); None: the whole
            original image is fed back as the tool response instead (Chain-of-Focus).
        max_rounds: model calls per sample (the family's own limit).
        out_of_bounds: "clip" (clip to the image; a box wholly outside is an error) or "reject" (any box not
            inside the image is an error).
        enlarge: the box grows by this factor about its centre before cropping.
        crop_scale: the crop is resized to this factor times its size in the "seen" frame before the processor
            (None: fed at source resolution; the processor applies its own pixel budget either way).
        max_aspect: a crop whose sides differ by more than this factor is an error (the Qwen-VL processors refuse
            200 and more).
        decimals: decimals of the numbers `format_call` writes (0: integers).
        stop_at_call: generation stops at `close_tag` (Mini-o3); False: it runs to EOS and the whole text stays
            in the assistant turn (DeepEyes, Chain-of-Focus), the first call being executed.
        answer_first: a round with a complete ``<answer>…</answer>`` ends the sample even if it also calls the
            tool (DeepEyes); False: the call is executed (Chain-of-Focus, Mini-o3).
    """

    name: str
    open_tag: str
    close_tag: str
    coords: str
    system_prompt: str | None
    question_template: str
    response_before: str
    response_after: str
    error_template: str | None
    max_rounds: int
    out_of_bounds: str = "clip"
    enlarge: float = 1.0
    crop_scale: float | None = None
    max_aspect: float = 100.0
    decimals: int = 0
    stop_at_call: bool = True
    answer_first: bool = True

    def __post_init__(self):
        if self.coords not in FRAMES:
            raise QZoomError(f"coords must be one of {FRAMES}, got {self.coords!r}")
        if self.out_of_bounds not in ("clip", "reject"):
            raise QZoomError(f"out_of_bounds must be 'clip' or 'reject', got {self.out_of_bounds!r}")
        if not 1 < self.max_aspect < 200:
            raise QZoomError(f"max_aspect must lie in (1, 200) (the Qwen-VL processors refuse 200), got "
                             f"{self.max_aspect}")
        if not isinstance(self.max_rounds, int) or self.max_rounds < 1:
            raise QZoomError(f"max_rounds must be a positive integer, got {self.max_rounds!r}")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.close_tag,) if self.stop_at_call else ()

    # --- reading a round's text ------------------------------------------------------------------
    def has_answer(self, text: str) -> bool:
        """The text holds a complete ``<answer>…</answer>``."""
        return re.search(r"<answer>.*?</answer>", text, re.S) is not None

    def call_body(self, text: str) -> str | None:
        """The body of the call this round executes, or None when the round ends the sample (no call, or an
        answer that wins over the call: `answer_first`). Raises `ToolCallError` for an unclosed call."""
        if self.answer_first and self.has_answer(text):
            return None
        return self.find_call(text)

    def find_call(self, text: str) -> str | None:
        """The body of the first call (stripped); None when the text opens no call. An opened call without its
        closing tag raises `ToolCallError`."""
        start = text.find(self.open_tag)
        if start < 0:
            return None
        end = text.find(self.close_tag, start + len(self.open_tag))
        if end < 0:
            raise ToolCallError(f"the tool call has no closing {self.close_tag}")
        return text[start + len(self.open_tag):end].strip()

    def strip_calls(self, text: str) -> str:
        """`text` without its tool calls (an unclosed one runs to the end)."""
        pattern = re.escape(self.open_tag) + r".*?(?:" + re.escape(self.close_tag) + r"|$)"
        return re.sub(pattern, "", text, flags=re.S)

    @abstractmethod
    def parse(self, body: str) -> ToolCall:
        """The call whose text (between the tags) is `body`, else `ToolCallError`."""

    @abstractmethod
    def format_call(self, box: Box, source: int = 0) -> str:
        """The call text for `box` (in this grammar's frame), as the family's model writes it."""

    # --- writing the next user turn ---------------------------------------------------------------
    def first_user(self, question: str) -> list[dict]:
        return [{"type": "image"}, {"type": "text", "text": self.question_template.format(question=question)}]

    def tool_response(self, round_index: int) -> list[dict]:
        """The user turn that returns a crop: one ``{"type": "image"}`` entry (the runner attaches the image)."""
        fields = {"action": round_index, "observation": round_index + 1}
        parts = [{"type": "text", "text": self.response_before.format(**fields)}, {"type": "image"},
                 {"type": "text", "text": self.response_after.format(**fields)}]
        return [p for p in parts if p.get("type") == "image" or p["text"]]

    def error_response(self, message: str) -> list[dict] | None:
        return None if self.error_template is None else [
            {"type": "text", "text": self.error_template.format(message=message)}]


@dataclass(frozen=True)
class FunctionCallGrammar(ToolGrammar):
    """Qwen function calling: ``{"name": tool, "arguments": {"bbox_2d": [x1, y1, x2, y2], "label": ...}}``."""

    tool_name: str = "image_zoom_in_tool"

    def parse(self, body: str) -> ToolCall:
        obj = _json_object(body)
        if obj.get("name") != self.tool_name:
            raise ToolCallError(f"unknown tool {obj.get('name')!r}; the only tool is {self.tool_name}")
        args = obj.get("arguments")
        if not isinstance(args, dict) or "bbox_2d" not in args:
            raise ToolCallError(f"the call's arguments need bbox_2d: {body}")
        return ToolCall(body, _number_box(args["bbox_2d"]))

    def format_call(self, box: Box, source: int = 0) -> str:
        if source != 0:
            raise QZoomError(f"{self.name} calls can only crop the original image (source 0), not {source}")
        args = {"bbox_2d": [_fmt(v, self.decimals) for v in box]}
        return f"{self.open_tag}\n{json.dumps({'name': self.tool_name, 'arguments': args})}\n{self.close_tag}"


@dataclass(frozen=True)
class GroundingGrammar(ToolGrammar):
    """Mini-o3: ``{"bbox_2d": [x1, y1, x2, y2], "source": "original_image" | "observation_i"}``."""

    def parse(self, body: str) -> ToolCall:
        obj = _json_object(body)
        if "bbox_2d" not in obj:
            raise ToolCallError(f"there is no 'bbox_2d' in the grounding argument: {body}")
        source = obj.get("source")
        if not isinstance(source, str):
            raise ToolCallError(f"the grounding argument needs 'source' ('original_image' or 'observation_i'): {body}")
        if source == "original_image":
            index = 0
        elif m := re.fullmatch(r"observation_([0-9]+)", source):
            index = int(m.group(1))
        else:
            raise ToolCallError(f"the 'source' argument {source!r} is neither 'original_image' nor 'observation_i'")
        return ToolCall(body, _number_box(obj["bbox_2d"]), index)

    def format_call(self, box: Box, source: int = 0) -> str:
        name = "original_image" if source == 0 else f"observation_{source}"
        obj = {"bbox_2d": [_fmt(v, self.decimals) for v in box], "source": name}
        return f"{self.open_tag}{json.dumps(obj)}{self.close_tag}"


# --- the families --------------------------------------------------------------------------------
_DEEPEYES_TOOL = (
    '{"type":"function","function":{"name":"image_zoom_in_tool","description":"Zoom in on a specific region of an '
    'image by cropping it based on a bounding box (bbox) and an optional object label.","parameters":{"type":'
    '"object","properties":{"bbox_2d":{"type":"array","items":{"type":"number"},"minItems":4,"maxItems":4,'
    '"description":"The bounding box of the region to zoom in, as [x1, y1, x2, y2], where (x1, y1) is the top-left '
    'corner and (x2, y2) is the bottom-right corner."},"label":{"type":"string","description":"The name or label of '
    'the object in the specified bounding box (optional)."}},"required":["bbox"]}}}')
DEEPEYES_SYSTEM = (
    "You are a helpful assistant.\n\n# Tools\nYou may call one or more functions to assist with the user query.\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n" + _DEEPEYES_TOOL +
    "\n</tools>\n\n# How to call a tool\nReturn a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}"
    "\n</tool_call>\n\n**Example**:  \n<tool_call>  \n{\"name\": \"image_zoom_in_tool\", \"arguments\": "
    "{\"bbox_2d\": [10, 20, 100, 200], \"label\": \"the apple on the desk\"}}  \n</tool_call>")
DEEPEYES_USER = ("\nThink first, call **image_zoom_in_tool** if needed, then answer. Format strictly as:  "
                 "<think>...</think>  <tool_call>...</tool_call> (if tools needed)  <answer>...</answer> ")

DEEPEYES = FunctionCallGrammar(
    name="deepeyes", open_tag="<tool_call>", close_tag="</tool_call>", coords="source",
    system_prompt=DEEPEYES_SYSTEM, question_template="{question}" + DEEPEYES_USER,
    response_before="<tool_response>", response_after=DEEPEYES_USER + "</tool_response>",
    error_template="Error: {message}", max_rounds=11, max_aspect=100.0, stop_at_call=False)
"""DeepEyes (Qwen2.5-VL-7B RL). From Visual-Agent/DeepEyes `eval/eval_vstar.py`: system prompt, user suffix
(the eval's V* text is ``Question: …\nOptions: …\n`` + suffix: pass that as the question to match it),
`<tool_call>` JSON with `arguments.bbox_2d`, the crop returned in a user turn ``<tool_response>`` + image + the
user suffix + ``</tool_response>``, generation to EOS (no stop string) with the first call executed and an answer
ending the sample, at most 11 model calls. Coordinates: absolute pixels of the original image (the eval crops the
original; its vLLM budget of 16384 tokens keeps V*-sized images at their own size, so this equals what the model
saw; with a smaller processor budget consider ``coords="seen"``). Box checks (clip, grow under 28 px, aspect
<= 100) and the ``Error: …`` turn come from the training toolbox `visual_toolbox_v5.py` (the eval has no error
path: a failing call ends the sample there; the toolbox grows a small box keeping its aspect ratio, here each
short side grows on its own; an unclosed call ends the toolbox's episode, here it gets the error turn)."""

_COF_SYSTEM_TOOL = (
    '{"type": "function", "function": {"name":"image_zoom_in_tool","description":"Zoom in on a specific region of an '
    'image by cropping it based on a bounding box (bbox_2d) and an optional object label.","parameters":'
    '{"properties":{"bbox_2d":{"type":"array","items":{"type":"number"},"minItems":4,"maxItems":4,"description":'
    '"The bounding box of the region to zoom in, as [x1, y1, x2, y2], where (x1, y1) is the top-left corner and '
    '(x2, y2) is the bottom-right corner."},"label":{"type":"string","description":"The name or label of the object '
    'in the specified bounding box (optional)."}},"required":["bbox_2d"], "type":"object"},"args_format": "Format '
    'the arguments as a JSON object."}}')
COF_SYSTEM = (
    "You are a helpful assistant.\n\n# Tools\nYou may call one or more functions to assist with the user query.\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n" + _COF_SYSTEM_TOOL +
    "\n</tools>\n\nFor the function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}"
    "\n</tool_call>")
COF_USER = ("\nThink in the mind first, and then decide whether to call tools one or more times OR provide final "
            "answer. Format strictly as: <think>...</think> <tool_call>...</tool_call> <tool_call>...</tool_call> "
            "(if any tools needed) OR <answer>...</answer> (if no tools needed).")

CHAIN_OF_FOCUS = FunctionCallGrammar(
    name="chain_of_focus", open_tag="<tool_call>", close_tag="</tool_call>", coords="seen",
    system_prompt=COF_SYSTEM, question_template="Question: {question}" + COF_USER,
    response_before="", response_after=COF_USER, error_template=None, max_rounds=6,
    out_of_bounds="reject", enlarge=1.5, crop_scale=2.0, max_aspect=199.0, stop_at_call=False, answer_first=False)
"""Chain-of-Focus (Qwen2.5-VL-7B). From xtong-zhang/Chain-of-Focus `eval/vstar/vllm_inference.py`: system prompt,
``Question: …`` + suffix, `<tool_call>` JSON with `arguments.bbox_2d` in absolute pixels of the *resized* image
the model saw ("seen"; the eval resizes the image itself, factor 28, before the model), a box not inside that
image rejected, the box enlarged 1.5x about its centre, the crop scaled 2x, returned as a user turn of the image
+ the suffix (no tags), generation to EOS with a call winning over an answer, at most 6 model calls. A call that
cannot be executed gets the whole image (scaled 2x) back, as the eval does for bad JSON or bounds (a missing key
there sends the image unscaled). No aspect or minimum-size check there; here the processor's aspect limit
(< 200) applies and short sides grow to `min_crop_px`."""

MINI_O3_SYSTEM = (
    "You are a helpful assistant. Answer the user's question based on the image provided. Output your thinking "
    "process within the <think> and </think> tags. Whenever you find anything unclear, you can zoom in a specific "
    "region in the given image to see more clearly by outputing <grounding>{\"bbox_2d\": [x0, y0, x1, y1], "
    "\"source\": \"original_image\"}</grounding>, where (x0, y0) and (x1, y1) are the top-left and bottom-right "
    "coordinates of the region that you want to zoom in, respectively (suppose the width and height of the image "
    "are 1.0), and 'source' refers to the image that you zoom in and could be either 'original_image' or "
    "'observation_i'. Once the final answer is confirmed, put it within <answer> and </answer>.")

MINI_O3 = GroundingGrammar(
    name="mini_o3", open_tag="<grounding>", close_tag="</grounding>", coords="relative",
    system_prompt=MINI_O3_SYSTEM, question_template="\n{question}",
    response_before="After the above Action {action}, here is the the zoom-in image (Observation {observation}):\n",
    response_after=(".\nContinue your reasoning process inside <think> and </think>. If needed, you can continue to "
                    "zoom in on the original image or any of the observations, by outputting <grounding> and "
                    "</grounding> as before. If the final answer is confirmed, put your final answer inside <answer> "
                    "and </answer>."),
    error_template=("ERROR occurs during grounding. Error Information: {message}.\nPlease analyze the error "
                    "information obtained from the function tool and adjust your response. Countinue your reasoning "
                    "process inside <think> and </think>."),
    max_rounds=12, max_aspect=199.0, decimals=3, answer_first=False)
"""Mini-o3 (Qwen2.5-VL-7B). From Mini-o3's `verl/trainer/constants.py` (system prompt, the tool-response and error
turns, wording and typos as trained) and `verl/workers/rollout/vllm_rollout/function_tools.py` +
`vllm_async_engine.py` (``<grounding>`` JSON with ``bbox_2d`` and ``source``, relative 0-1 coordinates of the named
image with `use_relative_coordinates=True` as in its README, observations = the raw crops, generation stopped at
``</grounding>``, a call winning over an answer, at most 12 model calls at validation, Action/Observation numbered
by round). Their box ends are truncated to integers and clipped at width-1/height-1 and they grow no small box
(the processor's min_pixels upsamples it); here ends round outwards, the clip is to the full image and short sides
grow to `min_crop_px`. The first user text ``"\n" + question`` follows `docs/mini_o3_demo.md` ("problem" starts
with "<image>\n"); their data files were not checked."""

GRAMMARS = {g.name: g for g in (DEEPEYES, CHAIN_OF_FOCUS, MINI_O3)}
