"""The gated two-pass decoder (SPEC §3.3), batched with per-sample decisions.

Reads top to bottom like SPEC §3.3: inputs -> pass A to layer K (`trunk.py`) -> gate (`gate.py`) -> twig
(`twig.py`) -> heatmap -> box -> crop (`roi.py`) -> RoI sequence, positions and batch layout (`positions.py`) ->
pass B reusing the cache of layers < K -> decode (`decode.py`: the direct and the zoomed rows of a batch in one
decode loop).

One vision-tower call per batch for the global images (`trunk.prefill`) and one for all of its crops (preprocessed
together by `crop_preprocess.py`); `ZoomConfig.vision_attention` selects the tower's attention for the call
(`vision_attention.py`) and restores the model's own setting after it. The call's argument checks and per-model
lock are in `call_checks.py`, the zoom decision in `zoom_decision.py`, each sample's output in `sample_output.py`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from qzoom_adapters import compat as _compat
from .call_checks import (check_boxes, check_grids, check_max_new_tokens, check_processor, check_questions,
                          model_lock)
from .config import ZoomConfig, as_zoom_config, merge_zoom_config
from .crop_preprocess import CropPreprocessor
from .decode import Decoder, DecodeRows, eos_ids
from .errors import QZoomError
from .gate import DynamicGate
from .images import roi_image_indices, source_image_groups
from .outputs import ZoomPlan
from .positions import RoiBatch, RoiSequence, roi_batch, roi_place, suffix_features
from .roi import Crop, check_source_image, crop_from_box, crop_from_heatmap, twig_region
from .sample_output import Answer, Regions, sample_output
from .spec import get_spec
from .timing import stage
from .trunk import Prefill, Trunk, inputs_on
from .twig import TwigRPN
from .vision_attention import selected_vision_attention, vision_attention_key
from .zoom_decision import zoom_decisions


@dataclass
class _Group:
    """Batch rows of one path ("direct" or "roi") ready to decode, with that path's layer kwargs."""

    rows: list[int]
    ready: DecodeRows
    layer_kwargs: dict


class QZoom:
    """Q-Zoom on an unmodified HF model: `TwigRPN` + `DynamicGate` + gated two-pass decoding."""

    def __init__(
        self,
        model: nn.Module,
        processor=None,
        *,
        twig: TwigRPN | None = None,
        gate: DynamicGate | None = None,
        config: ZoomConfig | None = None,
        image_processor=None,
    ):
        self.model = model
        self.processor = processor
        self.image_processor = image_processor or getattr(processor, "image_processor", None)
        if twig is None and gate is None:
            raise QZoomError("QZoom needs a twig and/or a gate: pass twig=TwigRPN.from_backbone(model, K, T) and/or "
                             "gate=DynamicGate.from_backbone(model, K, T) (for plain generation call model.generate)")
        self.spec = get_spec(model)
        self.trunk = Trunk(self.spec)
        self.twig, self.gate = twig, gate
        for branch in (twig, gate):
            if branch is not None:
                branch.check_backbone(self.spec)
        if twig is not None and gate is not None and twig.K != gate.K:
            raise QZoomError(f"twig (K={twig.K}) and gate (K={gate.K}) must branch at the same layer")
        check_processor(self.processor, self.tokenizer, self.spec)
        self.config = config or ZoomConfig()
        self.decoder = Decoder(self.spec, self.trunk)
        self.crop_preprocessor = CropPreprocessor()
        self._lock = model_lock(model)

    @property
    def K(self) -> int:
        return (self.twig or self.gate).K

    @property
    def config(self) -> ZoomConfig:
        return self._config

    @config.setter
    def config(self, config: ZoomConfig | dict) -> None:
        """Set the config (a `ZoomConfig` or a dict of its fields, validated either way); an unset
        `position_mode` becomes the backbone's default (aligned for M-RoPE)."""
        config = as_zoom_config(config)
        if config.position_mode is None:
            config = config.model_copy(update={"position_mode": self.spec.default_position_mode})
        vision_attention_key(self.spec, config.vision_attention)  # a tower without cu_seqlens refuses "varlen" here
        check = getattr(self.spec, "check_crop_budget", None)
        budget = config.crop_min_pixels or config.crop_max_pixels
        if check is not None and self.image_processor is not None and budget:
            check(self.image_processor, config.crop_min_pixels, config.crop_max_pixels)
        self._config = config

    @property
    def position_mode(self) -> str:
        return self.config.position_mode

    def with_config(self, config: ZoomConfig | dict | None = None, **overrides) -> "QZoom":
        """A `QZoom` on the same model, adapters and decode buffers with other settings; this one is unchanged.

        Only the fields `config` sets explicitly (`model_fields_set`, or a dict's keys) and the keyword `overrides`
        replace this one's settings: `zoom.with_config(gate_threshold=0.0)` always zooms, everything else as is.
        """
        other = copy.copy(self)  # shares model, adapters, trunk, decoder and the per-model lock
        other.config = merge_zoom_config(self.config, config, overrides)
        return other

    def release_buffers(self, empty_cache: bool = True) -> int:
        """Free the decoder's static buffers and CUDA graphs (shared with `with_config` copies); returns the bytes of
        buffers dropped. The next call rebuilds what it needs. `empty_cache`: also return the freed blocks to the
        device (`torch.cuda.empty_cache()`) where CUDA is in use."""
        with self._lock:
            return self.decoder.release(empty_cache=empty_cache)

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor if hasattr(self.processor, "decode") else None)

    # --- public entry points ------------------------------------------------------------
    def generate(self, images: list, questions: list[str], max_new_tokens: int = 32, return_trace: bool = False,
                 roi_image: list | None = None):
        """Answer `questions` about `images` (chat template applied by the processor).

        Args:
            images: one entry per sample: a source image (a PIL image, or the path of an image file, opened here),
                or a list of them for several images in one prompt (in order, all before the question).
                Arrays and None are refused; 16-bit grayscale is scaled to 8 bits and transparency goes on
                white (see `qzoom_adapters.images`).
            questions: one string per sample.
            max_new_tokens: a positive integer.
            roi_image: as for `generate_from_inputs`: which image of each sample the twig looks at and the crop is
                cut from (default: the last).

        Thread safety: calls on the same model are serialized by a per-model lock (hooks and decode buffers
        live on the model), so one `QZoom` may be shared between threads; the calls then run one after the
        other, not in parallel.
        """
        check_max_new_tokens(max_new_tokens)
        if self.processor is None:
            raise QZoomError("generate() needs a processor; use generate_from_inputs() with processed inputs")
        images = source_image_groups(images)
        questions = check_questions(questions, len(images))
        with self._lock:
            inputs = self.spec.chat_inputs(self.processor, images, questions)
            return self.generate_from_inputs(inputs, images, max_new_tokens=max_new_tokens, return_trace=return_trace,
                                             roi_image=roi_image)

    def generate_from_inputs(self, inputs, images: list, max_new_tokens: int = 32, return_trace: bool = False,
                             force_zoom: list[bool] | None = None, boxes: list | None = None,
                             roi_image: list | None = None):
        """Gated greedy answers for processed, left-padded `inputs`; `images` are the source images
        (PIL images or paths, as for `generate`; a list of them for a sample with several images, in prompt order),
        the full-resolution originals `inputs` were made from. Their tensors may be anywhere (e.g. the processor's
        CPU output): the call uses copies on the model's input device.

        Args:
            force_zoom: per-sample decisions that replace the gate's (the gate still runs and reports its
                probability); for benchmarks and ablations.
            boxes: per sample, None (the twig finds the region) or a box `(x1, y1, x2, y2)` in the source image's
                pixels that is cropped instead of the twig's: a forced box (oracle probes, benchmarks). A box implies
                zooming that sample unless `force_zoom` says False for it, and needs no twig; ends are rounded
                outwards to whole pixels and a side under `min_crop_px` grows like a twig box. Where a twig runs,
                its heatmap is still computed and reported. The box's global-token box (`trace["bbox_tokens"]`,
                used by aligned positions) is the grid cells it touches. The box is in the pixels of the sample's
                RoI image (`roi_image`).
            roi_image: per sample, None or the index (negative: from the end) of the image among the sample's
                images that the twig looks at, the crop is cut from and the RoI block follows (its positions in that
                image's frame). Default: the last image (the latest turn, what the question is about).

        Serialized per model like `generate`.
        """
        check_max_new_tokens(max_new_tokens)
        inputs, images, targets, boxes = self._checked_call(inputs, images, boxes, roi_image)
        with self._lock:
            return self._generate(inputs, images, targets, max_new_tokens, return_trace, force_zoom, boxes)

    @torch.no_grad()
    def plan_from_inputs(self, inputs, images: list, force_zoom: list[bool] | None = None, boxes: list | None = None,
                         roi_image: list | None = None) -> list[ZoomPlan]:
        """What `generate_from_inputs` with the same arguments would do, without doing it: pass A, the gate and the
        twig only (no pass B, no decoding). Per sample a `ZoomPlan`: whether it zooms, the crop's source-pixel box
        and the gate probability (e.g. for a tool-loop runner that writes the zoom call itself)."""
        inputs, images, targets, boxes = self._checked_call(inputs, images, boxes, roi_image)
        with self._lock, selected_vision_attention(self.spec, self.config.vision_attention):
            a = self._pass_a(inputs, images, targets)
            gate_prob = self._gate(a)
            want_zoom = self._zoom_decisions(gate_prob, a.ids.shape[0], force_zoom, boxes)
            crops = self._twig_crops(a, [g[t] for g, t in zip(images, targets)], targets, want_zoom, boxes).crops
        return [ZoomPlan(i in crops, crops[i].box_px if i in crops else None,
                         None if gate_prob is None else float(gate_prob[i]), targets[i]) for i in range(len(targets))]

    def _checked_call(self, inputs, images, boxes, roi_image):
        """The checked arguments of a call on processed inputs: (inputs on the model's input device, source image
        groups, RoI image index per sample, checked boxes)."""
        if not hasattr(inputs, "get") or inputs.get("input_ids") is None:
            raise QZoomError("inputs need `input_ids` (the processor's output for the batch)")
        if inputs["input_ids"].shape[0] == 0:
            raise QZoomError("empty batch: inputs hold no samples")
        images = source_image_groups(images)
        targets = roi_image_indices(roi_image, images)
        boxes = check_boxes(boxes, [group[t] for group, t in zip(images, targets)], inputs["input_ids"].shape[0])
        return inputs_on(inputs, self.spec.embed_tokens.weight.device), images, targets, boxes  # CPU output, GPU model

    @torch.no_grad()
    def _generate(self, inputs, images: list, targets: list[int], max_new_tokens: int, return_trace: bool,
                  force_zoom, boxes):
        # the vision attention the config asks for, for this call only (restored on exit, also on errors)
        with selected_vision_attention(self.spec, self.config.vision_attention):
            return self._gated(inputs, images, targets, max_new_tokens, return_trace, force_zoom, boxes)

    def _gated(self, inputs, images: list, targets: list[int], max_new_tokens: int, return_trace: bool, force_zoom,
               boxes):
        a = self._pass_a(inputs, images, targets)  # pass A: vision + layers 0..K-1
        B = a.ids.shape[0]
        sources = [group[t] for group, t in zip(images, targets)]  # the RoI image of each sample
        gate_prob = self._gate(a)  # gate on h^K
        want_zoom = self._zoom_decisions(gate_prob, B, force_zoom, boxes)
        regions = self._twig_crops(a, sources, targets, want_zoom, boxes)  # twig -> heatmap -> box -> crop
        groups, roi_seqs = {}, {}
        if regions.crops:  # crop -> encode -> RoI sequence and positions -> pass B
            groups["roi"], roi_seqs = self._roi_pass(a, regions.crops, targets)
        direct_rows = [i for i in range(B) if i not in regions.crops or self.config.emit_direct]
        if direct_rows:  # layers K..L-1 on the same sequence
            groups["direct"] = self._direct_pass(a, direct_rows)
        answers = self._decode(groups, max_new_tokens)  # every row in one loop
        roi, direct = answers.get("roi", {}), answers.get("direct", {})  # per-sample output (sample_output.py)
        return [sample_output(i, a.ids[i], self.spec.image_token_id, self.tokenizer, gate_prob, regions, roi, direct,
                              roi_seqs, return_trace, targets[i]) for i in range(B)]

    # --- pass A: vision + layers 0..K-1 --------------------------------------------------
    def _pass_a(self, inputs, images, targets: list[int] | None = None) -> Prefill:
        """Pass A for `images` (per sample a source image or a list of them; `targets`: the RoI image of each,
        default the last): sizes, counts and grids checked against the inputs."""
        images = [group if isinstance(group, list) else [group] for group in images]
        if len(images) != inputs["input_ids"].shape[0]:
            raise QZoomError(f"got {len(images)} source images for a batch of {inputs['input_ids'].shape[0]}")
        for group, t in zip(images, targets or [-1] * len(images)):
            check_source_image(group[t], self.config.min_crop_px)  # the image a crop is cut from
        a = self.trunk.prefill(inputs, self.K, _compat.new_cache())  # validates the inputs first
        for i, (spans, group) in enumerate(zip(a.spans, images)):
            if len(spans) != len(group):
                raise QZoomError(f"sample {i} has {len(spans)} image(s) in the inputs but {len(group)} source "
                                 "image(s) were given; pass the sample's images as one list, in prompt order")
        check_grids(self.spec, self.image_processor, a, images)
        return a

    # --- gate ----------------------------------------------------------------------------
    def _gate(self, a: Prefill) -> torch.Tensor | None:
        if self.gate is None:
            return None
        with stage("gate"):
            return torch.sigmoid(self.gate.logits(self.spec, a.hK, a.kwargs, self.trunk))

    def _zoom_decisions(self, gate_prob, B: int, force_zoom=None, boxes=None) -> list[bool]:
        return zoom_decisions(gate_prob, B, self.config.gate_threshold, self.twig is not None, force_zoom, boxes)

    # --- twig -> heatmap -> box -> crop (roi.py) -------------------------------------------------
    def _twig_crops(self, a: Prefill, images, targets: list[int], want_zoom, boxes=None) -> Regions:
        """`images`: the RoI image of each sample (image `targets[i]` of sample i)."""
        found = Regions({}, {}, {})
        rows = [i for i, z in enumerate(want_zoom) if z]
        if not rows:
            return found
        boxes = boxes or [None] * len(want_zoom)
        cfg, spec = self.config, self.spec
        with stage("twig"):
            if self.twig is not None:
                sel = torch.tensor(rows, device=a.ids.device)
                first = a.mask[sel].argmax(dim=1)  # first real token (left padding)
                scores, first_scores = self.twig.query_scores(spec, a.hK[sel], a.rows_kwargs(self.trunk, sel),
                                                              self.trunk, first)
                which = [targets[i] for i in rows]
                maps = a.image_logits(scores, spec, rows, on_host=True, targets=which)
                first_maps = a.image_logits(first_scores, spec, rows, on_host=True, targets=which)
            for j, i in enumerate(rows):
                if boxes[i] is not None:  # the caller's box replaces the twig's
                    if self.twig is not None:
                        found.heatmaps[i], found.blurred[i] = maps[j], twig_region(spec, maps[j], first_maps[j], cfg)[0]
                    grid = spec.token_grid(a.grid[a.spans[i][targets[i]].row])
                    found.crops[i] = crop_from_box(spec, boxes[i], grid, images[i], self.image_processor,
                                                   cfg.min_crop_px, i)
                    continue
                blur, crop = crop_from_heatmap(spec, maps[j], first_maps[j], images[i], self.image_processor, cfg)
                found.heatmaps[i], found.blurred[i] = maps[j], blur
                if crop is not None:  # an empty mask answers directly
                    found.crops[i] = crop
        return found

    # --- direct path: layers K..L-1 on the same sequence ------------------------------------
    def _direct_pass(self, a: Prefill, rows: list[int]) -> _Group:
        with stage("direct_pass"):
            if len(rows) == a.ids.shape[0]:  # the whole batch: continue on pass A's own cache
                return _Group(rows, self._finish(a.hK, a.kwargs, a.cache, a.mask, a.pos), a.kwargs)
            sel = torch.tensor(rows, device=a.ids.device)
            kwargs = a.rows_kwargs(self.trunk, sel)
            return _Group(rows, self._finish(a.hK[sel], kwargs, a.rows_cache(sel, self.K), a.mask[sel], a.pos[:, sel]),
                          kwargs)

    def _finish(self, hK, kwargs, cache, mask, pos) -> DecodeRows:
        """Layers K..L-1 over the whole sequence (filling `cache`); the rows' first logits and cache."""
        h = self.trunk.run_layers(self.spec.layers[self.K :], hK, kwargs, cache)
        first = self.trunk.logits(h[:, -1])
        return DecodeRows.from_cache(first, mask, pos[:, :, -1], cache, len(self.spec.layers))

    # --- decode: every row of the batch in one loop --------------------------------------------
    def _decode(self, groups: dict[str, _Group], max_new_tokens: int) -> dict[str, dict[int, Answer]]:
        """Greedy tokens for every group's rows in one loop: {group name: {batch row: answer}}."""
        template = next(iter(groups.values())).layer_kwargs  # layer kwargs of a prefill: their form for this version
        tokens = iter(self.decoder.greedy([g.ready for g in groups.values()], max_new_tokens,
                                          eos_ids(self.model), template, self.config.decode))
        return {name: {i: Answer(next(tokens), g.ready.first[n]) for n, i in enumerate(g.rows)}
                for name, g in groups.items()}

    # --- RoI path ------------------------------------------------------------------------------
    def _roi_pass(self, a: Prefill, crops: dict[int, Crop],
                  targets: list[int]) -> tuple[_Group, dict[int, RoiSequence]]:
        """Pass B for the zoomed samples, batched with the prefixes kept at their pass-A columns
        (`positions.roi_batch` lays them out), each RoI block after image `targets[i]` of its sample; the group to
        decode and each row's RoI sequence."""
        spec = self.spec
        rows = sorted(crops)
        if self.image_processor is None:
            raise QZoomError("zooming re-encodes the crop: pass `image_processor=` (or a processor) to QZoom")
        with stage("crop_encode"):  # every crop of the batch preprocessed together, then one vision-tower call
            enc = self.crop_preprocessor(spec, self.image_processor, [crops[i].image for i in rows], self.config,
                                         a.ids.device)
            roi_feats = spec.encode_images(enc["pixel_values"], enc["image_grid_thw"])
        with stage("roi_pass"):
            return self._roi_layers(a, rows, crops, enc, roi_feats, targets)

    def _roi_layers(self, a: Prefill, rows: list[int], crops: dict, enc: dict, roi_feats, targets: list[int]):
        spec = self.spec
        places = [roi_place(a.spans[i], targets[i]) for i in rows]
        lay: RoiBatch = roi_batch(spec, a.ids, a.mask, a.pos, rows, enc["image_grid_thw"],
                                  [crops[i].box_tok for i in rows], self.position_mode, places)
        C, sel = lay.C, torch.tensor(rows, device=a.ids.device)
        # layers 0..K-1 on the new suffix [C:] only: the prefix rows come from pass A's cache; the suffix's images
        # are the crops and the images after each RoI image (their pass-A features)
        feats = suffix_features(spec, roi_feats, enc["image_grid_thw"], a, rows, targets)
        suffix_embeds = self.trunk.embed(lay.ids[:, C:], feats.embeds)
        extra = spec.decoder_inputs(lay.ids[:, C:] == spec.image_token_id, feats)
        cache = a.rows_cache(sel, self.K, upto=C)
        hK_suffix, _ = self.trunk.forward_to(self.K, suffix_embeds, lay.mask, lay.pos[:, :, C:], cache, extra)
        # layers K..L-1 over the whole new sequence, prefix rows from h^K[:, :C]
        hK = torch.cat([a.hK[sel, :C], hK_suffix], dim=1)
        embeds = torch.cat([a.embeds[sel, :C], suffix_embeds], dim=1)
        kwargs = self.trunk.layer_kwargs(embeds, lay.mask, lay.pos)
        return _Group(rows, self._finish(hK, kwargs, cache, lay.mask, lay.pos), kwargs), dict(zip(rows, lay.seqs))

    # --- save / load ---------------------------------------------------------------------------
    def save_pretrained(self, path):
        """Write `adapter_config.json` + `adapter_model.safetensors` (adapters only, with the base model's name,
        revision, model_type and depth) and a model card `README.md`; a README.md the user wrote is kept."""
        from .io import save_adapters

        return save_adapters(path, self.model, self.twig, self.gate, self.config)

    @classmethod
    def from_pretrained(cls, path, model, processor=None, *, image_processor=None, config=None, **overrides):
        """Adapters from `path` attached to `model`.

        Saved settings hold unless the caller sets them: the fields `config` sets explicitly (its
        `model_fields_set`, or a dict's keys), then keyword `overrides`, replace the saved values; fields left at
        their defaults do not (a saved `position_mode="sequential"` survives `config=ZoomConfig(gate_threshold=0.5)`).
        """
        from .io import load_adapters

        twig, gate, saved = load_adapters(path, model)
        return cls(model, processor, twig=twig, gate=gate, image_processor=image_processor,
                   config=merge_zoom_config(saved, config, overrides))

    @classmethod
    def from_reference_checkpoint(cls, path, processor=None, *, image_processor=None, config=None, torch_dtype="auto",
                                  dtype=None, device=None, device_map=None, attn_implementation=None, **overrides):
        """A released Q-Zoom checkpoint folder in `torch_dtype`/`dtype` ("auto": its own) on `device`/`device_map`
        ("auto", "cuda:0", a dict), held once (`io.load_reference_checkpoint`); config as in `from_pretrained`."""
        from .io import load_reference_checkpoint

        model, twig, gate, fields = load_reference_checkpoint(path, torch_dtype, device, attn_implementation,
                                                              device_map, dtype)
        return cls(model, processor, twig=twig, gate=gate, image_processor=image_processor,
                   config=merge_zoom_config({**ZoomConfig().model_dump(), **fields}, config, overrides))
