"""The `qzoom` model for lmms-eval: gated two-pass Q-Zoom answers through lmms-eval's own evaluator.

lmms-eval finds it through this distribution's entry point (group `lmms_eval.models`, see `manifest.py`); nothing is
copied into lmms-eval and no environment variable is needed:

    lmms-eval --model qzoom --model_args pretrained=MODEL,adapters=ADAPTERS,gate_threshold=0.05,max_pixels=451584 \\
        --tasks textvqa_val --batch_size 8

A "simple" lmms-eval model (`doc_to_visual` + `doc_to_text`): one image and one question per document. Every
request batch goes through `QZoom.generate_from_inputs`, which decides gate and zoom per sample; decoding is greedy
(a task asking for sampling gets greedy answers and one warning). Per sample it records whether it zoomed, the gate
probability, the visual tokens and the latency (`QZoomLMM.stats`), which `qzoom eval` reports next to the
accuracies. `loglikelihood` scores the continuation along the path that would answer (the RoI pass where the gate
fires and the twig finds a box, else the direct one; `qzoom_adapters.likelihood`).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

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
                                                      **args.zoom_overrides())
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
        from qzoom_adapters.errors import QZoomError

        visuals = doc_to_visual(self._doc(task, split, doc_id))
        visuals = [v for v in (visuals if isinstance(visuals, (list, tuple)) else [visuals]) if v is not None]
        if len(visuals) != 1:
            raise QZoomError(f"{task} document {doc_id} has {len(visuals)} visuals; Q-Zoom answers one image per "
                             "question")
        question = context.replace("<image>", "").strip()
        return visuals[0], question

    def _max_new_tokens(self, gen_kwargs: dict) -> int:
        sampling = gen_kwargs.get("do_sample") is True or (gen_kwargs.get("num_beams") or 1) > 1
        if sampling and not self._warned_sampling:
            warnings.warn("qzoom decodes greedily; the task's sampling / beam settings are ignored", stacklevel=2)
            self._warned_sampling = True
        return int(gen_kwargs.get("max_new_tokens") or self.args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        from qzoom_adapters.recipes.models import batch_to

        results: list[str | None] = [None] * len(requests)
        spec, zoom = self.zoom.spec, self.zoom
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="qzoom answering")
        order = list(range(len(requests)))
        start = 0
        while start < len(order):
            first = requests[order[start]].args[1]
            chunk = [order[start]]
            while (len(chunk) < self.batch_size and start + len(chunk) < len(order)
                   and requests[order[start + len(chunk)]].args[1] == first):
                chunk.append(order[start + len(chunk)])
            start += len(chunk)
            samples = [self._sample(r.args[0], r.args[2], r.args[3], r.args[4], r.args[5])
                       for r in (requests[i] for i in chunk)]
            gen_kwargs = dict(first)
            max_new = self._max_new_tokens(gen_kwargs)
            images, questions = [s[0] for s in samples], [s[1] for s in samples]
            self._sync()
            t0 = time.perf_counter()
            inputs = batch_to(spec.chat_inputs(zoom.processor, images, questions, pixels=self.view_pixels),
                              self.device)
            outs = zoom.generate_from_inputs(inputs, images, max_new_tokens=max_new)
            self._sync()
            seconds = (time.perf_counter() - t0) / len(chunk)
            for i, out in zip(chunk, outs):
                req = requests[i]
                text = _until(out.text or "", gen_kwargs.get("until"))
                results[i] = text
                self.stats.append(SampleStat(req.args[4], int(req.args[3]), out.zoomed, out.gate_prob,
                                             out.visual_tokens, seconds, out.bbox))
                self.cache_hook.add_partial("generate_until", (req.args[0], first), text)
            bar.update(len(chunk))
        bar.close()
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(log p(continuation), is greedy) along the path that would answer each request (see the module doc)."""
        from qzoom_adapters.likelihood import continuation_scores

        out = []
        for req in tqdm(requests, disable=self.rank != 0, desc="qzoom scoring"):
            context, continuation, doc_to_visual, doc_id, task, split = req.args
            image, question = self._sample(context, doc_to_visual, doc_id, task, split)
            if callable(continuation):
                continuation = continuation(self._doc(task, split, doc_id))
            score = continuation_scores(self.zoom, [image], [question], [continuation], pixels=self.view_pixels)[0]
            out.append((score.logprob, score.is_greedy))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("qzoom answers one question per image in one round; multi-round tasks are not "
                                  "supported")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

