"""Tool-loop runner for thinking-with-image models (DeepEyes, Chain-of-Focus, Mini-o3) on unmodified HF models.

These models answer in rounds: the model writes a zoom call with a box, the runner crops the image and returns
the crop as a new image in a user turn, and the model continues, up to a round limit, until it answers::

    from qzoom_adapters.backbones.tool_loop import ToolLoop
    from qzoom_adapters.backbones.tool_grammars import DEEPEYES
    loop = ToolLoop(model, processor, DEEPEYES, max_new_tokens=1024)
    results = loop.run(images, questions)          # one ToolLoopResult per sample: .answer, .text, .rounds

Every round renders each conversation with the processor's chat template (several images per conversation, as
Qwen2.5-VL / Qwen3-VL take them) and calls `model.generate` greedily on the batch of samples still running;
generation stops at EOS, or at the grammar's closing tag where the family stops there (`stop_at_call`). A sample
ends when a round writes no tool call or a complete ``<answer>…</answer>`` that wins over it (`answer_first`); the
round limit ends the rest (`hit_round_limit`: the last round still called the tool, and nothing was cropped).
Each round re-encodes the whole conversation (no KV cache is kept between rounds). What happens to a call:

* malformed (no closing tag, bad JSON, unknown tool, missing or non-numeric box, unknown source image), a box
  with no area, wholly outside the image (or not inside it, for a "reject" grammar) or too elongated: no crop;
  the grammar's error turn is fed back and the sample goes on (`ToolRound.error`; `malformed` for the first
  kinds). A grammar without an error turn (Chain-of-Focus) gets the whole image back instead, as its code does.
* partly outside: clipped to the image. A side under `min_crop_px` (the processor's patch x merge size, 28 for
  Qwen2.5-VL) grows to it about its centre, shifted to stay inside the image.
* only the first call of a round is executed.

`first_round`: a callable that may answer round 1 for the model (`QZoomShortcut(zoom)`: Q-Zoom's gate decides
from the first pass whether to zoom, and the twig's box is written as the family's tool call into the assistant
turn, then cropped and returned exactly as if the model had written that call).
"""
from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass, field
from typing import Callable

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from qzoom_adapters.errors import QZoomError
from qzoom_adapters.spec import get_spec

from .thinking import final_answer
from .tool_boxes import from_pixels, place_box, to_pixels
from .tool_grammars import DEEPEYES, ToolCall, ToolCallError, ToolGrammar


@dataclass
class ZoomDecision:
    """A `first_round` decision for one sample: `box` (x1, y1, x2, y2) in source pixels to zoom into as the
    model's first call, or None to let the model write round 1; `preamble` goes before the written call."""

    box: tuple | None
    gate_prob: float | None = None
    preamble: str = ""


@dataclass
class ToolRound:
    """One model call of one sample.

    Attributes:
        text: what the assistant turn holds (cut after the stop string).
        call: the parsed call (box as written, in the grammar's frame), or None.
        box: the call's crop box (x1, y1, x2, y2) in pixels of the original image, or None when the call could
            not be executed (also set in a round cut off by the round limit, where nothing is cropped).
        crop_size: (width, height) of the image fed back (before the processor's resize), or None when no image
            went back (error turn, round limit).
        malformed: the call could not be parsed.
        error: why no crop was made (the message the model was told), or None.
        by_shortcut: `first_round` wrote this round, not the model.
        gate_prob: the `first_round` gate probability (round 1 only).
        input_ids: the round's unpadded prompt ids (with `keep_inputs=True`).
    """

    text: str
    call: ToolCall | None = None
    box: tuple[int, int, int, int] | None = None
    crop_size: tuple[int, int] | None = None
    malformed: bool = False
    error: str | None = None
    by_shortcut: bool = False
    gate_prob: float | None = None
    input_ids: list[int] | None = field(default=None, repr=False)


@dataclass
class ToolLoopResult:
    """One sample: the last round's `text`, its `answer` (`thinking.final_answer` without tool calls), the rounds,
    whether the round limit cut it off (the last round still called a tool), and the whole conversation (image
    entries hold the PIL images the model saw, before the processor's resize)."""

    text: str
    answer: str
    rounds: list[ToolRound]
    hit_round_limit: bool
    messages: list[dict] = field(repr=False)


class StopOnStrings(StoppingCriteria):
    """Stops a row once its generated text (after `prompt_len`) contains one of `stops`."""

    def __init__(self, tokenizer, prompt_len: int, stops):
        self.tokenizer, self.prompt_len, self.stops = tokenizer, prompt_len, tuple(stops)
        self.window = max(len(s) for s in self.stops) + 2  # tokens: each decodes to at least one character

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        tail = input_ids[:, max(self.prompt_len, input_ids.shape[1] - self.window):].tolist()
        done = [any(s in self.tokenizer.decode(row, skip_special_tokens=False) for s in self.stops) for row in tail]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class QZoomShortcut:
    """`first_round` from a `QZoom`: its gate decides on the first pass, and where it zooms, the twig's box
    becomes the model's first tool call (`QZoom.plan_from_inputs`: pass A, gate and twig only, nothing decoded).

    Args:
        zoom: a `QZoom` on the tool-loop model.
        preamble: text written before the call in the round-1 assistant turn.
        force_zoom: None (the gate decides) or a decision for every sample (the gate still runs and reports its
            probability); for benchmarks on random weights.
        box: None (the twig's box) or a callable (width, height) of a source image -> (x1, y1, x2, y2) in its
            pixels, cropped instead (e.g. `benchmarks.forced_box.centred_box`); for benchmarks.
    """

    def __init__(self, zoom, preamble: str = "", force_zoom: bool | None = None, box: Callable | None = None):
        if not callable(getattr(zoom, "plan_from_inputs", None)):
            raise QZoomError(f"QZoomShortcut needs a QZoom (with plan_from_inputs), got {type(zoom).__name__}")
        if force_zoom not in (None, True, False) or (box is not None and not callable(box)):
            raise QZoomError("force_zoom must be None, True or False, and box None or a callable (W, H) -> box")
        self.zoom, self.preamble, self.force_zoom, self.box = zoom, preamble, force_zoom, box

    def __call__(self, inputs, images) -> list[ZoomDecision]:
        force = None if self.force_zoom is None else [self.force_zoom] * len(images)
        boxes = None if self.box is None else [self.box(im.size) for im in images]
        plans = self.zoom.plan_from_inputs(inputs, images, force_zoom=force, boxes=boxes)
        return [ZoomDecision(p.bbox if p.zoomed else None, p.gate_prob, self.preamble) for p in plans]


@dataclass
class _Sample:
    index: int
    image: Image.Image
    messages: list
    regions: list  # per conversation image: (x1, y1, x2, y2) of the original it shows, in original pixels
    seen: list = field(default_factory=list)  # per conversation image: (w, h) as the processor resized it
    rounds: list = field(default_factory=list)
    prompt_ids: list | None = None
    done: bool = False
    hit_limit: bool = False

    def images(self) -> list:
        return [p["image"] for m in self.messages if isinstance(m["content"], list) for p in m["content"]
                if p.get("type") == "image"]


def _check_box(box, size, index: int) -> tuple[float, float, float, float]:
    """A `first_round` box: four finite numbers inside the source image (as the core's `roi.check_box`, which a
    backbone module may not import: backbones import only leaf modules)."""
    W, H = size
    ok = isinstance(box, (list, tuple)) and len(box) == 4 and all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in box)
    if not ok or not (0 <= box[0] < box[2] <= W and 0 <= box[1] < box[3] <= H):
        raise QZoomError(f"first_round gave sample {index} the box {box!r}; it must be (x1, y1, x2, y2) inside "
                         f"the {W}x{H} px source image")
    return tuple(float(v) for v in box)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise QZoomError(f"{name} must be a positive integer, got {value!r}")
    return value


class ToolLoop:
    """Batched greedy multi-round generation of a tool-loop model (see the module docstring).

    Args:
        model: an unmodified HF Qwen-VL-family model (its processor must return `image_grid_thw`).
        processor: its processor (chat template, tokenizer, image processor).
        grammar: a `ToolGrammar` (`tool_grammars.DEEPEYES`, `CHAIN_OF_FOCUS`, `MINI_O3`).
        max_rounds: model calls per sample (default: the grammar's).
        max_new_tokens: per round.
        min_crop_px: the shortest crop side (default: the image processor's patch x merge size, else 28).
        first_round: None, or a callable (round-1 processor inputs, source images) -> one `ZoomDecision` or
            None per sample (e.g. `QZoomShortcut(zoom)`).
        keep_inputs: record each round's prompt ids in `ToolRound.input_ids`.
    """

    def __init__(self, model, processor, grammar: ToolGrammar = DEEPEYES, *, max_rounds: int | None = None,
                 max_new_tokens: int = 1024, min_crop_px: int | None = None,
                 first_round: Callable | None = None, keep_inputs: bool = False):
        if not isinstance(grammar, ToolGrammar):
            raise QZoomError(f"grammar must be a ToolGrammar (e.g. tool_grammars.DEEPEYES), got "
                             f"{type(grammar).__name__}")
        for part in ("tokenizer", "image_processor", "apply_chat_template"):
            if getattr(processor, part, None) is None:
                raise QZoomError(f"the tool loop needs the model's processor (with a {part}); got "
                                 f"{type(processor).__name__}")
        if first_round is not None and not callable(first_round):
            raise QZoomError("first_round must be None or a callable, e.g. QZoomShortcut(zoom)")
        self.model, self.processor, self.grammar = model, processor, grammar
        self.spec = get_spec(model)
        self.tokenizer = processor.tokenizer
        self.max_rounds = _positive_int(grammar.max_rounds if max_rounds is None else max_rounds, "max_rounds")
        self.max_new_tokens = _positive_int(max_new_tokens, "max_new_tokens")
        ip = processor.image_processor
        self.patch = getattr(ip, "patch_size", None)
        default_side = self.patch * getattr(ip, "merge_size", 1) if isinstance(self.patch, int) else 28
        self.min_crop_px = _positive_int(default_side if min_crop_px is None else min_crop_px, "min_crop_px")
        self.first_round, self.keep_inputs = first_round, keep_inputs
        spec = self.spec
        self.placeholders = [t for t in (spec.image_token_id, spec.video_token_id, spec.vision_start_id,
                                         spec.vision_end_id) if t is not None]
        self.placeholder_text = [t for t in self.tokenizer.convert_ids_to_tokens(self.placeholders) if t]
        self.generation_config = self._greedy_config(model)

    def _greedy_config(self, model):
        cfg = copy.deepcopy(model.generation_config)
        # greedy; the sampling settings an RL checkpoint ships are reset to neutral values so none is reported
        cfg.do_sample, cfg.num_beams, cfg.temperature, cfg.top_p, cfg.top_k = False, 1, 1.0, 1.0, 50
        if cfg.eos_token_id is None:
            cfg.eos_token_id = self.tokenizer.eos_token_id
        if cfg.eos_token_id is None:
            raise QZoomError("neither the model's generation_config nor the tokenizer has an eos_token_id; set "
                             "model.generation_config.eos_token_id so rounds can end")
        if cfg.pad_token_id is None:
            cfg.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (
                cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else cfg.eos_token_id[0])
        eos = cfg.eos_token_id
        self.eos = {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}
        return cfg

    # --- public entry point ---------------------------------------------------------------------
    @torch.no_grad()
    def run(self, images: list, questions: list[str], generate_kwargs=None) -> list[ToolLoopResult]:
        """Answer `questions` about `images` (one source PIL image per sample).

        `generate_kwargs`: extra `model.generate` keywords, a dict or a callable (round index, sample indices of
        the batch rows, processor inputs) -> dict (e.g. a `prefix_allowed_tokens_fn` for that round).
        """
        samples = self._samples(images, questions)
        if generate_kwargs is not None and not isinstance(generate_kwargs, dict) and not callable(generate_kwargs):
            raise QZoomError("generate_kwargs must be None, a dict or a callable (round, samples, inputs) -> dict")
        for r in range(self.max_rounds):
            active = [s for s in samples if not s.done]
            if not active:
                break
            inputs = self._inputs(active)
            texts, meta = {}, {}
            if r == 0 and self.first_round is not None:
                texts, meta = self._shortcut(active, inputs)
            todo = [s for s in active if s.index not in texts]
            if todo:
                sub = inputs if len(todo) == len(active) else self._inputs(todo)
                texts.update(zip((s.index for s in todo), self._generate(todo, sub, r, generate_kwargs)))
            for s in active:
                self._advance(s, texts[s.index], r, **meta.get(s.index, {}))
        return [self._result(s) for s in samples]

    def _samples(self, images, questions) -> list[_Sample]:
        if isinstance(questions, str) or not isinstance(questions, (list, tuple)):
            raise QZoomError("questions must be a list with one string per sample, e.g. [question]")
        if isinstance(images, Image.Image) or not isinstance(images, (list, tuple)):
            raise QZoomError("images must be a list with one PIL image per sample, e.g. [image]")
        if len(images) != len(questions) or not images:
            raise QZoomError(f"got {len(images)} images for {len(questions)} questions (need one of each per sample)")
        samples = []
        for i, (image, q) in enumerate(zip(images, questions)):
            if not isinstance(image, Image.Image):
                raise QZoomError(f"images[{i}] is a {type(image).__name__}, not a PIL image")
            if not isinstance(q, str):
                raise QZoomError(f"questions[{i}] is a {type(q).__name__}, not a string")
            if bad := [t for t in self.placeholder_text if t in q]:
                raise QZoomError(f"questions[{i}] holds the image placeholder {bad[0]!r}; the runner adds the image "
                                 "itself: pass the question text only")
            image = image.convert("RGB")
            messages = [{"role": "system", "content": self.grammar.system_prompt}] if self.grammar.system_prompt else []
            content = self.grammar.first_user(q)
            next(p for p in content if p["type"] == "image")["image"] = image
            messages.append({"role": "user", "content": content})
            samples.append(_Sample(i, image, messages, [(0, 0, *image.size)]))
        return samples

    # --- one round -------------------------------------------------------------------------------
    def _inputs(self, states: list[_Sample]) -> dict:
        """Processor inputs (left-padded) for the conversations; records each image's seen size (and prompt ids)."""
        texts = [self.processor.apply_chat_template(s.messages, add_generation_prompt=True, tokenize=False)
                 for s in states]
        flat = [im for s in states for im in s.images()]
        inputs = dict(self.processor(text=texts, images=flat, padding=True, padding_side="left", return_tensors="pt"))
        grid = inputs.get("image_grid_thw")
        if grid is None or not isinstance(self.patch, int):
            raise QZoomError(f"the tool loop needs a Qwen-VL-style processor (image_grid_thw and an integer "
                             f"patch_size); {type(self.processor).__name__} gives neither")
        rows = iter(grid.tolist())
        for b, s in enumerate(states):
            s.seen = [(w * self.patch, h * self.patch) for _, h, w in (next(rows) for _ in s.images())]
            if self.keep_inputs:
                s.prompt_ids = inputs["input_ids"][b][inputs["attention_mask"][b].bool()].tolist()
        return inputs

    def _shortcut(self, active: list[_Sample], inputs: dict):
        decisions = self.first_round(inputs, [s.image for s in active])
        if not isinstance(decisions, (list, tuple)) or len(decisions) != len(active):
            raise QZoomError(f"first_round must return one ZoomDecision (or None) per sample: {len(active)} expected")
        texts, meta = {}, {}
        for s, d in zip(active, decisions):
            if d is not None and not isinstance(d, ZoomDecision):
                raise QZoomError(f"first_round returned a {type(d).__name__}, not a ZoomDecision or None")
            meta[s.index] = {"gate_prob": None if d is None else d.gate_prob}
            if d is None or d.box is None:
                continue
            box = _check_box(d.box, s.image.size, s.index)
            written = from_pixels(box, self.grammar.coords, s.image.size, s.seen[0])
            texts[s.index] = d.preamble + self.grammar.format_call(written, 0)
            meta[s.index]["by_shortcut"] = True
        return texts, meta

    def _generate(self, states, inputs: dict, r: int, generate_kwargs) -> list[str]:
        device = self.spec.embed_tokens.weight.device
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        prompt_len = batch["input_ids"].shape[1]
        extra = dict(generate_kwargs(r, [s.index for s in states], inputs) if callable(generate_kwargs)
                     else generate_kwargs or {})
        stops = StoppingCriteriaList(list(extra.pop("stopping_criteria", [])))
        if self.grammar.stop_strings:
            stops.insert(0, StopOnStrings(self.tokenizer, prompt_len, self.grammar.stop_strings))
        cfg = copy.deepcopy(self.generation_config)  # settings go into the config: transformers 5 warns on a mix
        cfg.max_new_tokens, cfg.suppress_tokens = self.max_new_tokens, self.placeholders
        for key in [k for k in extra if hasattr(cfg, k)]:
            setattr(cfg, key, extra.pop(key))
        seq = self.model.generate(**batch, generation_config=cfg, stopping_criteria=stops, **extra)
        return [self._text(row) for row in seq[:, prompt_len:].tolist()]

    def _text(self, tokens: list[int]) -> str:
        end = next((i for i, t in enumerate(tokens) if t in self.eos), len(tokens))
        text = self.tokenizer.decode(tokens[:end], skip_special_tokens=True)
        cuts = [text.find(s) + len(s) for s in self.grammar.stop_strings if s in text]
        return text[:min(cuts)] if cuts else text

    def _advance(self, s: _Sample, text: str, r: int, gate_prob=None, by_shortcut=False) -> None:
        """Record the round; then finish the sample or append the tool response (crop or error) to it."""
        g = self.grammar
        rnd = ToolRound(text, by_shortcut=by_shortcut, gate_prob=gate_prob, input_ids=s.prompt_ids)
        s.rounds.append(rnd)
        clean = text
        for t in self.placeholder_text:  # a spelled-out placeholder would re-tokenize into an image slot
            clean = clean.replace(t, "")
        s.messages.append({"role": "assistant", "content": clean})
        region = None
        try:
            body = g.call_body(text)
            if body is None:
                s.done = True
                return
            rnd.call = g.parse(body)
            region = self._region(s, rnd.call)
        except ToolCallError as err:
            rnd.malformed, rnd.error = rnd.call is None, str(err)
        rnd.box = region
        if r == self.max_rounds - 1:  # the model still calls a tool: the limit ends the sample, nothing is cropped
            s.done = s.hit_limit = True
            return
        content = g.tool_response(r) if region is not None else g.error_response(rnd.error)
        if content is None:  # no error turn in this grammar: the whole image goes back as the tool response
            region, content = s.regions[0], g.tool_response(r)
        if region is not None:
            fed = self._fed_image(s, rnd.call.source if rnd.box is not None else 0, region)
            next(p for p in content if p["type"] == "image")["image"] = fed
            rnd.crop_size = fed.size
            s.regions.append(region)
        s.messages.append({"role": "user", "content": content})

    def _region(self, s: _Sample, call: ToolCall) -> tuple[int, int, int, int]:
        """The call's crop in original pixels (its box is relative to the image it names)."""
        if call.source >= len(s.regions):
            raise ToolCallError(f"there is no observation_{call.source}: the conversation holds observations 1 to "
                                f"{len(s.regions) - 1}" if len(s.regions) > 1 else
                                f"there is no observation_{call.source} yet; use original_image")
        ox1, oy1, ox2, oy2 = s.regions[call.source]
        size = (ox2 - ox1, oy2 - oy1)
        px = to_pixels(call.box, self.grammar.coords, size, s.seen[call.source])
        x1, y1, x2, y2 = place_box(self.grammar, px, size, self.min_crop_px, written=call.box)
        return ox1 + x1, oy1 + y1, ox1 + x2, oy1 + y2

    def _fed_image(self, s: _Sample, source: int, region) -> Image.Image:
        crop = s.image.crop(region)
        scale = self.grammar.crop_scale
        if scale is None:
            return crop
        ox1, oy1, ox2, oy2 = s.regions[source]  # the crop's size in the frame the model saw, times `scale`
        sw, sh = s.seen[source]
        w = (region[2] - region[0]) * sw / (ox2 - ox1) * scale
        h = (region[3] - region[1]) * sh / (oy2 - oy1) * scale
        return crop.resize((max(1, round(w)), max(1, round(h))), Image.Resampling.LANCZOS)

    def _result(self, s: _Sample) -> ToolLoopResult:
        text = s.rounds[-1].text
        return ToolLoopResult(text, final_answer(self.grammar.strip_calls(text)), s.rounds, s.hit_limit, s.messages)
