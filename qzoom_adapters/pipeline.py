"""The gated two-pass decoder (SPEC §3.3), batched with per-sample decisions.

Reads top to bottom: inputs -> pass A to layer K -> gate -> twig -> RoI box and crop ->
RoI sequence and positions -> pass B reusing the cache of layers < K -> decode (the direct and the
zoomed rows of a batch in one decode loop).
"""
from __future__ import annotations

import numbers
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn

from qzoom_adapters.backbones import _compat
from .config import ZoomConfig, as_zoom_config
from .decode import Decoder, DecodeRows, eos_ids
from .errors import QZoomError
from .gate import DynamicGate
from .images import source_images
from .outputs import ZoomOutput
from .positions import roi_sequence
from .roi import Crop, box_to_pixels, check_grid_aspect, check_source_image, clip_box_to_grid, roi_from_heatmap
from .spec import get_spec
from .timing import stage
from .trunk import Prefill, Trunk
from .twig import TwigRPN


CROP_WORKERS = 8  # host threads preparing a batch's crops

# One lock per backbone: a call registers hooks on the model's layers and keeps decode buffers, so two
# calls on the same model (through one QZoom or several) must not overlap. Weak keys: no model is kept alive.
_MODEL_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


def _model_lock(model: nn.Module) -> threading.RLock:
    with _LOCKS_LOCK:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock


def _check_max_new_tokens(n) -> None:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise QZoomError(f"max_new_tokens must be a positive integer, got {n!r} ({type(n).__name__})")
    if n < 1:
        raise QZoomError(f"max_new_tokens must be at least 1, got {n}")


@dataclass
class _RoiSeq:
    """One zoomed sample's RoI sequence (unpadded) and where its pass-A prefix sits."""

    pad: int  # left padding in pass A
    P: int  # where the RoI block starts in the unpadded sequence: the cached prefix is [:P]
    ids: torch.Tensor
    pos: torch.Tensor
    grid: torch.Tensor  # the crop's image_grid_thw


def crop_from_heatmap(spec, logits, first_map, image, image_processor, cfg: ZoomConfig):
    """SPEC §2 for one sample: (h_t, w_t) twig logits -> (blurred map, `Crop` of the source image or None)."""
    sink = spec.sink_mask(*logits.shape, first_token_scores=first_map)
    blur, box = roi_from_heatmap(logits, sink, cfg.roi_threshold, cfg.blur_kernel, cfg.blur_sigma)
    if box is None:
        return blur, None
    box = clip_box_to_grid(box, logits.shape)
    window = spec.source_window(image_processor, image.size)
    box_px = box_to_pixels(box, tuple(logits.shape), image.size, cfg.min_crop_px, window)
    return blur, Crop(box, box_px, image.convert("RGB").crop(box_px))


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
        self.spec = get_spec(model)
        self.trunk = Trunk(self.spec)
        self.twig, self.gate = twig, gate
        for branch in (twig, gate):
            if branch is not None:
                branch.check_backbone(self.spec)
        if twig is not None and gate is not None and twig.K != gate.K:
            raise QZoomError(f"twig (K={twig.K}) and gate (K={gate.K}) must branch at the same layer")
        self._check_processor()
        self.config = config or ZoomConfig()
        self.decoder = Decoder(self.spec, self.trunk)
        self._lock = _model_lock(model)

    def _check_processor(self) -> None:
        """A processor of another family writes another image placeholder token than the model reads."""
        token, tok = getattr(self.processor, "image_token", None), self.tokenizer
        if not isinstance(token, str) or tok is None or not hasattr(tok, "convert_tokens_to_ids"):
            return
        token_id = tok.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != self.spec.image_token_id:
            raise QZoomError(
                f"the processor ({type(self.processor).__name__}) marks images with {token!r} = id {token_id}, but "
                f"this {self.spec.family} model expects image token id {self.spec.image_token_id}: the processor "
                "belongs to another model; load the processor saved with this model"
            )

    @property
    def K(self) -> int:
        branch = self.twig or self.gate
        if branch is None:
            raise QZoomError("QZoom needs a twig and/or a gate")
        return branch.K

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
        check = getattr(self.spec, "check_crop_budget", None)
        budget = config.crop_min_pixels or config.crop_max_pixels
        if check is not None and self.image_processor is not None and budget:
            check(self.image_processor, config.crop_min_pixels, config.crop_max_pixels)
        self._config = config

    @property
    def position_mode(self) -> str:
        return self.config.position_mode

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor if hasattr(self.processor, "decode") else None)

    # --- public entry points ------------------------------------------------------------
    def generate(self, images: list, questions: list[str], max_new_tokens: int = 32, return_trace: bool = False):
        """Answer `questions` about `images` (chat template applied by the processor).

        Args:
            images: one source image per sample: a PIL image, or the path of an image file (opened here).
                Arrays and None are refused; 16-bit grayscale is scaled to 8 bits and transparency goes on
                white (see `qzoom_adapters.images`).
            questions: one string per sample.
            max_new_tokens: a positive integer.

        Thread safety: calls on the same model are serialized by a per-model lock (hooks and decode buffers
        live on the model), so one `QZoom` may be shared between threads; the calls then run one after the
        other, not in parallel.
        """
        _check_max_new_tokens(max_new_tokens)
        if self.processor is None:
            raise QZoomError("generate() needs a processor; use generate_from_inputs() with processed inputs")
        images = source_images(images)
        if isinstance(questions, str):
            raise QZoomError("questions must be a list with one string per sample, e.g. [question]")
        questions = list(questions)
        if len(images) != len(questions):
            raise QZoomError(f"got {len(images)} images for {len(questions)} questions")
        if not images:
            raise QZoomError("empty batch: pass at least one image and one question")
        if not all(isinstance(q, str) for q in questions):
            raise QZoomError("every question must be a string")
        with self._lock:
            inputs = self.spec.chat_inputs(self.processor, images, questions)
            return self.generate_from_inputs(inputs, images, max_new_tokens=max_new_tokens, return_trace=return_trace)

    def generate_from_inputs(self, inputs, images: list, max_new_tokens: int = 32, return_trace: bool = False,
                             force_zoom: list[bool] | None = None):
        """Gated greedy answers for processed, left-padded `inputs`; `images` are the source images
        (PIL images or paths, as for `generate`), the full-resolution originals `inputs` were made from.

        `force_zoom`: per-sample decisions that replace the gate's (the gate still runs and reports its
        probability); for benchmarks and ablations. Serialized per model like `generate`.
        """
        _check_max_new_tokens(max_new_tokens)
        if not hasattr(inputs, "get") or inputs.get("input_ids") is None:
            raise QZoomError("inputs need `input_ids` (the processor's output for the batch)")
        if inputs["input_ids"].shape[0] == 0:
            raise QZoomError("empty batch: inputs hold no samples")
        images = source_images(images)
        with self._lock:
            return self._generate(inputs, images, max_new_tokens, return_trace, force_zoom)

    @torch.no_grad()
    def _generate(self, inputs, images: list, max_new_tokens: int, return_trace: bool, force_zoom):
        cfg = self.config
        a = self._pass_a(inputs, images)
        B = a.ids.shape[0]
        gate_prob = self._gate(a)
        want_zoom = self._zoom_decisions(gate_prob, B, force_zoom)
        heatmaps, blurred, crops = self._twig_crops(a, images, want_zoom)

        groups, roi_seqs = {}, {}
        if crops:
            groups["roi"], roi_seqs = self._roi_pass(a, crops)
        direct_rows = [i for i in range(B) if i not in crops or cfg.emit_direct]
        if direct_rows:
            groups["direct"] = self._direct_pass(a, direct_rows)
        answers = self._decode(groups, max_new_tokens)
        roi = {i: ans + (roi_seqs[i],) for i, ans in answers.get("roi", {}).items()}
        direct = answers.get("direct", {})
        return [self._output(i, a, gate_prob, heatmaps, blurred, crops, roi, direct, return_trace) for i in range(B)]

    # --- pass A: vision + layers 0..K-1 --------------------------------------------------
    def _pass_a(self, inputs, images) -> Prefill:
        if len(images) != inputs["input_ids"].shape[0]:
            raise QZoomError(f"got {len(images)} source images for a batch of {inputs['input_ids'].shape[0]}")
        for image in images:
            check_source_image(image, self.config.min_crop_px)
        self._check_grids(inputs, images)
        return self.trunk.prefill(inputs, self.K, _compat.new_cache())

    def _check_grids(self, inputs, images) -> None:
        """Each image grid must have its source image's aspect ratio (within rounding) where the spec says so."""
        if not getattr(self.spec, "grid_keeps_aspect", False):
            return
        self.spec.validate_inputs(inputs)
        for i, (row, image) in enumerate(zip(self.spec.image_grids(inputs), images)):
            check_grid_aspect(self.spec.token_grid(row), self.spec.source_window(self.image_processor, image.size), i)

    # --- gate ----------------------------------------------------------------------------
    def _gate(self, a: Prefill) -> torch.Tensor | None:
        if self.gate is None:
            return None
        with stage("gate"):
            return torch.sigmoid(self.gate.logits(self.spec, a.hK, a.kwargs, self.trunk))

    def _zoom_decisions(self, gate_prob, B: int, force_zoom=None) -> list[bool]:
        if force_zoom is not None:
            if len(force_zoom) != B:
                raise QZoomError(f"force_zoom has {len(force_zoom)} decisions for a batch of {B}")
            if any(force_zoom) and self.twig is None:
                raise QZoomError("force_zoom asks to zoom, but this QZoom has no twig to find the region")
            return [bool(z) for z in force_zoom]
        if self.twig is None:
            return [False] * B
        if gate_prob is None:
            return [True] * B
        return (gate_prob >= self.config.gate_threshold).tolist()

    # --- twig -> box -> crop ---------------------------------------------------------------
    def _twig_crops(self, a: Prefill, images, want_zoom):
        heatmaps, blurred, crops = {}, {}, {}
        if not any(want_zoom):
            return heatmaps, blurred, crops
        with stage("twig"):
            cfg, spec = self.config, self.spec
            rows = [i for i, z in enumerate(want_zoom) if z]
            sel = torch.tensor(rows, device=a.ids.device)
            first = a.mask[sel].argmax(dim=1)  # first real token (left padding)
            scores, first_scores = self.twig.query_scores(spec, a.hK[sel], a.rows_kwargs(self.trunk, sel), self.trunk,
                                                          first)
            maps = [m.cpu() for m in a.image_logits(scores, spec.image_token_id, spec, rows)]
            first_maps = [m.cpu() for m in a.image_logits(first_scores, spec.image_token_id, spec, rows)]
            for j, i in enumerate(rows):
                blur, crop = crop_from_heatmap(spec, maps[j], first_maps[j], images[i], self.image_processor, cfg)
                heatmaps[i], blurred[i] = maps[j], blur
                if crop is not None:  # an empty mask answers directly
                    crops[i] = crop
        return heatmaps, blurred, crops

    # --- direct path: layers K..L-1 on the same sequence ------------------------------------
    def _direct_pass(self, a: Prefill, rows: list[int]) -> tuple[list[int], DecodeRows, dict]:
        with stage("direct_pass"):
            if len(rows) == a.ids.shape[0]:  # the whole batch: continue on pass A's own cache
                return rows, self._finish(a.hK, a.kwargs, a.cache, a.mask, a.pos), a.kwargs
            sel = torch.tensor(rows, device=a.ids.device)
            kwargs = a.rows_kwargs(self.trunk, sel)
            return rows, self._finish(a.hK[sel], kwargs, a.rows_cache(sel, self.K), a.mask[sel], a.pos[:, sel]), kwargs

    def _finish(self, hK, kwargs, cache, mask, pos) -> DecodeRows:
        """Layers K..L-1 over the whole sequence (filling `cache`); the rows' first logits and cache."""
        h = self.trunk.run_layers(self.spec.layers[self.K :], hK, kwargs, cache)
        first = self.trunk.logits(h[:, -1])
        return DecodeRows.from_cache(first, mask, pos[:, :, -1], cache, len(self.spec.layers))

    # --- decode: every row of the batch in one loop --------------------------------------------
    def _decode(self, groups: dict, max_new_tokens: int) -> dict:
        """Greedy tokens for every group's rows in one loop: {group: {row: (tokens, first logits)}}."""
        template = next(iter(groups.values()))[2]  # layer kwargs of a prefill: their form for this version
        tokens = iter(self.decoder.greedy([rows for _, rows, _ in groups.values()], max_new_tokens,
                                          eos_ids(self.model), template, self.config.decode))
        return {name: {i: (next(tokens), rows.first[n]) for n, i in enumerate(idx)}
                for name, (idx, rows, _) in groups.items()}

    # --- RoI path ------------------------------------------------------------------------------
    def _roi_pass(self, a: Prefill, crops: dict) -> tuple[tuple[list[int], DecodeRows, dict], dict]:
        """Pass B for the zoomed samples, batched with the prefixes kept at their pass-A columns.

        Layout per sample: [left pad | prefix (cached) | middle pad | suffix]; every prefix ends
        by column C and every suffix ends at the last column, so the suffix block is shared.
        """
        spec = self.spec
        rows = sorted(crops)
        if self.image_processor is None:
            raise QZoomError("zooming re-encodes the crop: pass `image_processor=` (or a processor) to QZoom")
        with stage("crop_encode"):
            enc = self._process_crops([crops[i].image for i in rows], a.ids.device)
            roi_feats = spec.encode_images(enc["pixel_values"], enc["image_grid_thw"])
        with stage("roi_pass"):
            return self._roi_layers(a, rows, crops, enc, roi_feats)

    def _process_crops(self, images: list, device) -> dict:
        """The processor on each crop in its own thread (PIL resizing releases the GIL), joined in order."""
        cfg = self.config

        def one(image):
            return self.spec.process_crops(self.image_processor, [image], cfg.crop_min_pixels, cfg.crop_max_pixels)

        if len(images) == 1:
            parts = [one(images[0])]
        else:
            with ThreadPoolExecutor(max_workers=min(len(images), CROP_WORKERS)) as pool:
                parts = list(pool.map(one, images))
        return {k: torch.cat([part[k] for part in parts]).to(device, non_blocking=True) for k in parts[0]}

    def _roi_layers(self, a: Prefill, rows: list[int], crops: dict, enc: dict, roi_feats):
        spec, mode = self.spec, self.position_mode
        seqs = []
        for j, i in enumerate(rows):
            valid = a.mask[i].bool()
            grid = enc["image_grid_thw"][j]
            ids, pos, at = roi_sequence(spec, a.ids[i][valid], a.pos[:, i][:, valid], spec.token_grid(grid),
                                        crops[i].box_tok, mode)
            seqs.append(_RoiSeq(pad=int((~valid).sum()), P=at, grid=grid, ids=ids, pos=pos))
        C = max(q.pad + q.P for q in seqs)  # every cached prefix ends by column C
        L = max(q.ids.shape[0] - q.P for q in seqs)  # longest suffix [P:]
        n, dev = len(rows), a.ids.device
        ids = torch.zeros(n, C + L, dtype=a.ids.dtype, device=dev)
        mask = torch.zeros(n, C + L, dtype=a.mask.dtype, device=dev)
        pos = torch.zeros(a.pos.shape[0], n, C + L, dtype=torch.float32, device=dev)
        sel = torch.tensor(rows, device=dev)
        ids[:, :C] = a.ids[sel, :C]
        pos[:, :, :C] = a.pos[:, sel, :C].float()
        for j, q in enumerate(seqs):
            start = C + L - (q.ids.shape[0] - q.P)
            mask[j, q.pad : q.pad + q.P] = 1
            mask[j, start:] = 1
            ids[j, start:] = q.ids[q.P :]
            pos[:, j, start:] = q.pos[:, q.P :].to(dev)
        if mode == "sequential":
            pos = pos.round().long()  # integral in this mode; keep the backbone's own dtype
        suffix_embeds = self.trunk.embed(ids[:, C:], roi_feats.embeds)
        extra = spec.decoder_inputs(ids[:, C:] == spec.image_token_id, roi_feats)
        cache = a.rows_cache(sel, self.K, upto=C)
        hK_suffix, _ = self.trunk.forward_to(self.K, suffix_embeds, mask, pos[:, :, C:], cache, extra)
        hK = torch.cat([a.hK[sel, :C], hK_suffix], dim=1)
        embeds = torch.cat([a.embeds[sel, :C], suffix_embeds], dim=1)
        kwargs = self.trunk.layer_kwargs(embeds, mask, pos)
        return (rows, self._finish(hK, kwargs, cache, mask, pos), kwargs), dict(zip(rows, seqs))

    # --- per-sample output ---------------------------------------------------------------------
    def _output(self, i, a: Prefill, gate_prob, heatmaps, blurred, crops, roi, direct, return_trace) -> ZoomOutput:
        zoomed = i in roi
        d_tokens, d_first = direct.get(i, (None, None))
        r_tokens, r_first = roi[i][:2] if zoomed else (None, None)
        tokens, first = (r_tokens, r_first) if zoomed else (d_tokens, d_first)
        n_global = int((a.ids[i] == self.spec.image_token_id).sum())
        n_roi = int((roi[i][2].ids == self.spec.image_token_id).sum()) - n_global if zoomed else 0  # ids hold both
        out = ZoomOutput(
            tokens=tokens,
            text=self._detokenize(tokens),
            zoomed=zoomed,
            gate_prob=None if gate_prob is None else float(gate_prob[i]),
            heatmap=heatmaps.get(i),
            bbox=crops[i].box_px if zoomed else None,
            visual_tokens=n_global + n_roi,
            direct_tokens=d_tokens,
            roi_tokens=r_tokens,
            direct_text=self._detokenize(d_tokens),
        )
        if return_trace:
            out.trace = {
                "heatmap_logits": heatmaps.get(i),
                "blurred_map": blurred.get(i),
                "gate_prob": out.gate_prob,
                "bbox_tokens": crops[i].box_tok if i in crops else None,
                "bbox_pixels": crops[i].box_px if i in crops else None,
                "roi_image_grid_thw": roi[i][2].grid.cpu() if zoomed else None,
                "roi_input_ids": roi[i][2].ids.cpu() if zoomed else None,
                "roi_position_ids": roi[i][2].pos.float().cpu() if zoomed else None,
                "first_logits": None if first is None else first.cpu(),
                "direct_first_logits": None if d_first is None else d_first.cpu(),
            }
        return out

    def _detokenize(self, tokens):
        tok = self.tokenizer
        if tokens is None or tok is None:
            return None
        return tok.decode(tokens, skip_special_tokens=True)

    # --- save / load ---------------------------------------------------------------------------
    def save_pretrained(self, path):
        """Write `adapter_config.json` + `adapter_model.safetensors` (adapters only)."""
        from .io import save_adapters

        return save_adapters(path, self.model, self.twig, self.gate, self.config)

    @classmethod
    def from_pretrained(cls, path, model, processor=None, *, image_processor=None, config=None, **overrides):
        """Adapters from `path` attached to `model`; `config` or keyword overrides replace saved settings."""
        from .io import load_adapters

        twig, gate, saved = load_adapters(path, model)
        return cls(model, processor, twig=twig, gate=gate, image_processor=image_processor,
                   config=_merge_config(saved.model_dump(), config, overrides))

    @classmethod
    def from_reference_checkpoint(cls, path, processor=None, *, image_processor=None, config=None,
                                  torch_dtype=torch.float32, device=None, **overrides):
        """A released Q-Zoom checkpoint folder: base model with its own class + twig/gate from its extra keys."""
        from .io import load_reference_checkpoint

        model, twig, gate, fields = load_reference_checkpoint(path, torch_dtype=torch_dtype, device=device)
        return cls(model, processor, twig=twig, gate=gate, image_processor=image_processor,
                   config=_merge_config({**ZoomConfig().model_dump(), **fields}, config, overrides))


def _merge_config(base: dict, config: ZoomConfig | dict | None, overrides: dict) -> ZoomConfig:
    if config is not None:
        base = as_zoom_config(config).model_dump()
    unknown = set(overrides) - set(ZoomConfig.model_fields)
    if unknown:
        raise QZoomError(f"unknown ZoomConfig fields {sorted(unknown)}; valid: {sorted(ZoomConfig.model_fields)}")
    return as_zoom_config({**base, **overrides})
