"""Stage 1 (SPEC §4.1-§4.2): pseudo-labels from the backbone's own attention, then the twig on them."""
from __future__ import annotations

import time

import torch
from torch import nn

from qzoom_adapters.config import ZoomConfig
from qzoom_adapters.decode import eos_ids
from qzoom_adapters.errors import QZoomError
from qzoom_adapters.io import load_adapters
from qzoom_adapters.labels import padding_cells, tristate_labels
from qzoom_adapters.losses import selective_bce
from qzoom_adapters.pipeline import QZoom
from qzoom_adapters.probe import average_map, probe_attention
from qzoom_adapters.spec import get_spec
from qzoom_adapters.trunk import Trunk
from qzoom_adapters.twig import TwigRPN

from .config import LabelsStage1Section, RecipeConfig
from .data import chunks, fixed_grid_view, load_image, read_records
from .label_store import LabelStore, LabelWriter
from .models import batch_to, freeze, load_backbone, placeholder_ids
from .progress import progress
from .trainer import Trainer


# --- pseudo-labels ------------------------------------------------------------------------
def stage1_prompt(record, sec: LabelsStage1Section) -> str:
    """Textual: the question as is. Natural: the answer-format suffix replaced by a grounding request."""
    q = record.question.strip()
    if record.mode == "textual":
        return q
    if q.endswith(sec.answer_suffix):
        q = q[: -len(sec.answer_suffix)].rstrip()
    return f"{q}\n{sec.grounding_prompt}"


def response_rows(prompt_len: int, sequences: torch.Tensor, eos: set[int], pad_id: int):
    """Responses cut after their first EOS, and the decode-step query rows of the full sequence.

    A decode step's query is a generated token fed back in: responses[:, :-1] (the prefill row,
    which produced the first token, is not one).
    Returns (response ids (B, N) padded with `pad_id`, response mask (B, N), rows (B, R), row mask (B, R)).
    """
    gen = sequences[:, prompt_len:]
    B, N = gen.shape
    lengths = []
    for row in gen.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        lengths.append(cut)
    lengths = torch.tensor(lengths)
    keep = torch.arange(N)[None] < lengths[:, None]
    resp = gen.masked_fill(~keep.to(gen.device), pad_id)
    R = max(1, int(lengths.max()) - 1)
    rows = prompt_len + torch.arange(R)[None].expand(B, R)
    row_mask = torch.arange(R)[None] < (lengths - 1)[:, None]
    return resp, keep.long(), rows, row_mask


def _pairs_for(sec: LabelsStage1Section, mode: str):
    return (sec.textual_pairs, sec.textual_sink_pairs) if mode == "textual" else (sec.natural_pairs,
                                                                                  sec.natural_sink_pairs)


def _label_settings(cfg: RecipeConfig, spec) -> dict:
    sec = cfg.labels_stage1
    return {"model": cfg.model.path, "family": spec.family, "grid": sec.grid, "max_new_tokens": sec.max_new_tokens,
            "textual_pairs": sec.textual_pairs, "natural_pairs": sec.natural_pairs,
            "textual_sink_pairs": sec.textual_sink_pairs, "natural_sink_pairs": sec.natural_sink_pairs,
            "answer_suffix": sec.answer_suffix, "grounding_prompt": sec.grounding_prompt}


@torch.no_grad()
def make_stage1_labels(cfg: RecipeConfig, show_progress: bool = True) -> dict:
    """`qzoom labels stage1`: greedy teacher responses + probed attention maps, sharded and resumable."""
    sec = cfg.section("labels_stage1")
    model, processor, spec = load_backbone(cfg.model)
    trunk = Trunk(spec)
    layers = sorted({l for p in (sec.textual_pairs, sec.natural_pairs, sec.textual_sink_pairs,
                                 sec.natural_sink_pairs) for l in p})
    records = read_records(sec.records)
    writer = LabelWriter(sec.out, _label_settings(cfg, spec), sec.shard_size)
    todo = [r for r in records if r.id not in writer.done]
    eos = eos_ids(model)
    if not eos:
        raise QZoomError("the model's generation_config has no eos_token_id; set one so responses can end")
    pad_id = processor.tokenizer.pad_token_id or 0
    placeholders = placeholder_ids(spec)
    t0, n = time.perf_counter(), 0
    bar = progress(total=len(todo), desc="stage-1 labels", disable=not show_progress)
    for batch in chunks(todo, sec.batch_size):
        images = [load_image(r) for r in batch]
        views = [fixed_grid_view(spec, im, sec.grid) for im in images]
        inputs = spec.chat_inputs(processor, [v[0] for v in views], [stage1_prompt(r, sec) for r in batch],
                                  pixels=views[0][1])
        inputs = batch_to(inputs, model.device)
        grids = spec.image_grids(inputs)
        if any(spec.token_grid(g) != (sec.grid, sec.grid) for g in grids):
            raise QZoomError(f"the fixed view gave grids {[spec.token_grid(g) for g in grids]}, not "
                             f"{sec.grid}x{sec.grid}; check the processor's patch/merge sizes")
        S = inputs["input_ids"].shape[1]
        seq = model.generate(**inputs, do_sample=False, max_new_tokens=sec.max_new_tokens,
                             eos_token_id=sorted(eos), pad_token_id=pad_id, suppress_tokens=placeholders)
        resp, resp_mask, rows, row_mask = response_rows(S, seq.cpu(), eos, pad_id)
        dev = model.device
        ids = torch.cat([inputs["input_ids"], resp.to(dev)], dim=1)
        mask = torch.cat([inputs["attention_mask"], resp_mask.to(dev)], dim=1)
        attn = probe_attention(trunk, ids, mask, inputs["pixel_values"], grids, rows.to(dev), layers)
        image_mask = ids == spec.image_token_id
        for b, rec in enumerate(batch):
            pairs, sink_pairs = _pairs_for(sec, rec.mode)
            one = {l: a[b : b + 1] for l, a in attn.items()}
            A = average_map(one, pairs, row_mask[b : b + 1].to(dev), image_mask[b : b + 1])[0]
            Sk = (average_map(one, sink_pairs, row_mask[b : b + 1].to(dev), image_mask[b : b + 1])[0]
                  if sink_pairs else torch.zeros_like(A))
            text = processor.tokenizer.decode(resp[b][resp_mask[b].bool()], skip_special_tokens=True)
            writer.add(rec.id, A.reshape(sec.grid, sec.grid).cpu(), Sk.reshape(sec.grid, sec.grid).cpu(),
                       {"image_size": list(images[b].size), "mode": rec.mode, "response": text,
                        "steps": int(row_mask[b].sum())})
        n += len(batch)
        bar.update(len(batch))
    writer.flush()
    bar.close()
    secs = time.perf_counter() - t0
    return {"labelled": n, "total": len(writer.done), "seconds": secs, "samples_per_s": n / secs if n else 0.0}


# --- training the twig ----------------------------------------------------------------------
class Stage1Dataset(torch.utils.data.Dataset):
    """Records with stored maps; labels are computed on access with the configured rules."""

    def __init__(self, records, store: LabelStore, spec, rules):
        self.records = [r for r in records if r.id in store]
        if not self.records:
            raise QZoomError(f"none of the records has labels in {store.folder}")
        self.store, self.spec, self.rules = store, spec, rules
        self.grid = int(store.settings["grid"])

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        rec = self.records[i]
        A, S = self.store.maps(rec.id)
        image = load_image(rec)
        pad = padding_cells(image.size, A.shape)
        tri = tristate_labels(A, S, pad, **self.rules.model_dump())
        view, pixels = fixed_grid_view(self.spec, image, self.grid)
        return {"view": view, "pixels": pixels, "question": rec.question, "labels": tri.labels, "valid": tri.valid}


class Stage1Collate:
    def __init__(self, spec, processor):
        self.spec, self.processor = spec, processor

    def __call__(self, items):
        inputs = self.spec.chat_inputs(self.processor, [it["view"] for it in items],
                                       [it["question"] for it in items], pixels=items[0]["pixels"])
        return {"inputs": inputs, "labels": torch.stack([it["labels"] for it in items])}


class TwigObjective(nn.Module):
    """Loss of the twig on a batch: layers < K of the frozen backbone (no grad), then the twig only."""

    def __init__(self, model, twig: TwigRPN):
        super().__init__()
        self.twig = twig
        self._frozen = (model,)  # not a submodule: DDP/accelerate see only the twig
        self.trunk = Trunk(get_spec(model))

    def forward(self, batch):
        spec = self.trunk.spec
        dev = next(self.twig.parameters()).device
        inputs = batch_to(batch["inputs"], dev)
        with torch.no_grad():
            a = self.trunk.prefill(inputs, self.twig.K)
        first = a.mask.argmax(dim=1)
        scores, _ = self.twig.query_scores(spec, a.hK, a.kwargs, self.trunk, first)
        logits = torch.stack(a.image_logits(scores, spec.image_token_id, spec))
        return selective_bce(logits, batch["labels"].to(dev))


def build_twig(model, cfg: RecipeConfig, init_adapters: str | None) -> TwigRPN:
    if init_adapters:
        twig, _, _ = load_adapters(init_adapters, model)
        if twig is None:
            raise QZoomError(f"{init_adapters} holds no twig to continue training")
    else:
        twig = TwigRPN.from_backbone(model, K=cfg.K, T=cfg.T)
    twig = twig.float()  # fp32 master weights; bf16 compute comes from autocast
    for p in twig.parameters():
        p.requires_grad_(True)
    return twig


def save_zoom(model, processor, out, twig=None, gate=None, **zoom_cfg):
    QZoom(model, processor, twig=twig, gate=gate, config=ZoomConfig(**zoom_cfg)).save_pretrained(out)


def train_stage1(cfg: RecipeConfig, stop_after: int | None = None) -> dict:
    """`qzoom train stage1`: only the twig trains; only layers < K and the twig run."""
    sec = cfg.section("stage1")
    model, processor, spec = load_backbone(cfg.model)
    freeze(model)
    store = LabelStore(sec.labels)
    records = read_records(sec.records or cfg.section("labels_stage1").records)
    dataset = Stage1Dataset(records, store, spec, sec.rules)
    twig = build_twig(model, cfg, sec.init_adapters).to(model.device)
    objective = TwigObjective(model, twig)

    def save(module, out):
        save_zoom(model, processor, out, twig=module.twig.to(model.dtype))

    return Trainer(objective, dataset, Stage1Collate(spec, processor), sec.train, sec.out, save,
                   stop_after=stop_after).train()
