"""Stage 2 (SPEC §4.3): mine the regressions zooming causes, then post-SFT on global + RoI sequences."""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from qzoom_adapters.config import ZoomConfig
from qzoom_adapters.errors import QZoomError
from qzoom_adapters.io import load_adapters
from qzoom_adapters.pipeline import QZoom, crop_from_heatmap
from qzoom_adapters.positions import roi_sequence
from qzoom_adapters.roi import Crop, box_to_pixels
from qzoom_adapters.spec import VisualFeatures
from qzoom_adapters.trunk import Trunk

from .config import RecipeConfig
from .data import JsonlAppender, SampleRecord, by_budget, chunks, load_image, read_jsonl, read_records, read_rows, write_jsonl
from .gate_labels import item_rng
from .judge import JudgeItem, make_judge
from .models import batch_to, freeze, load_backbone
from .progress import progress
from .stage1 import save_zoom
from .trainer import Trainer


# --- mining ----------------------------------------------------------------------------------
def mine(cfg: RecipeConfig, show_progress: bool = True) -> dict:
    """`qzoom mine`: A = direct answer, B = always-zoomed answer of the stage-1 model; keep A right, B wrong.

    Writes `mined.jsonl` (every judged sample, appended, resumable) and `regressions.jsonl` (the
    stage-2 training set: records with `target` = A's response, or the ground truth if configured;
    with `keep: zoomed`, every sample that got a crop instead of only the regressions).
    """
    sec = cfg.section("mine")
    model, processor, spec = load_backbone(cfg.model)
    twig, _, _ = load_adapters(sec.adapters, model)
    if twig is None:
        raise QZoomError(f"{sec.adapters} has no twig; mining needs the stage-1 adapters")
    # stage 1 leaves the LLM unchanged, so one pass gives both: the direct answer (A) and the RoI answer (B)
    zoom = QZoom(model, processor, twig=twig.to(model.device),
                 config=ZoomConfig(gate_threshold=0.0, roi_threshold=sec.roi_threshold, roi_region=sec.roi_region,
                                   roi_refine=sec.roi_refine,
                                   emit_direct=True))
    judge_kw = {"metric": sec.metric} if sec.judge == "rule" else {"path": sec.judge_model}
    if sec.judge == "hf" and not sec.judge_model:
        raise QZoomError("mine.judge is 'hf' but mine.judge_model is not set")
    judge = make_judge(sec.judge, **judge_kw)
    records = read_records(sec.records)
    missing = [r.id for r in records if not r.answers]
    if missing:
        raise QZoomError(f"mining needs ground-truth answers; records without any: {missing[:5]}")
    out = JsonlAppender(f"{sec.out}/mined.jsonl")
    todo = [r for r in records if r.id not in out.done]
    bar = progress(total=len(todo), desc="mining", disable=not show_progress)
    t0 = time.perf_counter()
    for batch in chunks(todo, sec.batch_size):
        outs = zoom.generate([load_image(r) for r in batch], [r.question for r in batch], sec.max_new_tokens)
        answers = [(o.direct_text, o.text if o.zoomed else o.direct_text) for o in outs]
        verdicts = judge.judge([JudgeItem(r.question, r.answers, {"A": a, "B": b}) for r, (a, b) in zip(batch, answers)])
        rows = []
        for r, o, (a, b), v in zip(batch, outs, answers, verdicts):
            rows.append({**r.model_dump(), "response_a": a, "response_b": b, "zoomed": o.zoomed,
                         "bbox": list(o.bbox) if o.bbox else None, "judge_a": v.correct["A"],
                         "judge_b": v.correct["B"], "judge_raw": v.raw,
                         "regression": bool(v.correct["A"] and not v.correct["B"])})
        out.append(rows)
        bar.update(len(batch))
    bar.close()
    mined = read_jsonl(out.path)
    regressions = [{k: v for k, v in row.items() if k in SampleRecord.model_fields} |
                   {"target": row["response_a"] if sec.target == "response" else row["answers"][0]}
                   for row in mined if (row["regression"] if sec.keep == "regressions" else row["zoomed"])]
    write_jsonl(f"{sec.out}/regressions.jsonl", regressions)
    secs = time.perf_counter() - t0
    return {"judged": len(mined), "regressions": len(regressions), "new": len(todo),
            "samples_per_s": len(todo) / secs if todo else 0.0}


# --- post-SFT --------------------------------------------------------------------------------
class Stage2Dataset(torch.utils.data.Dataset):
    """Regression records; per (epoch, index) a fixed draw decides box noise, with `budgets` the sample's
    visual-token budget, and with `plain_replay` whether it is trained as a plain sequence (resumable)."""

    def __init__(self, rows: list[dict], box_noise: float, sides: tuple[float, float], seed: int,
                 budgets: list[int] | None = None, plain_replay: float = 0.0):
        self.rows, self.box_noise, self.sides, self.seed = rows, box_noise, sides, seed
        self.budgets, self.plain_replay = budgets, plain_replay

    def __len__(self):
        return len(self.rows)

    def get(self, i: int, epoch: int) -> dict:
        row = self.rows[i]
        rng = item_rng(self.seed, epoch, i)
        noise = None
        if rng.random() < self.box_noise:  # a random box: each side U[sides] of the image, random place
            fw, fh = rng.uniform(*self.sides), rng.uniform(*self.sides)
            noise = (rng.uniform(0, 1 - fw), rng.uniform(0, 1 - fh), fw, fh)
        budget = rng.choice(self.budgets) if self.budgets else None  # drawn after the noise: same noise as without
        plain = self.plain_replay > 0 and rng.random() < self.plain_replay  # drawn last, only when asked for
        return {"image": load_image(SampleRecord(**row)), "question": row["question"], "target": row["target"],
                "noise": None if plain else noise, "budget": budget, "plain": plain}


def random_crop(image, noise, grid_hw, min_side: int) -> Crop:
    """The noise box (x, y, w, h as fractions of the image) as a `Crop`, with its box in global-token units."""
    W, H = image.size
    x, y, fw, fh = noise
    # the 28-px rule of a predicted box (SPEC §2.7): grow a short side, shift it back inside, never shrink
    px = box_to_pixels((x * W, y * H, (x + fw) * W, (y + fh) * H), (H, W), (W, H), min_side)
    h_t, w_t = grid_hw
    x1, y1 = math.floor(px[0] * w_t / W), math.floor(px[1] * h_t / H)  # token cells covering the pixel box
    x2, y2 = max(x1 + 1, math.ceil(px[2] * w_t / W)), max(y1 + 1, math.ceil(px[3] * h_t / H))
    return Crop((x1, y1, x2, y2), tuple(px), image.crop(px))


class Stage2Collate:
    """A micro-batch: one dict when its items share a budget (or have none), else one dict per budget, in
    increasing order (a processor call encodes at one pixel budget). A dict's `pixels` is its budget's pixels for
    the global view and the crop (None: the processor's and the adapters' own)."""

    def __init__(self, spec, processor, eos_id: int):
        self.spec, self.processor, self.eos_id = spec, processor, eos_id

    def __call__(self, items):
        groups = [self._group(its, b) for b, its in by_budget(items, "budget")]
        return groups[0] if len(groups) == 1 else groups

    def _group(self, items, budget):
        pixels = None if budget is None else self.spec.budget_pixels(budget)
        inputs = self.spec.chat_inputs(self.processor, [it["image"] for it in items], [it["question"] for it in items],
                                       pixels=pixels)
        tok = self.processor.tokenizer
        targets = [tok(it["target"], add_special_tokens=False)["input_ids"] + [self.eos_id] for it in items]
        return {"inputs": inputs, "images": [it["image"] for it in items], "targets": targets,
                "noise": [it["noise"] for it in items], "plain": [bool(it.get("plain")) for it in items],
                "pixels": pixels}


def _groups(batch) -> list[dict]:
    return batch if isinstance(batch, list) else [batch]


def _split(x: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    return list(torch.split(x, counts))


def interleave(global_feats: VisualFeatures, g_counts, roi_feats: VisualFeatures, r_counts) -> VisualFeatures:
    """Features in sequence order [global_0, roi_0, global_1, roi_1, ...] (embeddings and deepstack); a sample
    whose RoI count is 0 (a plain sequence) has its global features only."""
    def mix(g, r):
        parts = [t for pair in zip(_split(g, g_counts), _split(r, r_counts)) for t in pair if t.shape[0]]
        return torch.cat(parts)

    deep = tuple(mix(g, r) for g, r in zip(global_feats.deepstack, roi_feats.deepstack))
    return VisualFeatures(mix(global_feats.embeds, roi_feats.embeds), deep)


class PostSFTObjective(nn.Module):
    """Answer-token loss on [global | RoI | question | answer] with the RoI from the frozen twig (SPEC §4.3)."""

    def __init__(self, model, spec, twig, image_processor, zoom_cfg: ZoomConfig):
        super().__init__()
        self.model = model  # the trainable LLM (or its peft wrapper) lives here: DDP/FSDP wrap this module
        self._twig = (twig,)  # frozen, not a submodule
        self.image_processor, self.zoom_cfg = image_processor, zoom_cfg
        self.spec = spec  # built on the unwrapped model, whose modules peft changed in place
        self.trunk = Trunk(spec)

    @staticmethod
    def loss_terms(batch) -> int:
        """Answer tokens (a sample that gets no crop drops out of its micro-batch's mean)."""
        return sum(len(t) for g in _groups(batch) for t in g["targets"])

    def _crops(self, inputs, batch):
        """The twig's live prediction at the last prompt token **[fix]**, or the noise box."""
        spec, twig = self.spec, self._twig[0]
        with torch.no_grad():
            a = self.trunk.prefill(inputs, twig.K)
            scores, first = twig.query_scores(spec, a.hK, a.kwargs, self.trunk, a.mask.argmax(dim=1))
        maps = a.image_logits(scores, spec)
        first_maps = a.image_logits(first, spec)
        crops = []
        for j, image in enumerate(batch["images"]):
            if batch.get("plain", [False] * len(batch["images"]))[j]:
                crops.append(None)  # a plain sequence: no RoI
            elif batch["noise"][j] is not None:
                crops.append(random_crop(image, batch["noise"][j], tuple(maps[j].shape), self.zoom_cfg.min_crop_px))
            else:
                crops.append(crop_from_heatmap(spec, maps[j], first_maps[j], image, self.image_processor,
                                               self.zoom_cfg)[1])
        return a, crops

    def forward(self, batch):
        """The mean answer-token loss of the micro-batch; over its budget groups, weighted by their answer tokens."""
        groups = _groups(batch)
        if len(groups) == 1:
            return self._group_loss(groups[0])
        terms = [sum(map(len, g["targets"])) for g in groups]
        return sum(self._group_loss(g) * n for g, n in zip(groups, terms)) / sum(terms)

    def _group_loss(self, batch):
        spec = self.spec
        dev = self.spec.embed_tokens.weight.device
        inputs = batch_to(batch["inputs"], dev)
        a, crops = self._crops(inputs, batch)
        plain = batch.get("plain", [False] * len(crops))
        roi = [j for j, c in enumerate(crops) if c is not None]
        keep = [j for j in range(len(crops)) if crops[j] is not None or plain[j]]  # others (no crop) give no loss
        if not keep:
            return spec.lm_head.weight.sum() * 0.0
        g_counts = [int((a.ids[j] == spec.image_token_id).sum()) for j in range(a.ids.shape[0])]
        r_counts = {j: 0 for j in keep}
        if roi:
            px = batch.get("pixels")
            lo, hi = (px, px) if px is not None else (self.zoom_cfg.crop_min_pixels, self.zoom_cfg.crop_max_pixels)
            enc = batch_to(spec.process_crops(self.image_processor, [crops[j].image for j in roi], lo, hi), dev)
            with torch.no_grad():
                roi_feats = spec.encode_images(enc["pixel_values"], enc["image_grid_thw"])
            grids = dict(zip(roi, map(spec.token_grid, enc["image_grid_thw"])))
            r_counts.update({j: h * w for j, (h, w) in grids.items()})
        else:
            roi_feats = VisualFeatures(a.feats.embeds[:0], tuple(d[:0] for d in a.feats.deepstack))
        seqs = []
        for j in keep:
            valid = a.mask[j].bool()
            ids, pos = a.ids[j][valid], a.pos[:, j][:, valid]  # a plain sequence: the prompt as the model has it
            if crops[j] is not None:
                ids, pos, _ = roi_sequence(spec, ids, pos, grids[j], crops[j].box_tok, self.zoom_cfg.position_mode)
            target = torch.tensor(batch["targets"][j], dtype=ids.dtype, device=ids.device)
            tpos = pos[:, -1:] + torch.arange(1, len(target) + 1, dtype=pos.dtype)[None]
            seqs.append((torch.cat([ids, target]), torch.cat([pos, tpos], dim=1), len(target)))
        ids, mask, pos, labels = _left_pad(seqs, dev)
        if self.zoom_cfg.position_mode == "sequential":
            pos = pos.round().long()
        def kept(x):  # the rows of the samples in the loss (a crop, or a plain sequence)
            parts = _split(x, g_counts)
            return torch.cat([parts[j] for j in keep])

        g_feats = VisualFeatures(kept(a.feats.embeds), tuple(kept(d) for d in a.feats.deepstack))
        feats = interleave(g_feats, [g_counts[j] for j in keep], roi_feats, [r_counts[j] for j in keep])
        embeds = self.trunk.embed(ids, feats.embeds)
        out = spec.text_model(inputs_embeds=embeds, attention_mask=mask, position_ids=self.trunk.model_positions(pos),
                              use_cache=False, **spec.decoder_inputs(ids == spec.image_token_id, feats))
        hidden = out.last_hidden_state[:, :-1]
        target = labels[:, 1:]
        sel = target != -100
        logits = spec.lm_head(hidden[sel]).float()  # only the answer rows: no (B, S, V) logits
        return F.cross_entropy(logits, target[sel])


def _left_pad(seqs, dev):
    L = max(ids.shape[0] for ids, _, _ in seqs)
    B, axes = len(seqs), seqs[0][1].shape[0]
    ids = torch.zeros(B, L, dtype=torch.long, device=dev)
    mask = torch.zeros(B, L, dtype=torch.long, device=dev)
    pos = torch.ones(axes, B, L, dtype=torch.float32, device=dev)
    labels = torch.full((B, L), -100, dtype=torch.long, device=dev)
    for b, (s_ids, s_pos, n_target) in enumerate(seqs):
        n = s_ids.shape[0]
        ids[b, L - n :] = s_ids
        mask[b, L - n :] = 1
        pos[:, b, L - n :] = s_pos.to(dev)
        labels[b, L - n_target :] = s_ids[-n_target:]
    return ids, mask, pos, labels


def _tied_head(spec) -> bool:
    return spec.lm_head.weight.data_ptr() == spec.embed_tokens.weight.data_ptr()


def _trainable_llm(model, spec, frozen_layers: int = 0) -> None:
    """Decoder layers from `frozen_layers` on + LM head train (with tied embeddings the head is the embedding
    matrix, so it stays frozen when earlier layers do: it feeds them); the rest is frozen."""
    if frozen_layers >= len(spec.layers):
        raise QZoomError(f"stage2.frozen_layers={frozen_layers} freezes all {len(spec.layers)} decoder layers; "
                         f"nothing would train")
    freeze(model)
    modules = list(spec.layers)[frozen_layers:]
    if not (frozen_layers and _tied_head(spec)):
        modules.append(spec.lm_head)
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(True)


def _apply_lora(model, spec, lora):
    from peft import LoraConfig, get_peft_model

    layer_params = {id(m) for layer in spec.layers for m in layer.modules()}
    targets = [name for name, m in model.named_modules()
               if id(m) in layer_params and name.split(".")[-1] in lora.target_modules]
    if not targets:
        raise QZoomError(f"no decoder-layer module is named like {lora.target_modules}")
    freeze(model)
    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=targets))


def train_stage2(cfg: RecipeConfig, stop_after: int | None = None) -> dict:
    """`qzoom train stage2`: full-LLM (or LoRA) post-SFT; vision, merger, twig and gate stay frozen."""
    sec = cfg.section("stage2")
    model, processor, spec = load_backbone(cfg.model.model_copy(update={"dtype": sec.dtype}),
                                           eval_mode=False)
    model.eval()  # no dropout: the reference's decoder has none, and eval keeps runs reproducible
    twig, _, zoom_cfg = load_adapters(sec.adapters, model)
    if twig is None:
        raise QZoomError(f"{sec.adapters} has no twig; stage 2 needs the stage-1 adapters")
    freeze(twig)
    zoom_cfg = zoom_cfg.model_copy(update={"roi_threshold": sec.roi_threshold, "roi_region": sec.roi_region,
                                           "roi_refine": sec.roi_refine, "position_mode": sec.position_mode or spec.default_position_mode})
    torch.manual_seed(sec.train.seed)  # LoRA's random init follows the run's seed (reproducible runs)
    trained = _apply_lora(model, spec, sec.lora) if sec.lora else model
    if not sec.lora:
        _trainable_llm(model, spec, sec.frozen_layers)
    elif sec.frozen_layers:
        raise QZoomError("stage2.frozen_layers applies to full-LLM post-SFT; with stage2.lora set, leave it at 0")
    rows = read_rows(sec.data)
    if not rows:
        raise QZoomError(f"{sec.data} holds no training rows (did mining find no regressions?)")
    dataset = Stage2Dataset(rows, sec.box_noise, tuple(sec.box_noise_sides), sec.train.seed, sec.budgets,
                            sec.plain_replay)
    objective = PostSFTObjective(trained, spec, twig.to(model.device), processor.image_processor, zoom_cfg)
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos

    def save(module, out):
        """`out/model/`: the full model + processor (HF format); `out/`: the twig adapters beside it.

        Two folders because transformers reads an `adapter_config.json` next to a model as a peft adapter.
        """
        final = module.model
        if sec.lora:
            final.save_pretrained(str(out / "lora"))
            final = final.merge_and_unload()
        final.save_pretrained(str(out / "model"))
        processor.save_pretrained(str(out / "model"))
        save_zoom(final, processor, out, twig=twig, **zoom_cfg.model_dump())

    return Trainer(objective, dataset, Stage2Collate(spec, processor, eos), sec.train, sec.out, save,
                   stop_after=stop_after, settings=cfg.run_settings("stage2")).train()
