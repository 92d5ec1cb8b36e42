"""Log-likelihood of a given continuation along the path Q-Zoom would answer on (for multiple-choice scoring).

For each sample the gated decoder decides as it does when generating (gate, twig, box): zoomed samples score the
continuation after the RoI sequence (global image + crop, with the RoI positions of SPEC §3.2), the others after the
plain prompt. The continuation is teacher-forced through the backbone's own layers in one forward from scratch;
its first step's logits are those `generate` decodes from (`ZoomOutput.trace["first_logits"]`), which a test checks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import QZoomError
from .images import source_images
from .spec import VisualFeatures
from .trunk import Trunk


@dataclass
class ContinuationScore:
    """One sample's continuation under the answering path."""

    logprob: float  # sum of the continuation tokens' log-probabilities
    is_greedy: bool  # every continuation token is the argmax at its step
    zoomed: bool  # the path that scored it is the RoI pass
    tokens: int  # continuation length in tokens


def _features(spec, pixel_values, grids) -> VisualFeatures:
    return spec.encode_images(pixel_values, grids)


def _joined(a: VisualFeatures, b: VisualFeatures) -> VisualFeatures:
    """Global-image features followed by the crop's, in image-token order (the RoI block comes after the global)."""
    return VisualFeatures(torch.cat([a.embeds, b.embeds]), tuple(torch.cat([x, y]) for x, y in zip(a.deepstack, b.deepstack)))


@torch.no_grad()
def continuation_scores(zoom, images: list, questions: list[str], continuations: list,
                        pixels: int | None = None) -> list[ContinuationScore]:
    """Score `continuations[i]` (a string, tokenized without special tokens, or a list of token ids) as the answer
    to `questions[i]` about `images[i]` (chat template applied, global view at `pixels` as `spec.chat_inputs` takes
    it), each along the path `zoom` would answer on."""
    if zoom.processor is None or zoom.tokenizer is None:
        raise QZoomError("continuation_scores needs a QZoom with a processor (the continuation is tokenized)")
    images = source_images(images)
    if not (len(images) == len(questions) == len(continuations)):
        raise QZoomError(f"got {len(images)} images, {len(questions)} questions and {len(continuations)} "
                         "continuations; pass one of each per sample")
    return [_score(zoom, image, q, c, pixels) for image, q, c in zip(images, questions, continuations)]


def _score(zoom, image, question: str, continuation: str, pixels) -> ContinuationScore:
    spec, trunk, device = zoom.spec, Trunk(zoom.spec), zoom.model.device
    cont = (zoom.tokenizer(continuation, add_special_tokens=False)["input_ids"] if isinstance(continuation, str)
            else [int(t) for t in continuation])
    if not cont:
        raise QZoomError(f"the continuation {continuation!r} has no tokens; nothing to score")
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
              for k, v in spec.chat_inputs(zoom.processor, [image], [question], pixels=pixels).items()}
    out = zoom.generate_from_inputs(inputs, [image], max_new_tokens=1, return_trace=True)[0]
    grids = spec.image_grids(inputs)
    feats = _features(spec, inputs["pixel_values"], grids)
    if out.zoomed:
        cfg = zoom.config
        crop = spec.process_crops(zoom.image_processor, [image.crop(out.bbox)], cfg.crop_min_pixels, cfg.crop_max_pixels)
        feats = _joined(feats, _features(spec, crop["pixel_values"].to(device), crop["image_grid_thw"].to(device)))
        ids = out.trace["roi_input_ids"].to(device)
        pos = out.trace["roi_position_ids"].to(device)  # (axes, S); fractional for aligned positions
        pos = pos.round().long() if zoom.position_mode == "sequential" else pos
    else:
        ids = inputs["input_ids"][0]
        pos = spec.position_ids(inputs["input_ids"], inputs.get("attention_mask"), grids)[:, 0]
        real = inputs["attention_mask"][0].bool() if inputs.get("attention_mask") is not None else None
        if real is not None:  # a batch of one has no padding, but stay exact if a processor adds some
            ids, pos = ids[real], pos[:, real]
    n, P = len(cont), ids.shape[0]
    ids = torch.cat([ids, torch.tensor(cont, device=device, dtype=ids.dtype)])[None]
    step = torch.arange(1, n + 1, device=device, dtype=pos.dtype)
    pos = torch.cat([pos, pos[:, -1:] + step], dim=1)[:, None]  # decode step k: last prompt position + k
    mask = torch.ones_like(ids)
    embeds = trunk.embed(ids, feats.embeds)
    extra = spec.decoder_inputs(ids == spec.image_token_id, feats)
    hK, kwargs = trunk.forward_to(zoom.K, embeds, mask, pos, None, extra)
    hidden = trunk.run_layers(spec.layers[zoom.K :], hK, kwargs)
    logprobs = torch.log_softmax(trunk.logits(hidden[0, P - 1 : P - 1 + n]), dim=-1)
    target = torch.tensor(cont, device=device)
    picked = logprobs.gather(1, target[:, None])[:, 0]
    return ContinuationScore(logprob=float(picked.sum()), is_greedy=bool((logprobs.argmax(-1) == target).all()),
                             zoomed=out.zoomed, tokens=n)
