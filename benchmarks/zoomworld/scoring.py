"""ZoomWorld scoring: normalised exact match for answers; for boxes, box hit (>= 50% of the target box covered),
IoU with the target and the box's area relative to the target's.

Boxes are (x1, y1, x2, y2) in pixels with exclusive ends; a missing box is None. Box hit alone rewards big boxes
(one covering the whole image always hits); IoU and the area ratio show what such a box is.
"""
from __future__ import annotations

import re
import statistics


def normalize(text: str | None) -> str:
    """Lower-case, drop everything but letters and digits (codes and colours have no spaces)."""
    return re.sub(r"[^a-z0-9]", "", (text or "").lower())


def mean_or_none(values) -> float | None:
    """The mean of `values` (booleans count 0/1), or None when there are none."""
    values = list(values)
    return sum(values) / len(values) if values else None


def exact_match(pred: str | None, answer: str) -> bool:
    return normalize(pred) == normalize(answer) and normalize(answer) != ""


def box_area(box) -> float:
    """Area of a box (0 for None or a degenerate box, x2 <= x1 or y2 <= y1)."""
    if box is None:
        return 0
    return max(0, box[2] - box[0]) * max(0, box[3] - box[1])


def intersection_area(a, b) -> float:
    """Area of the overlap of two boxes (0 if either is None or they are disjoint)."""
    if a is None or b is None:
        return 0
    return box_area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))


def coverage(pred, target) -> float:
    """Share of the target box's area inside the predicted box (0 without a box or for an empty target)."""
    area = box_area(target)
    return intersection_area(pred, target) / area if area > 0 else 0.0


def iou(pred, target) -> float:
    """Intersection over union of two boxes (0 without a box, or when both are empty)."""
    union = box_area(pred) + box_area(target) - intersection_area(pred, target)
    return intersection_area(pred, target) / union if union > 0 else 0.0


def area_ratio(pred, target) -> float | None:
    """Predicted box area / target box area (1 is the target's size), or None without a box or for an empty
    target."""
    area = box_area(target)
    return box_area(pred) / area if pred is not None and area > 0 else None


def box_hit(pred, target, min_cover: float = 0.5) -> bool:
    """The predicted box covers at least `min_cover` of the target box's area."""
    area = box_area(target)
    return pred is not None and area > 0 and intersection_area(pred, target) >= min_cover * area


def box_metrics(samples, boxes) -> dict:
    """Box quality over the detail samples of `samples` (`boxes`: one per sample, None where there is none).

    * `box_iou_mean`: mean IoU with the target plate over every detail sample, a missing box counting 0;
    * `box_iou_mean_with_box`: the same over the detail samples that got a box;
    * `box_target_area_ratio_mean` / `_median`: box area / target area over the detail samples with a box
      (the mean is pulled up by the occasional huge box, hence the median);
    * `detail_without_box`: detail samples without a box; `detail_samples`: all of them.
    """
    if len(samples) != len(boxes):
        raise ValueError(f"{len(samples)} samples but {len(boxes)} boxes")
    detail = [(s, b) for s, b in zip(samples, boxes) if s.family == "detail"]
    ious = [iou(b, s.box) for s, b in detail]
    with_box = [iou(b, s.box) for s, b in detail if b is not None]
    ratios = [r for r in (area_ratio(b, s.box) for s, b in detail) if r is not None]
    return {"box_iou_mean": mean_or_none(ious), "box_iou_mean_with_box": mean_or_none(with_box),
            "box_target_area_ratio_mean": mean_or_none(ratios),
            "box_target_area_ratio_median": statistics.median(ratios) if ratios else None,
            "detail_without_box": sum(b is None for _, b in detail), "detail_samples": len(detail)}


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
