"""Stage 1 (SPEC §4.1-§4.2): pseudo-labels from the backbone's own attention, then the twig on them."""
from __future__ import annotations

import time

import torch
from torch import nn

from qzoom_adapters.config import ZoomConfig
from qzoom_adapters.errors import QZoomError
from qzoom_adapters.io import load_adapters
from qzoom_adapters.labels import IGNORE, map_to_view, padding_cells, tristate_labels
from qzoom_adapters.losses import selective_bce
from qzoom_adapters.pipeline import QZoom
from qzoom_adapters.spec import get_spec
from qzoom_adapters.trunk import Trunk
from qzoom_adapters.twig import TwigRPN

from .config import LabelsStage1Section, RecipeConfig
from .data import by_budget, fixed_grid_view, load_image, read_records
from .gate_labels import item_rng
from .judge import RuleJudge
from .label_store import LabelStore, LabelWriter, changed_records, record_digest, refuse_changed, weights_fingerprint
from .models import batch_to, freeze, load_backbone
from .progress import progress
from .teacher import Teacher
from .trainer import Trainer


# --- pseudo-labels ------------------------------------------------------------------------
def stage1_prompt(record, sec: LabelsStage1Section) -> str:
    """Textual: the question as is. Natural: the answer-format suffix replaced by a grounding request."""
    q = record.question.strip()
    if record.mode == "textual":
        return q
    if sec.answer_suffix and q.endswith(sec.answer_suffix):  # an empty suffix strips nothing
        q = q[: -len(sec.answer_suffix)].rstrip()
    return f"{q}\n{sec.grounding_prompt}"


def _pairs_for(sec: LabelsStage1Section, mode: str):
    return (sec.textual_pairs, sec.textual_sink_pairs) if mode == "textual" else (sec.natural_pairs,
                                                                                  sec.natural_sink_pairs)


def _label_settings(cfg: RecipeConfig, spec) -> dict:
    """What the maps depend on (records aside: each has its digest): the teacher, its weights, the view, the heads."""
    sec = cfg.labels_stage1
    return {"model": cfg.model.path, "weights": weights_fingerprint(cfg.model.path), "family": spec.family,
            "dtype": cfg.model.dtype, "grid": sec.grid, "max_new_tokens": sec.max_new_tokens,
            "textual_pairs": sec.textual_pairs, "natural_pairs": sec.natural_pairs,
            "textual_sink_pairs": sec.textual_sink_pairs, "natural_sink_pairs": sec.natural_sink_pairs,
            "answer_suffix": sec.answer_suffix, "grounding_prompt": sec.grounding_prompt}


class _LabelBatches:
    """Collate for label generation: load the records' images and build the teacher's inputs (in workers)."""

    def __init__(self, teacher: Teacher, sec: LabelsStage1Section):
        self.teacher, self.sec = teacher, sec

    def __call__(self, records):
        images = [load_image(r) for r in records]
        inputs = self.teacher.prepare(images, [stage1_prompt(r, self.sec) for r in records])
        return records, [im.size for im in images], inputs


def make_stage1_labels(cfg: RecipeConfig, show_progress: bool = True) -> dict:
    """`qzoom labels stage1`: greedy teacher responses + probed attention maps, sharded and resumable."""
    sec = cfg.section("labels_stage1")
    model, processor, spec = load_backbone(cfg.model)
    teacher = Teacher(model, processor, spec, sec.grid, sec.max_new_tokens)
    layers = sorted({l for p in (sec.textual_pairs, sec.natural_pairs, sec.textual_sink_pairs,
                                 sec.natural_sink_pairs) for l in p})
    writer = LabelWriter(sec.out, _label_settings(cfg, spec), sec.shard_size)
    records = read_records(sec.records)
    digests = {r.id: record_digest(r) for r in records}
    writer.check_records(digests)  # a record changed under the same id must not mix old and new maps
    todo = [r for r in records if r.id not in writer.done]
    loader = torch.utils.data.DataLoader(todo, batch_size=sec.batch_size, collate_fn=_LabelBatches(teacher, sec),
                                         num_workers=sec.num_workers)
    t0, n, gpu_s = time.perf_counter(), 0, 0.0
    bar = progress(total=len(todo), desc="stage-1 labels", disable=not show_progress)
    for batch, sizes, inputs in loader:
        t1 = time.perf_counter()
        out = teacher.answer_and_probe(inputs, layers)
        for b, rec in enumerate(batch):
            pairs, sink_pairs = _pairs_for(sec, rec.mode)
            A = out.map(b, pairs, sec.grid)
            writer.add(rec.id, A, out.map(b, sink_pairs, sec.grid) if sink_pairs else torch.zeros_like(A),
                       {"image_size": list(sizes[b]), "mode": rec.mode, "response": out.responses[b],
                        "steps": int(out.row_mask[b].sum())}, digests[rec.id])
        gpu_s += time.perf_counter() - t1
        n += len(batch)
        bar.update(len(batch))
    writer.flush()
    bar.close()
    secs = time.perf_counter() - t0
    return {"labelled": n, "total": len(writer.done), "seconds": secs, "samples_per_s": n / secs if n else 0.0,
            "model_seconds": gpu_s}


# --- training the twig ----------------------------------------------------------------------
class Stage1Dataset(torch.utils.data.Dataset):
    """Records with stored maps; labels are computed on access with the configured rules.

    Without `budgets` a sample is the label grid's square view with its labels (SPEC §4.2). With `budgets` it
    draws one per (epoch, index) and is the image's own view at that budget; its maps travel with it and become
    labels on that view's grid in `Stage1Collate`, once the processor has fixed the grid.
    """

    def __init__(self, records, store: LabelStore, spec, rules, budgets: list[int] | None = None, seed: int = 0):
        self.records = [r for r in records if r.id in store]
        if not self.records:
            raise QZoomError(f"none of the records has labels in {store.folder}")
        if rules.require_correct:
            judge = RuleJudge("vqa")
            labelled = len(self.records)
            self.records = [r for r in self.records if judge.score(store.meta[r.id].get("response", ""), r.answers) >= judge.threshold]
            if not self.records:
                raise QZoomError(f"rules.require_correct: the teacher answered none of the {labelled} labelled records "
                                 "correctly; label more records or turn the rule off")
        self.store, self.spec, self.rules = store, spec, rules
        self.thresholds = label_thresholds(rules)
        self.grid = int(store.settings["grid"])
        self.budgets, self.seed = budgets, seed
        if budgets:
            for b in budgets:
                spec.budget_pixels(b)  # a backbone without budgets (LLaVA's fixed grid) refuses here, not mid-run

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.get(i, 0)

    def get(self, i: int, epoch: int) -> dict:
        rec = self.records[i]
        A, S = self.store.maps(rec.id)
        image = load_image(rec)
        if self.budgets:
            budget = item_rng(self.seed, epoch, i).choice(self.budgets)
            return {"view": image, "pixels": self.spec.budget_pixels(budget), "question": rec.question,
                    "maps": (A, S), "image_size": image.size}
        pad = padding_cells(image.size, A.shape)
        tri = tristate_labels(A, S, pad, **self.thresholds)
        view, pixels = fixed_grid_view(self.spec, image, self.grid)
        return {"view": view, "pixels": pixels, "question": rec.question, "labels": tri.labels, "valid": tri.valid}


def label_thresholds(rules) -> dict:
    """The keyword arguments of `tristate_labels` that a recipe's `rules` set."""
    return rules.model_dump(exclude={"require_correct"})


class Stage1Collate:
    """A micro-batch as one group per pixel budget (a processor call encodes at one budget), in increasing order;
    each group's `labels` is a list of (h_t, w_t) maps, one per sample."""

    def __init__(self, spec, processor, thresholds: dict | None = None):
        self.spec, self.processor, self.thresholds = spec, processor, thresholds or {}

    def __call__(self, items):
        return [self._group(its, p) for p, its in by_budget(items, "pixels")]

    def _group(self, items, pixels):
        spec = self.spec
        inputs = spec.chat_inputs(self.processor, [it["view"] for it in items], [it["question"] for it in items],
                                  pixels=pixels)
        grids = spec.image_grids(inputs)
        labels = []
        for j, it in enumerate(items):
            if "labels" in it:
                labels.append(it["labels"])
                continue
            grid = spec.token_grid(grids[j])
            A, S = (map_to_view(m, it["image_size"], grid) for m in it["maps"])
            labels.append(tristate_labels(A, S, None, **self.thresholds).labels)
        return {"inputs": inputs, "labels": labels}


class TwigObjective(nn.Module):
    """Loss of the twig on a batch: layers < K of the frozen backbone (no grad), then the twig only."""

    def __init__(self, model, twig: TwigRPN):
        super().__init__()
        self.twig = twig
        self._frozen = (model,)  # not a submodule: DDP/accelerate see only the twig
        self.trunk = Trunk(get_spec(model))

    @staticmethod
    def loss_terms(groups) -> int:
        """Valid (non-ignored) cells: the loss is their mean over the whole effective batch (SPEC §4.2)."""
        return sum(int((lab != IGNORE).sum()) for g in groups for lab in g["labels"])

    def forward(self, groups):
        """The mean BCE over every valid cell of the micro-batch, whatever grid each sample has."""
        spec = self.trunk.spec
        dev = next(self.twig.parameters()).device
        logits, labels = [], []
        for g in groups:
            inputs = batch_to(g["inputs"], dev)
            with torch.no_grad():
                a = self.trunk.prefill(inputs, self.twig.K)
            first = a.mask.argmax(dim=1)
            scores, _ = self.twig.query_scores(spec, a.hK, a.kwargs, self.trunk, first)
            for m, lab in zip(a.image_logits(scores, spec), g["labels"]):
                if tuple(m.shape) != tuple(lab.shape):
                    raise QZoomError(f"a sample's labels have shape {tuple(lab.shape)} but its image has a "
                                     f"{tuple(m.shape)} token grid")
                logits.append(m.flatten())
                labels.append(lab.to(dev).flatten())
        return selective_bce(torch.cat(logits), torch.cat(labels))


def build_twig(model, cfg: RecipeConfig, init_adapters: str | None) -> TwigRPN:
    if init_adapters:
        twig, _, _ = load_adapters(init_adapters, model)
        if twig is None:
            raise QZoomError(f"{init_adapters} holds no twig to continue training")
        if (twig.K, twig.T) != (cfg.K, cfg.T):
            raise QZoomError(f"{init_adapters} holds a twig with K={twig.K}, T={twig.T} but the recipe says "
                             f"K={cfg.K}, T={cfg.T}; set K/T to the adapters' values")
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
    refuse_changed(store.folder, changed_records(store.manifest, {r.id: record_digest(r) for r in records
                                                                  if r.id in store}))
    dataset = Stage1Dataset(records, store, spec, sec.rules, sec.budgets, sec.train.seed)
    twig = build_twig(model, cfg, sec.init_adapters).to(model.device)
    objective = TwigObjective(model, twig)

    def save(module, out):
        save_zoom(model, processor, out, twig=module.twig.to(model.dtype))

    return Trainer(objective, dataset, Stage1Collate(spec, processor, dataset.thresholds), sec.train, sec.out, save,
                   stop_after=stop_after, find_unused_parameters=True, settings=cfg.run_settings("stage1")).train()
