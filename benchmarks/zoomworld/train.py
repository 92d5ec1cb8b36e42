"""Train the ZoomWorld default model from scratch (answers at mixed budgets), on the project's trainer.

    python -m benchmarks.zoomworld.train --out zoomworld-model --steps 20000 [--batch-size 32]

Every step draws fresh ZoomWorld samples (seeded: step and batch position fix the sample) at one
visual-token budget per batch (cycled over BUDGETS), and the loss is on the answer tokens only.
Checkpoints, resume and the loss curve (train_log.csv) come from `recipes.trainer.Trainer`.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import torch
from torch import nn

from .batches import FastChatInputs, PatchLayout
from .generator import make_sample
from .model import BUDGETS, FACTOR, new_model


CROP_VIEW_P = 0.35  # share of items that show a crop around the asked plate (teaches reading at many scales)


def crop_view(sample, rng: random.Random):
    """A random crop that holds the sample's whole target plate, 1.3-5x its size (same question and answer)."""
    x1, y1, x2, y2 = sample.box
    W, H = sample.image.size
    side = max(x2 - x1, y2 - y1) * rng.uniform(1.3, 5.0)
    aspect = rng.uniform(0.6, 1.6)
    cw = int(min(W, max(x2 - x1 + 2, side * aspect ** 0.5)))
    ch = int(min(H, max(y2 - y1 + 2, side / aspect ** 0.5)))
    left = rng.randint(max(0, x2 - cw), min(x1, W - cw))
    top = rng.randint(max(0, y2 - ch), min(y1, H - ch))
    return sample.image.crop((left, top, left + cw, top + ch))


class StreamDataset(torch.utils.data.Dataset):
    """Index i -> the training-stream item at seed `base + i`: a scene (detail or global question) or,
    with probability CROP_VIEW_P, a crop around the plate a detail question asks about."""

    def __init__(self, n: int, base: int = 1_000, crop_p: float = CROP_VIEW_P):
        self.n, self.base, self.crop_p = n, base, crop_p

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        seed = self.base + i
        rng = random.Random(seed * 104729 + 17)
        if rng.random() < self.crop_p:
            s = make_sample(seed, "detail")
            image = crop_view(s, rng)
        else:
            s = make_sample(seed)
            image = s.image
        return {"image": image, "question": s.question, "answer": s.answer, "seed": s.seed}


class AnswerCollate:
    """One budget per batch (from its first sample's seed), chat prompt + answer, labels on the answer only.

    Pixels stay uint8 patches (`FastChatInputs`); `AnswerObjective` normalises them on the device.
    """

    def __init__(self, processor, budgets=BUDGETS):
        self.processor, self.budgets = processor, budgets
        self.fast = FastChatInputs(processor)

    def __call__(self, items):
        budget = self.budgets[items[0]["seed"] % len(self.budgets)]
        inputs = self.fast([it["image"] for it in items], [it["question"] for it in items], budget * FACTOR**2)
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

    def __init__(self, model, processor):
        super().__init__()
        self.model = model
        self.layout = PatchLayout(processor.image_processor)

    @staticmethod
    def loss_terms(batch) -> int:
        return int((batch["labels"][:, 1:] != -100).sum())

    def forward(self, batch):
        dev = next(self.model.parameters()).device
        inputs = {k: v.to(dev, non_blocking=True) for k, v in batch["inputs"].items()}
        inputs["pixel_values"] = self.layout.normalize(inputs.pop("pixel_values_u8"))
        return self.model(**inputs, labels=batch["labels"].to(dev), use_cache=False).loss


def measure(objective, collate, batch_size: int, num_workers: int, seconds: float = 12.0) -> dict:
    """Samples/s the loader gives, and the seconds of one forward + backward per budget (to plan a time budget)."""
    dataset = StreamDataset(10**6, base=5_000_000)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=num_workers,
                                         shuffle=False, persistent_workers=False, prefetch_factor=4 if num_workers else None)
    t0, n, first = time.perf_counter(), 0, None
    for batch in loader:
        first = first or time.perf_counter()
        n += batch["labels"].shape[0]
        if time.perf_counter() - first > seconds:
            break
    data_rate = n / max(time.perf_counter() - first, 1e-9)
    step = {}
    cuda = torch.cuda.is_available()
    for budget in collate.budgets:
        items = [dataset[i] for i in range(batch_size)]
        batch = AnswerCollate(collate.processor, (budget,))(items)
        times = []
        for _ in range(3):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                objective(batch).backward()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        step[budget] = min(times[1:])
    objective.zero_grad(set_to_none=True)
    return {"loader_samples_per_s": data_rate, "step_s_per_budget": step,
            "step_s": max(batch_size / data_rate, sum(step.values()) / len(step)), "startup_s": first - t0}


def train(out, steps: int | None, batch_size: int = 32, lr: float = 1e-3, num_workers: int = 0, seed: int = 0,
          stop_after: int | None = None, max_seconds: float | None = None, init: str | None = None,
          plan_seconds: float | None = None) -> dict:
    """Train (or continue from `init`, a saved model folder) for `steps`, or as many as `plan_seconds` allow
    at the measured throughput (the cosine schedule then ends on time)."""
    from recipes.config import TrainSection
    from recipes.trainer import Trainer

    model, processor = new_model(seed)
    if init is not None:
        from recipes.models import load_backbone

        model = load_backbone(init)[0].float()
    model.train()
    objective = AnswerObjective(model.to("cuda" if torch.cuda.is_available() else "cpu"), processor)
    collate = AnswerCollate(processor)
    probe = None
    if plan_seconds is not None:
        probe = measure(objective, collate, batch_size, num_workers)
        steps = max(1, int(0.95 * (plan_seconds - probe["startup_s"]) / probe["step_s"]))
        print(json.dumps({"plan": probe, "steps": steps}, indent=1), flush=True)
    cfg = TrainSection(lr=lr, weight_decay=0.01, warmup_ratio=0.03, max_steps=steps, batch_size=batch_size,
                       effective_batch=batch_size, save_every=max(1, min(1000, steps)), seed=seed,
                       num_workers=num_workers, log_every=max(1, min(50, steps)))
    dataset = StreamDataset(steps * batch_size, base=1_000 + (seed % 997) * 10**6 if init else 1_000)

    def save(module, out_dir):
        # a bf16 copy is what ships (~12 MB); the training weights stay fp32
        copy.deepcopy(module.model).to(torch.bfloat16).save_pretrained(str(Path(out_dir) / "model"))
        processor.save_pretrained(str(Path(out_dir) / "model"))

    result = Trainer(objective, dataset, collate, cfg, out, save, stop_after=stop_after,
                     max_seconds=max_seconds).train()
    if probe is not None:
        result["plan"] = probe
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--plan-seconds", type=float, help="measure throughput, then plan as many steps as fit in this time")
    p.add_argument("--init", help="continue from this saved model folder (new optimizer and schedule)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num-workers", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, help="finish (and save) at the first step past this time budget")
    args = p.parse_args(argv)
    result = train(args.out, args.steps, args.batch_size, args.lr, args.num_workers, args.seed,
                   max_seconds=args.max_seconds, init=args.init, plan_seconds=args.plan_seconds)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
