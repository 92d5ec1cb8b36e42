"""Stage 3 (SPEC §4.4): answers at several visual-token budgets, consistency-aware labels, the gate."""
from __future__ import annotations

import json
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from qzoom_adapters.decode import eos_ids
from qzoom_adapters.errors import QZoomError
from qzoom_adapters.gate import DynamicGate
from qzoom_adapters.io import load_adapters
from qzoom_adapters.trunk import Trunk

from .config import ModelSection, RecipeConfig
from .data import JsonlAppender, SampleRecord, chunks, load_image, read_records, read_rows
from .gate_labels import GateDrawDataset, GateItem, build_pool, collate_drop_none
from .models import batch_to, freeze, load_backbone, placeholder_ids
from .progress import progress
from .stage1 import save_zoom
from .trainer import Trainer


def _model_section(cfg: RecipeConfig, path: str | None) -> ModelSection:
    return cfg.model if path is None else cfg.model.model_copy(update={"path": path})


@torch.no_grad()
def answer_at_budgets(cfg: RecipeConfig, show_progress: bool = True) -> dict:
    """`qzoom labels stage3`: greedy answers per budget (min = max pixels), appended to a resumable JSONL."""
    sec = cfg.section("labels_stage3")
    model, processor, spec = load_backbone(_model_section(cfg, sec.model))
    pixels = [spec.budget_pixels(r) for r in sec.budgets]
    records = read_records(sec.records)
    out = JsonlAppender(sec.out)
    todo = [r for r in records if r.id not in out.done]
    eos, pad = sorted(eos_ids(model)), processor.tokenizer.pad_token_id or 0
    bar = progress(total=len(todo), desc="stage-3 answers", disable=not show_progress)
    t0 = time.perf_counter()
    for batch in chunks(todo, sec.batch_size):
        images = [load_image(r) for r in batch]
        per_budget, tokens = [], []
        for px in pixels:
            inputs = batch_to(spec.chat_inputs(processor, images, [r.question for r in batch], pixels=px), model.device)
            S = inputs["input_ids"].shape[1]
            seq = model.generate(**inputs, do_sample=False, max_new_tokens=sec.max_new_tokens, eos_token_id=eos,
                                 pad_token_id=pad, suppress_tokens=placeholder_ids(spec))
            per_budget.append(processor.tokenizer.batch_decode(seq[:, S:], skip_special_tokens=True))
            tokens.append((inputs["input_ids"] == spec.image_token_id).sum(dim=1).tolist())
        out.append([{**r.model_dump(), "budgets": list(sec.budgets), "budget_answers": [a[b] for a in per_budget],
                     "visual_tokens": [t[b] for t in tokens]} for b, r in enumerate(batch)])
        bar.update(len(batch))
    bar.close()
    secs = time.perf_counter() - t0
    return {"answered": len(todo), "total": len(out.done), "samples_per_s": len(todo) / secs if todo else 0.0}


class GateCollate:
    """Groups drawn items by budget (one processor call each: a call encodes at one pixel budget)."""

    def __init__(self, spec, processor):
        self.spec, self.processor = spec, processor

    def __call__(self, drawn):
        groups = defaultdict(list)
        for d in collate_drop_none(drawn):
            groups[d["sample"]["budgets"][d["budget_index"]]].append(d)
        batches = []
        for budget, items in sorted(groups.items()):
            images = [load_image(SampleRecord(**d["sample"])) for d in items]
            inputs = self.spec.chat_inputs(self.processor, images, [d["sample"]["question"] for d in items],
                                           pixels=self.spec.budget_pixels(budget))
            batches.append({"inputs": inputs, "labels": torch.tensor([float(d["label"]) for d in items])})
        return batches


class GateObjective(nn.Module):
    """BCE of the gate at the last prompt token; only layers < K (no grad) and the gate run."""

    def __init__(self, model, spec, gate: DynamicGate):
        super().__init__()
        self.gate = gate
        self._frozen = (model,)
        self.trunk = Trunk(spec)

    @staticmethod
    def loss_terms(groups) -> int:
        """Drawn items (ignored draws are already dropped)."""
        return sum(len(g["labels"]) for g in groups)

    def forward(self, groups):
        dev = next(self.gate.parameters()).device
        if not groups:  # every draw of this batch was "ignore": a zero that keeps the graph
            return self.gate.head.weight.sum() * 0.0
        total, n = 0.0, 0
        for g in groups:
            with torch.no_grad():
                a = self.trunk.prefill(batch_to(g["inputs"], dev), self.gate.K)
            logits = self.gate.logits(self.trunk.spec, a.hK, a.kwargs, self.trunk)
            total = total + F.binary_cross_entropy_with_logits(logits, g["labels"].to(dev), reduction="sum")
            n += len(g["labels"])
        return total / n


def gate_pool(rows: list[dict], seed: int, reference: str = "ground_truth"):
    """Classify every answered question (SPEC §4.4) and balance HARD with EASY.

    reference "top_budget" judges each budget against the highest budget's answer instead of the
    ground truth (self-consistency labels for a pool without answers).
    """
    items = []
    for row in rows:
        truths = [row["budget_answers"][-1]] if reference == "top_budget" else row.get("answers")
        if not truths:
            raise QZoomError(f"sample {row['id']!r} has no ground truth; stage-3 labels need answers "
                             "(or set stage3.reference: top_budget)")
        items.append(GateItem.from_answers(row, row["budget_answers"], truths))
    return build_pool(items, seed)


def train_stage3(cfg: RecipeConfig, stop_after: int | None = None) -> dict:
    """`qzoom train stage3`: the gate, initialised from layers[K:K+T] **[fix]**, on consistency-aware draws."""
    sec = cfg.section("stage3")
    model, processor, spec = load_backbone(_model_section(cfg, sec.model))
    freeze(model)
    twig, _, zoom_cfg = load_adapters(sec.adapters, model)
    pool, stats = gate_pool(read_rows(sec.answers), sec.train.seed, sec.reference)
    print(f"stage-3 pool: {stats}")
    if not pool:
        raise QZoomError(f"no HARD/EASY item in {sec.answers} ({stats}); answer more questions or more budgets")
    dataset = GateDrawDataset(pool, seed=sec.train.seed, p_hard=sec.p_hard)
    torch.manual_seed(sec.train.seed)  # the head's random init follows the run's seed (reproducible runs)
    gate = DynamicGate.from_backbone(model, K=cfg.K, T=cfg.T).float()
    objective = GateObjective(model, spec, gate)

    def save(module, out):
        save_zoom(model, processor, out, twig=twig, gate=module.gate.to(model.dtype),
                  **zoom_cfg.model_dump(exclude={"gate_threshold"}))
        (out / "gate_pool.json").write_text(json.dumps(stats, indent=2))

    return Trainer(objective, dataset, GateCollate(spec, processor), sec.train, sec.out, save,
                   on_epoch=dataset.set_epoch, stop_after=stop_after, settings=cfg.run_settings("stage3")).train()
