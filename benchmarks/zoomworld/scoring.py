"""ZoomWorld scoring: normalised exact match for answers, box hit (>= 50% of the target box covered)."""
from __future__ import annotations

import re


def normalize(text: str | None) -> str:
    """Lower-case, drop everything but letters and digits (codes and colours have no spaces)."""
    return re.sub(r"[^a-z0-9]", "", (text or "").lower())


def mean_or_none(values) -> float | None:
    """The mean of `values` (booleans count 0/1), or None when there are none."""
    values = list(values)
    return sum(values) / len(values) if values else None


def exact_match(pred: str | None, answer: str) -> bool:
    return normalize(pred) == normalize(answer) and normalize(answer) != ""


def box_hit(pred, target, min_cover: float = 0.5) -> bool:
    """The predicted box covers at least `min_cover` of the target box's area."""
    if pred is None or target is None:
        return False
    ix = max(0, min(pred[2], target[2]) - max(pred[0], target[0]))
    iy = max(0, min(pred[3], target[3]) - max(pred[1], target[1]))
    area = (target[2] - target[0]) * (target[3] - target[1])
    return area > 0 and ix * iy >= min_cover * area


def score(samples, predictions) -> dict:
    """Accuracy overall and per family/kind; box hit rate over detail samples that got a box.

    `predictions`: per sample a dict with "answer" and optionally "box".
    """
    if len(samples) != len(predictions):
        raise ValueError(f"{len(samples)} samples but {len(predictions)} predictions")
    out: dict = {"n": len(samples)}
    groups: dict[str, list[bool]] = {}
    hits = []
    for s, p in zip(samples, predictions):
        ok = exact_match(p.get("answer"), s.answer)
        for key in ("all", s.family, s.kind):
            groups.setdefault(key, []).append(ok)
        if s.family == "detail" and p.get("box") is not None:
            hits.append(box_hit(p["box"], s.box))
    out["accuracy"] = {k: sum(v) / len(v) for k, v in groups.items()}
    out["box_hit_rate"] = sum(hits) / len(hits) if hits else None
    out["boxes_scored"] = len(hits)
    return out
