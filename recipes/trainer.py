"""One training loop for every stage, on accelerate: CPU, one GPU, or `accelerate launch` (DDP/FSDP).

A stage hands over a module whose `forward(batch)` returns the loss and whose trainable
parameters are the only ones with `requires_grad`, a dataset and a collate function. The loop
owns what every stage needs the same way: a deterministic, resumable data order, gradient
accumulation to the effective batch, AdamW + cosine schedule with linear warm-up, clipping,
checkpoints (a killed run resumes from the last one with nothing lost), CSV/JSONL loss logs.

The run folder's bookkeeping (its `qzoom_run.json` marker, the settings check on resume, atomic
writes, reading a torn loss log) is in `run_folder`.
"""
from __future__ import annotations

import csv
import io
import json
import math
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from qzoom_adapters.errors import QZoomError

from .config import TrainSection
from .progress import progress
from qzoom_adapters.atomic import atomic_write_text

from .run_folder import DONE_NAME, latest_checkpoint, read_log_rows, save_run, start_run


def epoch_order(n: int, seed: int, epoch: int, rank: int, world: int) -> list[int]:
    """This process's sample indices for `epoch`: a seeded permutation, dealt round-robin, equal per process."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    per = n // world
    if per == 0:
        raise QZoomError(f"{n} samples cannot be split over {world} processes")
    return perm[rank::world][:per]


def process_state():
    """accelerate's state of this process, set up as the trainer's Accelerator sets it up (CPU processes under
    torchrun use gloo): callers that need the process count or device before the Trainer exists use this."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


class Trainer:
    """Train `module` on `dataset`; `save_outputs(module, out_dir)` writes the final artefacts."""

    def __init__(self, module: nn.Module, dataset, collate, cfg: TrainSection, out_dir, save_outputs,
                 on_epoch=None, stop_after: int | None = None, find_unused_parameters: bool = False,
                 max_seconds: float | None = None, settings: dict | None = None):
        self.module, self.dataset, self.collate, self.cfg = module, dataset, collate, cfg
        self.out = Path(out_dir)
        # what shapes the run besides the optimisation settings (model, K, data, ...): a resume must match it
        self.settings = json.loads(json.dumps({**(settings or {}), "samples": len(dataset),
                                               **{f"train.{k}": v for k, v in cfg.run_settings().items()}},
                                              default=str))
        self.run: dict = {}
        self.save_outputs = save_outputs
        self.on_epoch = on_epoch  # e.g. dataset.set_epoch for per-epoch random draws
        self.stop_after = stop_after  # stop (as if killed) after this optimizer step's checkpoint
        # DDP must be told when some trainable parameters get no gradient (the twig's last layer: only q/k)
        self.find_unused_parameters = find_unused_parameters
        self.max_seconds = max_seconds  # a time budget: finish (and save) at the first step past it
        self.max_skipped = 50  # updates skipped for non-finite gradients before the run fails

    # --- setup ----------------------------------------------------------------------------
    def _accelerator(self):
        from accelerate import Accelerator, DistributedDataParallelKwargs

        mp = self.cfg.mixed_precision
        if mp == "auto":
            mp = "bf16" if torch.cuda.is_available() else "no"
        # `total` counts optimizer steps: the schedule must advance once per step (accelerate's default steps a
        # prepared scheduler once per process per step, which would end the cosine early under DDP)
        ddp = DistributedDataParallelKwargs(find_unused_parameters=self.find_unused_parameters)
        return Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available(), step_scheduler_with_optimizer=False,
                           kwargs_handlers=[ddp])

    def _plan(self, world: int):
        cfg = self.cfg
        per_step = cfg.batch_size * world
        if cfg.effective_batch % per_step:
            raise QZoomError(f"effective_batch {cfg.effective_batch} is not a multiple of batch_size x processes "
                             f"({cfg.batch_size} x {world})")
        accum = cfg.effective_batch // per_step
        micro_per_epoch = len(self.dataset) // world // cfg.batch_size
        if micro_per_epoch == 0:
            raise QZoomError(f"{len(self.dataset)} samples give no full batch of {cfg.batch_size} per process")
        steps_per_epoch = math.ceil(micro_per_epoch / accum)
        total = cfg.max_steps or steps_per_epoch * cfg.epochs
        return accum, micro_per_epoch, steps_per_epoch, total

    # --- the loop ---------------------------------------------------------------------------
    def train(self) -> dict:
        from transformers import get_cosine_schedule_with_warmup

        cfg = self.cfg
        acc = self._accelerator()
        accum, micro_per_epoch, steps_per_epoch, total = self._plan(acc.num_processes)
        self.run = start_run(acc, self.out, self.settings)
        torch.manual_seed(cfg.seed)
        planned = total
        params = [p for p in self.module.parameters() if p.requires_grad]
        if not params:
            raise QZoomError("the stage's module has no trainable parameter")
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
        sched = get_cosine_schedule_with_warmup(opt, math.ceil(cfg.warmup_ratio * total), total)
        module, opt, sched = acc.prepare(self.module, opt, sched)
        ckpt_dir = self.out / "checkpoints"
        step = 0
        latest = latest_checkpoint(ckpt_dir, self.run)
        if latest is not None:
            acc.load_state(str(latest))
            step = json.loads((latest / "trainer_state.json").read_text())["step"]
            acc.print(f"resuming from {latest} (step {step} of {total})")
        log = _Log(self.out, acc.is_main_process, resume_step=step)
        bar = progress(total=total, desc=f"training -> {self.out.name}", disable=not acc.is_main_process)
        bar.update(step)
        module.train()
        t0, seen, skipped = time.perf_counter(), 0, 0
        while step < total:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            if self.on_epoch is not None:
                self.on_epoch(epoch)
            order = epoch_order(len(self.dataset), cfg.seed, epoch, acc.process_index, acc.num_processes)
            first = in_epoch * accum
            # workers load and collate ahead (num_workers); the index order alone fixes what each step sees
            loader = iter(torch.utils.data.DataLoader(
                _EpochView(self.dataset, epoch), batch_size=cfg.batch_size, collate_fn=self.collate,
                sampler=order[first * cfg.batch_size : micro_per_epoch * cfg.batch_size],
                num_workers=cfg.num_workers, drop_last=True))
            for start in range(first, micro_per_epoch, accum):
                batches = [next(loader) for _ in range(start, min(start + accum, micro_per_epoch))]
                weights = self._weights(acc, batches)
                loss_sum = 0.0
                for j, (batch, w) in enumerate(zip(batches, weights)):
                    sync = j == len(batches) - 1
                    ctx = acc.no_sync(module) if not sync and acc.num_processes > 1 else nullcontext()
                    with ctx:
                        loss = module(batch)
                        acc.backward(loss * w)
                    loss_sum += float(loss.detach()) * w / acc.num_processes
                    seen += cfg.batch_size * acc.num_processes
                # the total norm (clipping at inf clips nothing); DDP has averaged the gradients, so every
                # process sees the same value and skips the same steps
                norm = acc.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
                if not math.isfinite(float(norm)):
                    # one bad batch (overflow in low precision) must not poison the weights: skip its update
                    skipped += 1
                    acc.print(f"step {step + 1}: non-finite gradient (loss {loss_sum}), update skipped "
                              f"({skipped} so far)")
                    if skipped > self.max_skipped:
                        raise QZoomError(f"{skipped} steps had non-finite gradients (the last at step {step + 1}): "
                                         "lower the learning rate or check the data; the last checkpoint is kept")
                else:
                    opt.step()
                    # the schedule counts updates: a skipped one (here, or by fp16's GradScaler) leaves it as is
                    if not acc.optimizer_step_was_skipped:
                        sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                bar.update(1)
                if self.max_seconds is not None and step < total and self._over_time(acc, t0):
                    acc.print(f"time budget of {self.max_seconds:.0f}s reached at step {step} of {total}: finishing")
                    total = step
                loss_all = float(acc.reduce(torch.tensor(loss_sum, device=acc.device), "sum"))
                if step % cfg.log_every == 0 or step == total:
                    log.write(step=step, epoch=epoch, loss=loss_all, lr=sched.get_last_lr()[0],
                              samples_per_s=seen / (time.perf_counter() - t0), elapsed_s=time.perf_counter() - t0)
                    bar.set_postfix(loss=f"{loss_all:.4f}")
                if step % cfg.save_every == 0 or step == total or step == self.stop_after:
                    self._checkpoint(acc, ckpt_dir, step)
                if step == self.stop_after and step < total:
                    bar.close()
                    acc.print(f"stopping after step {step} as asked; run again to resume")
                    return {"step": step, "finished": False}
                if step >= total:
                    break
        bar.close()
        acc.wait_for_everyone()
        summary = {"step": step, "finished": True, "planned_steps": planned,
                   "samples_per_s": seen / max(time.perf_counter() - t0, 1e-9), "final_loss": log.last_loss,
                   "processes": acc.num_processes, "skipped_steps": skipped}
        if acc.is_main_process:
            self.save_outputs(acc.unwrap_model(module), self.out)
            atomic_write_text(self.out / DONE_NAME, json.dumps(summary, indent=2))
        acc.wait_for_everyone()
        return summary

    def _over_time(self, acc, t0: float) -> bool:
        """Past the time budget on any process (all processes must stop at the same step)."""
        over = torch.tensor(float(time.perf_counter() - t0 > self.max_seconds), device=acc.device)
        return bool(acc.reduce(over, "sum") > 0)

    def _weights(self, acc, batches) -> list[float]:
        """Per micro-batch loss weights so one step's loss is the mean over all its loss terms.

        An objective with `loss_terms(batch)` (valid cells, answer tokens, gate items) gets exactly
        the mean over every term of the effective batch, across accumulation and processes (DDP
        averages gradients, hence the factor of processes); otherwise micro-batches weigh the same.
        """
        terms = getattr(self.module, "loss_terms", None)
        if terms is None:
            return [1.0 / len(batches)] * len(batches)
        counts = [float(terms(b)) for b in batches]
        total = float(acc.reduce(torch.tensor(sum(counts), device=acc.device), "sum"))
        return [c * acc.num_processes / total if total else 0.0 for c in counts]

    def _checkpoint(self, acc, ckpt_dir: Path, step: int) -> None:
        """Save to a temporary folder, then rename: a kill during saving leaves the previous checkpoint intact.

        The run records each checkpoint before it appears, and rotates away only checkpoints it recorded.
        """
        name = f"step-{step}"
        final = ckpt_dir / name
        tmp = ckpt_dir / f".tmp-{name}"
        if acc.is_main_process:
            if final.exists() and name not in self.run["checkpoints"]:
                raise QZoomError(f"{final} exists but this run did not write it; move it out of {ckpt_dir} and "
                                 "run again to resume")
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
            names = [n for n in self.run["checkpoints"] if n != name] + [name]
            self.run["checkpoints"] = names
            save_run(self.out, self.run)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            names = sorted(names, key=lambda n: int(n.split("-")[1]))
            old, keep = names[: -self.cfg.keep_checkpoints], names[-self.cfg.keep_checkpoints :]
            if old:
                self.run["checkpoints"] = keep
                save_run(self.out, self.run)  # forgotten first: a half-deleted folder is never resumed from
                for n in old:
                    gone = ckpt_dir / f".old-{n}"
                    if (ckpt_dir / n).exists():
                        shutil.rmtree(gone, ignore_errors=True)
                        (ckpt_dir / n).rename(gone)
                    shutil.rmtree(gone, ignore_errors=True)
        acc.wait_for_everyone()


class _EpochView(torch.utils.data.Dataset):
    """A dataset as seen in one epoch: `get(i, epoch)` when it draws per epoch, else `dataset[i]`."""

    def __init__(self, dataset, epoch: int):
        self.dataset, self.epoch = dataset, epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        get = getattr(self.dataset, "get", None)
        return get(i, self.epoch) if get is not None else self.dataset[i]


class _Log:
    """Loss log as CSV and JSONL (appended, so a resumed run continues the same files)."""

    FIELDS = ("step", "epoch", "loss", "lr", "samples_per_s", "elapsed_s")

    def __init__(self, out: Path, main: bool, resume_step: int = 0):
        self.main = main
        self.csv = out / "train_log.csv"
        self.jsonl = out / "train_log.jsonl"
        self.last_loss = None
        if not main:
            return
        # rows logged after the checkpoint we resume from are redone: drop them. Both files are rewritten through
        # a temporary file, so a crash here loses no row; later rows are appended
        rows = [r for r in read_log_rows(self.jsonl) if r["step"] <= resume_step]
        atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in rows))
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(self.FIELDS)
        w.writerows([r.get(k, "") for k in self.FIELDS] for r in rows)
        atomic_write_text(self.csv, buf.getvalue())

    def write(self, **row) -> None:
        self.last_loss = row["loss"]
        if not self.main:
            return
        with open(self.csv, "a", newline="") as f:
            csv.writer(f).writerow([row[k] for k in self.FIELDS])
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
