"""Stage-3 consistency-aware gate labels (SPEC §4.4): classify answers per budget, balance the pool, draw labels."""
from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from qzoom_adapters.errors import QZoomError

from .judge import normalize_answer

HARD, EASY, UNSTABLE, WRONG_TOP, NON_MONOTONIC = "hard", "easy", "unstable", "wrong_top", "non_monotonic"
KINDS = (HARD, EASY, UNSTABLE, WRONG_TOP, NON_MONOTONIC)


def match(x: str, y: str) -> bool:
    """Normalised x in y or y in x; an empty (normalised) string matches nothing."""
    nx, ny = normalize_answer(x), normalize_answer(y)
    return bool(nx and ny) and (nx in ny or ny in nx)


@dataclass
class GateItemClass:
    kind: str  # one of KINDS; only HARD and EASY items are used for training
    wrong: list[int]  # budget indices whose answer matches no ground truth (empty unless computed)


@dataclass
class GateItem:
    """One question and its classification, as build_pool and GateDrawDataset read it (or a dict with these keys)."""
    sample: Any  # whatever the trainer needs to rebuild the input (image path, prompt, ...)
    n_budgets: int
    kind: str
    wrong: list[int]

    @classmethod
    def from_answers(cls, sample: Any, budget_answers: list[str], ground_truths: list[str]) -> GateItem:
        c = classify(budget_answers, ground_truths)
        return cls(sample, len(budget_answers), c.kind, c.wrong)


def classify(budget_answers: list[str], ground_truths: list[str]) -> GateItemClass:
    """Classify one question from its answers at increasing budgets r_1 < ... < r_k (k >= 3)."""
    if len(budget_answers) < 3:
        raise QZoomError(f"classify needs answers at >= 3 budgets (the top two are the reference), got "
                         f"{len(budget_answers)}; answer each question at more budgets")
    if isinstance(ground_truths, str) or not ground_truths:
        raise QZoomError(f"classify needs a non-empty list of ground truths, got {ground_truths!r}")
    correct = [any(match(a, g) for g in ground_truths) for a in budget_answers]
    if not match(budget_answers[-1], budget_answers[-2]):  # "agree" uses the same lenient match as correctness
        return GateItemClass(UNSTABLE, [])
    if not (correct[-1] and correct[-2]):
        return GateItemClass(WRONG_TOP, [])
    wrong = [i for i, ok in enumerate(correct) if not ok]
    if wrong != list(range(len(wrong))):  # more tokens must never turn a right answer wrong
        return GateItemClass(NON_MONOTONIC, wrong)
    return GateItemClass(HARD if wrong else EASY, wrong)


def _get(item: Any, name: str) -> Any:
    return item[name] if isinstance(item, Mapping) else getattr(item, name)


def build_pool(items: list, seed: int) -> tuple[list, dict[str, int]]:
    """All HARD items + as many EASY ones drawn at random (all of them if fewer), in input order; counts per kind."""
    stats = dict.fromkeys(KINDS, 0)
    by_kind: dict[str, list[int]] = {HARD: [], EASY: []}
    for i, item in enumerate(items):
        kind = _get(item, "kind")
        if kind not in stats:
            raise QZoomError(f"item {i} has kind {kind!r}; expected one of {KINDS} (from classify)")
        stats[kind] += 1
        by_kind.get(kind, []).append(i)
    hard, easy = by_kind[HARD], by_kind[EASY]
    chosen = random.Random(seed).sample(easy, min(len(hard), len(easy)))
    pool = [items[i] for i in sorted(hard + chosen)]
    stats["pool"] = len(pool)
    return pool, stats


def draw(kind: str, wrong: list[int], n_budgets: int, rng: random.Random,
         p_hard: float = 0.9) -> tuple[int, int] | None:
    """(budget index, label) for one draw of a pool item, or None (ignore this draw)."""
    if n_budgets < 3:
        raise QZoomError(f"draw needs >= 3 budgets, got {n_budgets}")
    correct_low = [i for i in range(n_budgets - 2) if i not in wrong]  # the top two are the reference: never drawn
    if kind == HARD:
        if not wrong:
            raise QZoomError("a HARD item needs a non-empty `wrong`; re-run classify")
        if rng.random() < p_hard:
            return rng.choice(wrong[-2:]), 1  # the largest budgets that still fail: the boundary matters most
    elif kind != EASY:
        raise QZoomError(f"only HARD and EASY items are drawn, got kind {kind!r}; build the pool with build_pool")
    return (rng.choice(correct_low), 0) if correct_low else None


def item_rng(seed: int, epoch: int, index: int) -> random.Random:
    """An RNG fixed by (seed, epoch, index): a resumed run draws the same (budget, label) for the same item."""
    digest = hashlib.sha256(f"{seed}/{epoch}/{index}".encode()).digest()  # stable across processes, unlike hash()
    return random.Random(int.from_bytes(digest[:8], "big"))


class GateDrawDataset(torch.utils.data.Dataset):
    """Pool items with a fresh (budget, label) draw per epoch.

    `__getitem__` returns {"sample", "budget_index", "label", "index"}, or None when the draw is "ignore"; the
    DataLoader's collate must drop the Nones (use `collate_drop_none`). Call `set_epoch(e)` before each epoch.
    """

    def __init__(self, pool: list, seed: int = 0, p_hard: float = 0.9):
        self.pool, self.seed, self.p_hard, self.epoch = pool, seed, p_hard, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pool)

    def __getitem__(self, i: int) -> dict | None:
        item = self.pool[i]
        drawn = draw(_get(item, "kind"), list(_get(item, "wrong")), _get(item, "n_budgets"),
                     item_rng(self.seed, self.epoch, i), self.p_hard)
        if drawn is None:
            return None
        return {"sample": _get(item, "sample"), "budget_index": drawn[0], "label": drawn[1], "index": i}


def collate_drop_none(batch: list, collate=None):
    """Drop the ignored (None) draws, then apply `collate` (the plain list if None)."""
    kept = [b for b in batch if b is not None]
    return collate(kept) if collate is not None else kept
