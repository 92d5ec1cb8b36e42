"""The `qzoom` model for lmms-eval: gated two-pass Q-Zoom answers through lmms-eval's own evaluator.

lmms-eval finds it through this distribution's entry point (group `lmms_eval.models`, see `manifest.py`); nothing is
copied into lmms-eval and no environment variable is needed:

    lmms-eval --model qzoom --model_args pretrained=MODEL,adapters=ADAPTERS,gate_threshold=0.05,max_pixels=451584 \\
        --tasks textvqa_val --batch_size 8

A "simple" lmms-eval model (`doc_to_visual` + `doc_to_text`): one question and its still image(s) per request, or
per round of a multi-round task (`generate_until_multi_round`, whose task's `doc_to_text` gives each next round);
with several images the RoI is cut from the last; a request with no visual or a video stops the run with one
line (`RequestError`), and `loglikelihood` takes one image per request. Every
request batch goes through `QZoom.generate_from_inputs`, which decides gate and zoom per sample; decoding is greedy
(a task asking for sampling gets greedy answers and one warning). Per sample it records whether it zoomed, the gate
probability, the visual tokens and the latency (`QZoomLMM.stats`), which `qzoom eval` reports next to the
accuracies. `loglikelihood` scores the continuation along the path that would answer (the RoI pass where the gate
fires and the twig finds a box, else the direct one; `qzoom_adapters.likelihood`).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm

from .model_args import REFERENCE, ModelArgsError, QZoomModelArgs, parse_model_args

DEFAULT_MAX_NEW_TOKENS = 128  # when a task's generation_kwargs set none (as lmms-eval's Qwen-VL models)


@dataclass
class SampleStat:
    """What one answered document cost and how it was answered."""

    task: str
    doc_id: int
    zoomed: bool
    gate_prob: float | None
    visual_tokens: int
    latency_s: float  # the batch's wall clock (preprocessing, vision, both passes, decoding) / its size
    bbox: tuple | None
    round_idx: int = 0  # the round of a multi-round task (0: its first, and every single-round answer)


def _device(name: str | None) -> torch.device:
    from qzoom_adapters.devices import resolve_device
    from qzoom_adapters.errors import QZoomError

    try:
        return resolve_device(name, label="device=")
    except QZoomError as err:
        raise ModelArgsError(str(err)) from None


def _dtype(name: str, device: torch.device):
    """auto: bf16 on CUDA, fp32 on the CPU (as `qzoom infer`); checkpoint: the checkpoint's own ("auto")."""
    from qzoom_adapters.devices import resolve_dtype
    from qzoom_adapters.errors import QZoomError

    try:
        return resolve_dtype(name, device, label="dtype=")
    except QZoomError as err:
        raise ModelArgsError(str(err)) from None


def load_zoom(args: QZoomModelArgs, device: torch.device):
    """The `QZoom` the arguments describe, weights loaded straight into their dtype and onto `device`."""
    from transformers import AutoProcessor

    import qzoom_adapters as qz
    import qzoom_adapters.backbones.tiny_processor  # noqa: F401  (AutoProcessor loads the offline tiny processors)
    from qzoom_adapters.errors import QZoomError
    from qzoom_adapters.model_files import load_model

    dtype = _dtype(args.dtype, device)
    bounds = {k: getattr(args, k) for k in ("min_pixels", "max_pixels") if getattr(args, k) is not None}
    extra = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
    try:
        processor = AutoProcessor.from_pretrained(args.processor or args.pretrained, **bounds)
        if args.adapters == REFERENCE:
            zoom = qz.QZoom.from_reference_checkpoint(args.pretrained, processor, torch_dtype=dtype, device=device,
                                                      **extra, **args.zoom_overrides())
        else:
            placement = {} if device.type == "cpu" else {"device_map": {"": str(device)}}
            model = load_model(args.pretrained, dtype=dtype, **placement, **extra)
            zoom = qz.QZoom.from_pretrained(args.adapters, model, processor, **args.zoom_overrides())
    except QZoomError as err:
        raise ModelArgsError(str(err)) from None
    except OSError as err:  # a hub id or folder transformers cannot resolve
        raise ModelArgsError(f"cannot load pretrained={args.pretrained}: {str(err).strip().splitlines()[0]}") from None
    for module in (zoom.twig, zoom.gate):  # the adapters follow the model's device and dtype
        if module is not None:
            module.to(device, None if dtype == "auto" else dtype)
    if args.budget is not None:
        pixels = zoom.spec.budget_pixels(args.budget)
        if pixels is None:
            raise ModelArgsError(f"budget={args.budget}: the {zoom.spec.family} family reads every image at one "
                                 "fixed size; leave budget out")
        zoom = zoom.with_config(crop_min_pixels=pixels, crop_max_pixels=pixels)
        return zoom, pixels
    return zoom, None


def _until(text: str, stops) -> str:
    """`text` cut at the first of the task's stop strings."""
    for stop in stops or ():
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text


class RequestError(ModelArgsError):
    """A request Q-Zoom cannot answer (no still image, a video): one line, `qzoom: <problem>`, through
    lmms-eval's command line, which prints the traceback of any `Exception` a model raises."""


def _one_image(visuals, task: str, doc_id, round_idx: int | None = None):
    """The still image(s) of a request as RGB PIL (from PIL images or image files' paths): one image, or a list
    for a request with several (Q-Zoom then zooms into the last, `QZoom.generate_from_inputs`'s default RoI image);
    none, a video or anything else is a `RequestError`."""
    from qzoom_adapters.errors import QZoomError
    from qzoom_adapters.images import source_image

    where = f"{task} document {doc_id}" + ("" if round_idx is None else f" round {round_idx}")
    items = [v for v in (visuals if isinstance(visuals, (list, tuple)) else [visuals]) if v is not None]
    if not items:
        raise RequestError(f"{where} has no visual; Q-Zoom answers questions about still images")
    try:
        images = [source_image(v, i) for i, v in enumerate(items)]
    except QZoomError as err:  # a video's path, an array, ...
        raise RequestError(f"{where}: {err}; Q-Zoom answers questions about still images") from None
    return images[0] if len(images) == 1 else images


def _question(context) -> str:
    return str(context or "").replace("<image>", "").strip()


def _round_reply(turn, task: str, doc_id, round_idx: int) -> tuple:
    """What a task's multi-round `doc_to_text` returned: (visuals, context, terminal, round results, info)."""
    if not isinstance(turn, (tuple, list)) or len(turn) != 5:
        raise RequestError(f"{task} document {doc_id} round {round_idx}: doc_to_text returned "
                           f"{type(turn).__name__}, not (visuals, context, terminal, round results, info) as "
                           "lmms-eval's multi-round protocol has it")
    visuals, context, terminal, outputs, info = turn
    return visuals, context, bool(terminal), outputs, info


@dataclass
class _Rounds:
    """One multi-round document between rounds: the next round's (image, question), answers so far, the task's
    round info."""

    doc: dict
    sample: tuple
    outputs: list = field(default_factory=list)
    info: object = None


class QZoomLMM(lmms):
    """`--model qzoom` (see the module docstring and `QZoomModelArgs` for the arguments)."""

    is_simple = True

    def __init__(self, **kwargs):
        super().__init__()
        self.args = parse_model_args(kwargs)  # one line for a bad argument, before anything loads
        self.device = _device(self.args.device)
        self.zoom, self.view_pixels = load_zoom(self.args, self.device)
        self.batch_size = self.args.batch_size
        self.stats: list[SampleStat] = []
        self._warned_sampling = False
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self._rank, self._world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()

    # --- settings between runs (`qzoom eval` sweeps budgets on one loaded model) ---------------------------
    def set_budget(self, budget: int | None = None, min_pixels: int | None = None, max_pixels: int | None = None):
        """Read the global view (and the crop) at `budget` visual tokens, or within `min_pixels` / `max_pixels`
        (the processor is loaded again with those bounds; model and adapters stay)."""
        import qzoom_adapters as qz
        from transformers import AutoProcessor

        zoom = self.zoom
        if budget is not None:
            pixels = zoom.spec.budget_pixels(budget)
            self.view_pixels = pixels
            self.zoom = zoom.with_config(crop_min_pixels=pixels, crop_max_pixels=pixels)
            return
        bounds = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        processor = AutoProcessor.from_pretrained(self.args.processor or self.args.pretrained, **bounds)
        config = zoom.config.model_copy(update={"crop_min_pixels": None, "crop_max_pixels": None})
        self.view_pixels = None
        self.zoom = qz.QZoom(zoom.model, processor, twig=zoom.twig, gate=zoom.gate, config=config)

    def set_zoom(self, **fields) -> None:
        """Replace `ZoomConfig` fields (thresholds) for the next requests."""
        self.zoom = self.zoom.with_config(**fields)

    # --- requests ------------------------------------------------------------------------------------------
    def _doc(self, task: str, split: str, doc_id: int):
        return self.task_dict[task][split][doc_id]

    def _sample(self, context: str, doc_to_visual, doc_id: int, task: str, split: str):
        """(source image, question) of one request."""
        return _one_image(doc_to_visual(self._doc(task, split, doc_id)), task, doc_id), _question(context)

    def _max_new_tokens(self, gen_kwargs: dict) -> int:
        sampling = gen_kwargs.get("do_sample") is True or (gen_kwargs.get("num_beams") or 1) > 1
        if sampling and not self._warned_sampling:
            warnings.warn("qzoom decodes greedily; the task's sampling / beam settings are ignored", stacklevel=2)
            self._warned_sampling = True
        return int(gen_kwargs.get("max_new_tokens") or self.args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        with tqdm(total=len(requests), disable=self.rank != 0, desc="qzoom answering") as bar:  # closed on errors too
            for chunk in self._chunks(requests):
                samples = [self._sample(r.args[0], r.args[2], r.args[3], r.args[4], r.args[5])
                           for r in (requests[i] for i in chunk)]
                first = requests[chunk[0]].args[1]
                texts = self._answer([requests[i] for i in chunk], samples, dict(first))
                for i, text in zip(chunk, texts):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], first), text)
                bar.update(len(chunk))
        return results

    def _chunks(self, requests: list[Instance]):
        """Runs of consecutive requests with the same generation kwargs, at most `batch_size` long (indices)."""
        start = 0
        while start < len(requests):
            chunk = [start]
            while (len(chunk) < self.batch_size and start + len(chunk) < len(requests)
                   and requests[start + len(chunk)].args[1] == requests[start].args[1]):
                chunk.append(start + len(chunk))
            start += len(chunk)
            yield chunk

    def _answer(self, reqs: list[Instance], samples: list[tuple], gen_kwargs: dict, round_idx: int = 0) -> list[str]:
        """One batched `generate_from_inputs` call: each sample's answer cut at the task's stop strings, and its
        `SampleStat` recorded under its request's task and document."""
        from qzoom_adapters.recipes.models import batch_to

        spec, zoom = self.zoom.spec, self.zoom
        max_new = self._max_new_tokens(gen_kwargs)
        images, questions = [s[0] for s in samples], [s[1] for s in samples]
        self._sync()
        t0 = time.perf_counter()
        inputs = batch_to(spec.chat_inputs(zoom.processor, images, questions, pixels=self.view_pixels), self.device)
        outs = zoom.generate_from_inputs(inputs, images, max_new_tokens=max_new)
        self._sync()
        seconds = (time.perf_counter() - t0) / len(samples)
        texts = []
        for req, out in zip(reqs, outs):
            texts.append(_until(out.text or "", gen_kwargs.get("until")))
            self.stats.append(SampleStat(req.args[-2], int(req.args[-3]), out.zoomed, out.gate_prob,
                                         out.visual_tokens, seconds, out.bbox, round_idx))
        return texts

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(log p(continuation), is greedy) along the path that would answer each request (see the module doc)."""
        from qzoom_adapters.likelihood import continuation_scores

        out = []
        for req in tqdm(requests, disable=self.rank != 0, desc="qzoom scoring"):
            context, continuation, doc_to_visual, doc_id, task, split = req.args
            image, question = self._sample(context, doc_to_visual, doc_id, task, split)
            if isinstance(image, list):
                raise RequestError(f"{task} document {doc_id} has {len(image)} images; loglikelihood scores one "
                                   "image per question")
            if callable(continuation):
                continuation = continuation(self._doc(task, split, doc_id))
            score = continuation_scores(self.zoom, [image], [question], [continuation], pixels=self.view_pixels)[0]
            out.append((score.logprob, score.is_greedy))
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list]:
        """Multi-round tasks, as lmms-eval's own simple models run them: round 0 answers the request's context on
        `doc_to_visual(doc)`; after each round the task's `doc_to_text(doc, previous_output=[answers so far],
        round_idx=r, previous_round_info=...)` returns (visuals, context, terminal, round results, info) for round r,
        and a document stops when it says terminal. Every round is one Q-Zoom answer on its still image(s) (else
        one clear line naming the task, document and round); the documents of a batch answer each round together.
        Returns each request's round results, as the task's last `doc_to_text` call returned them."""
        results: list[list | None] = [None] * len(requests)
        with tqdm(total=len(requests), disable=self.rank != 0, desc="qzoom answering (multi-round)") as bar:
            for chunk in self._chunks(requests):
                self._rounds(requests, chunk, results, bar)
        return results

    def _rounds(self, requests: list[Instance], chunk: list[int], results: list, bar) -> None:
        """Every round of the documents `chunk`, each round of them in one batch, into `results`."""
        first = requests[chunk[0]].args[1]
        live: dict[int, _Rounds] = {}
        for i in chunk:
            context, _, doc_to_visual, _, doc_id, task, split = requests[i].args
            doc = self._doc(task, split, doc_id)
            live[i] = _Rounds(doc, (_one_image(doc_to_visual(doc), task, doc_id), _question(context)))
        round_idx = 0
        while live:
            rows = sorted(live)
            texts = self._answer([requests[i] for i in rows], [live[i].sample for i in rows], dict(first), round_idx)
            round_idx += 1
            for i, text in zip(rows, texts):
                state, (doc_to_text, doc_id, task) = live[i], requests[i].args[3:6]
                state.outputs.append(text)
                turn = doc_to_text(state.doc, previous_output=list(state.outputs), round_idx=round_idx,
                                   previous_round_info=state.info)
                visuals, context, terminal, outputs, state.info = _round_reply(turn, task, doc_id, round_idx)
                if outputs is not None:
                    state.outputs = list(outputs)
                if terminal:
                    results[i] = state.outputs
                    del live[i]
                    self.cache_hook.add_partial("generate_until_multi_round", (requests[i].args[0], first),
                                                state.outputs)
                    bar.update(1)
                else:
                    state.sample = (_one_image(visuals, task, doc_id, round_idx), _question(context))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

