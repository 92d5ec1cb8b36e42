"""Box metrics of `qzoom bench zoomworld` (IoU, box / target area, coverage) on constructed boxes, the report
columns they fill, and that benches run without --out leave benchmarks/results/ alone."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from qzoom_adapters.benchmarks import speed
from qzoom_adapters.benchmarks.zoomworld import bench
from qzoom_adapters.benchmarks.zoomworld.scoring import area_ratio, box_area, box_hit, box_metrics, coverage, intersection_area, iou
from qzoom_adapters.recipes.cli import main

RESULTS = Path(bench.__file__).resolve().parents[1] / "results"
IMAGE = (0, 0, 1600, 1200)  # a whole 1600 x 1200 image
PLATE = (700, 500, 760, 530)  # a 60 x 30 plate in it


# --- the pure metrics -------------------------------------------------------------------------------------------
def test_identical_boxes():
    assert iou(PLATE, PLATE) == 1.0 and area_ratio(PLATE, PLATE) == 1.0 and coverage(PLATE, PLATE) == 1.0
    assert box_hit(PLATE, PLATE)


def test_whole_image_hits_but_iou_shows_it():
    assert box_hit(IMAGE, PLATE) and coverage(IMAGE, PLATE) == 1.0  # box hit cannot tell
    assert iou(IMAGE, PLATE) == pytest.approx(60 * 30 / (1600 * 1200)) and iou(IMAGE, PLATE) < 0.001
    assert area_ratio(IMAGE, PLATE) == pytest.approx(1600 * 1200 / (60 * 30)) and area_ratio(IMAGE, PLATE) > 1000


def test_disjoint_and_partial_boxes():
    far = (0, 0, 50, 50)
    assert iou(far, PLATE) == 0.0 and coverage(far, PLATE) == 0.0 and not box_hit(far, PLATE)
    assert area_ratio(far, PLATE) == pytest.approx(2500 / 1800)
    touching = (760, 500, 800, 530)  # exclusive ends: shares an edge, no pixel
    assert intersection_area(touching, PLATE) == 0 and iou(touching, PLATE) == 0.0
    left_half = (700, 500, 730, 530)
    assert coverage(left_half, PLATE) == 0.5 and box_hit(left_half, PLATE) and iou(left_half, PLATE) == 0.5
    assert area_ratio(left_half, PLATE) == 0.5
    shifted = (730, 500, 790, 530)  # half overlapping, the same size: IoU 900 / 2700
    assert iou(shifted, PLATE) == pytest.approx(1 / 3) and iou(PLATE, shifted) == iou(shifted, PLATE)


def test_missing_and_degenerate_boxes():
    for empty in (None, (10, 10, 10, 20), (10, 10, 5, 5)):
        assert box_area(empty) == 0 and iou(empty, PLATE) == 0.0 and coverage(empty, PLATE) == 0.0
        assert not box_hit(empty, PLATE)
        assert iou(PLATE, empty) == 0.0 and coverage(PLATE, empty) == 0.0 and area_ratio(PLATE, empty) is None
        assert not box_hit(PLATE, empty)
    assert area_ratio(None, PLATE) is None and area_ratio((10, 10, 10, 20), PLATE) == 0.0
    assert iou(None, None) == 0.0 and area_ratio(None, None) is None


def _sample(family: str, box=PLATE):
    return SimpleNamespace(family=family, box=box)


def test_box_metrics_count_missing_boxes_as_zero():
    samples = [_sample("detail"), _sample("detail"), _sample("detail"), _sample("detail"), _sample("global", None)]
    boxes = [PLATE, IMAGE, None, (700, 500, 730, 530), IMAGE]  # the global sample's box is not scored
    m = box_metrics(samples, boxes)
    big = 1600 * 1200 / 1800
    assert m["detail_samples"] == 4 and m["detail_without_box"] == 1
    assert m["box_iou_mean"] == pytest.approx((1 + 1 / big + 0 + 0.5) / 4)
    assert m["box_iou_mean_with_box"] == pytest.approx((1 + 1 / big + 0.5) / 3)
    assert m["box_target_area_ratio_mean"] == pytest.approx((1 + big + 0.5) / 3)
    assert m["box_target_area_ratio_median"] == 1.0  # the outlier does not move it
    none = box_metrics([_sample("detail"), _sample("global", None)], [None, None])
    assert none["box_iou_mean"] == 0.0 and none["detail_without_box"] == 1
    assert none["box_iou_mean_with_box"] is None and none["box_target_area_ratio_median"] is None
    assert box_metrics([_sample("global", None)], [None])["box_iou_mean"] is None
    with pytest.raises(ValueError):
        box_metrics(samples, boxes[:-1])


def test_markdown_table_has_the_box_columns():
    meta = {"n": 4, "machine": {"device_name": "cpu", "device": "cpu"}, "torch": "t", "transformers": "x",
            "git_commit": "c0ffee", "batch_size": 4}
    acc = {"all": 0.5, "detail": 0.5, "global": 0.5}
    q = {"budget": 64, "accuracy": acc, "visual_tokens": 80.0, "latency_s": 0.01, "zoom_rate": 0.5,
         "box_hit_rate": 1.0, "box_iou_mean": 0.125, "box_target_area_ratio_mean": 355.0,
         "box_target_area_ratio_median": 1.5, "detail_without_box": 1, "detail_samples": 3, "box_area_fraction": 0.4,
         "gate": {}}
    base = {"budget": 64, "accuracy": acc, "visual_tokens": 54.0, "latency_s": 0.01}
    lines = bench.markdown_table({"meta": meta, "baseline": [base], "qzoom": [q]}).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    row = dict(zip(header, (c.strip() for c in lines[3].strip("|").split("|"))))
    assert row["box hit (detail)"] == "1.000" and row["box IoU (detail)"] == "0.125"
    assert row["box / target area: mean"] == "355.00" and row["box / target area: median"] == "1.50"
    assert row["no box (detail)"] == "1/3"
    base_row = dict(zip(header, (c.strip() for c in lines[2].strip("|").split("|"))))
    assert base_row["box IoU (detail)"] == "–" and base_row["no box (detail)"] == "–"


# --- no --out: nothing written into benchmarks/results/ ---------------------------------------------------------
def _snapshot() -> dict:
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(RESULTS.iterdir()) if p.is_file()}


def test_default_out_is_outside_the_results(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for module in (bench, speed):
        out = module.default_out()
        assert out.parent == tmp_path / "qzoom-bench" and RESULTS not in out.parents
        assert module.RESULTS_OUT.parent == RESULTS and module.RESULTS_OUT.name == out.name


def test_zoomworld_quick_without_out_leaves_results_alone(tmp_path, monkeypatch, capsys):
    from qzoom_adapters.benchmarks.zoomworld.shipped import write_untrained_default

    model = write_untrained_default(tmp_path / "m")
    monkeypatch.setattr(bench, "git_commit", lambda: "c0ffee")
    monkeypatch.chdir(tmp_path)
    before = _snapshot()
    assert main(["bench", "zoomworld", "--quick", "--n", "2", "--batch-size", "2", "--model", str(model)]) == 0
    assert _snapshot() == before
    out = tmp_path / "qzoom-bench" / "zoomworld_bench.json"
    assert out.with_suffix(".md").is_file() and out.with_suffix(".png").is_file()
    q = json.loads(out.read_text())["qzoom"][0]
    assert q["boxes_scored"] + q["detail_without_box"] == q["detail_samples"] > 0
    assert 0.0 <= q["box_iou_mean"] <= 1.0
    assert q["box_target_area_ratio_mean"] is None or q["box_target_area_ratio_mean"] > 0
    printed = capsys.readouterr().out
    assert "box IoU (detail)" in printed and str(out) in printed and "benchmarks/results/ is left alone" in printed


def test_speed_quick_without_out_leaves_results_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(speed, "git_commit", lambda: "c0ffee")
    monkeypatch.chdir(tmp_path)
    before = _snapshot()
    assert main(["bench", "speed", "--quick", "--budgets", "16", "--batch-sizes", "1"]) == 0
    assert _snapshot() == before
    out = tmp_path / "qzoom-bench" / "speed.json"
    assert len(json.loads(out.read_text())["rows"]) == 1 and out.with_suffix(".md").is_file()
    assert str(out) in capsys.readouterr().out
