"""Train the ZoomWorld default model from scratch (answers at mixed budgets), on the project's trainer.

    python -m benchmarks.zoomworld.train --out zoomworld-model --steps 20000 [--batch-size 32]

Every step draws fresh ZoomWorld samples (seeded: step and batch position fix the sample) at one
visual-token budget per batch (cycled over BUDGETS), and the loss is on the answer tokens only.
Checkpoints, resume and the loss curve (train_log.csv) come from `recipes.trainer.Trainer`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from .generator import make_sample
from .model import BUDGETS, FACTOR, new_model


class StreamDataset(torch.utils.data.Dataset):
    """Index i -> the training-stream sample at seed `base + i` (a finite window of the endless stream)."""

    def __init__(self, n: int, base: int = 1_000):
        self.n, self.base = n, base

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        s = make_sample(self.base + i)
        return {"image": s.image, "question": s.question, "answer": s.answer, "seed": s.seed}


class AnswerCollate:
    """One budget per batch (from its first sample's seed), chat prompt + answer, labels on the answer only."""

    def __init__(self, processor, spec, budgets=BUDGETS):
        self.processor, self.spec, self.budgets = processor, spec, budgets

    def __call__(self, items):
        budget = self.budgets[items[0]["seed"] % len(self.budgets)]
        inputs = self.spec.chat_inputs(self.processor, [it["image"] for it in items],
                                       [it["question"] for it in items], pixels=budget * FACTOR**2)
        tok = self.processor.tokenizer
        answers = [tok(it["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for it in items]
        n = max(len(a) for a in answers)
        B = len(items)
        ids = torch.full((B, n), tok.pad_token_id)
        mask = torch.zeros(B, n, dtype=torch.long)
        for b, a in enumerate(answers):  # left-padded prompts, so answers go right-padded after them
            ids[b, : len(a)] = torch.tensor(a)
            mask[b, : len(a)] = 1
        labels = torch.cat([torch.full_like(inputs["input_ids"], -100), ids.masked_fill(mask == 0, -100)], dim=1)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], ids], dim=1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], mask], dim=1)
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(ids)], dim=1)
        return {"inputs": inputs, "labels": labels}


class AnswerObjective(nn.Module):
    """The model's own forward and loss (HF shifts the labels), every parameter training."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @staticmethod
    def loss_terms(batch) -> int:
        return int((batch["labels"][:, 1:] != -100).sum())

    def forward(self, batch):
        dev = next(self.model.parameters()).device
        inputs = {k: v.to(dev) for k, v in batch["inputs"].items()}
        return self.model(**inputs, labels=batch["labels"].to(dev), use_cache=False).loss


def train(out, steps: int, batch_size: int = 32, lr: float = 1e-3, num_workers: int = 0, seed: int = 0,
          stop_after: int | None = None, max_seconds: float | None = None) -> dict:
    from qzoom_adapters.spec import get_spec
    from recipes.config import TrainSection
    from recipes.trainer import Trainer

    model, processor = new_model(seed)
    model.train()
    spec = get_spec(model)
    cfg = TrainSection(lr=lr, weight_decay=0.01, warmup_ratio=0.03, max_steps=steps, batch_size=batch_size,
                       effective_batch=batch_size, save_every=max(1, min(1000, steps)), seed=seed,
                       num_workers=num_workers, log_every=max(1, min(50, steps)))
    dataset = StreamDataset(steps * batch_size)

    def save(module, out_dir):
        module.model.to(torch.bfloat16).save_pretrained(str(Path(out_dir) / "model"))
        processor.save_pretrained(str(Path(out_dir) / "model"))

    objective = AnswerObjective(model.to("cuda" if torch.cuda.is_available() else "cpu"))
    return Trainer(objective, dataset, AnswerCollate(processor, spec), cfg, out, save, stop_after=stop_after,
                   max_seconds=max_seconds).train()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num-workers", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, help="finish (and save) at the first step past this time budget")
    args = p.parse_args(argv)
    result = train(args.out, args.steps, args.batch_size, args.lr, args.num_workers, args.seed,
                   max_seconds=args.max_seconds)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
