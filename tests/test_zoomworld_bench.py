"""`qzoom bench zoomworld`: a well-formed report, table and plot from a quick run; the box measurement when the
gate skips; the PIL Pareto plot."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from qzoom_adapters.benchmarks.zoomworld import bench
from qzoom_adapters.benchmarks.plots import PLOT_SIZE, SERIES_COLOURS, LogXFrame, line_plot
from qzoom_adapters.benchmarks.zoomworld.bench import run_baseline, run_qzoom
from qzoom_adapters.benchmarks.zoomworld.generator import split
from qzoom_adapters.benchmarks.zoomworld.shipped import load_default, write_untrained_default
from qzoom_adapters.recipes.cli import main


def _rate(value) -> bool:
    return value is None or 0.0 <= value <= 1.0


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_untrained_default(tmp_path_factory.mktemp("zoomworld") / "m")


def test_bench_quick_writes_report_table_and_plot(model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "git_commit", lambda: "c0ffee")  # no git subprocess in tests
    out = tmp_path / "b.json"
    assert main(["bench", "zoomworld", "--quick", "--model", str(model), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    meta = report["meta"]
    assert meta["git_commit"] == "c0ffee" and meta["n"] == 8 and meta["record"] == {"untrained": True}
    assert meta["model_dir"] == str(model) and meta["machine"]["cpu_count"] >= 1
    assert {"torch", "transformers", "zoom_config"} <= set(meta)
    assert [r["budget"] for r in report["baseline"]] == [64, 256] and [r["budget"] for r in report["qzoom"]] == [64]
    for row in report["baseline"] + report["qzoom"]:
        assert {"all", "detail", "global"} <= set(row["accuracy"])
        assert all(0.0 <= a <= 1.0 for a in row["accuracy"].values())
        assert row["visual_tokens"] > 0 and row["latency_s"] > 0
    base64, q = report["baseline"][0], report["qzoom"][0]
    assert q["visual_tokens"] >= base64["visual_tokens"]  # the same global view, plus the crop where zoomed
    assert (q["visual_tokens"] > base64["visual_tokens"]) == (q["zoom_rate"] > 0)
    assert base64["visual_tokens"] < report["baseline"][1]["visual_tokens"]
    n_detail = sum(s.family == "detail" for s in split("test", 8))
    assert q["boxes_scored"] + q["detail_without_box"] == n_detail  # every detail question gets a box or a miss
    assert q["detail_samples"] == n_detail and 0.0 <= q["box_iou_mean"] <= 1.0  # no box counts IoU 0
    for key in ("box_iou_mean_with_box", "box_target_area_ratio_mean", "box_target_area_ratio_median"):
        assert (q[key] is None) == (q["boxes_scored"] == 0) and (q[key] is None or q[key] >= 0)
    assert all(_rate(v) for v in (q["zoom_rate"], q["box_hit_rate"], *q["gate"].values()) if not isinstance(v, int))
    with Image.open(out.with_suffix(".png")) as png:
        assert png.size == PLOT_SIZE
    table = out.with_suffix(".md").read_text().splitlines()
    assert sum(line.startswith("| baseline | ") for line in table) == 2
    assert sum(line.startswith("| Q-Zoom | ") for line in table) == 1
    assert "commit c0ffee" in table[-1]
    assert "box IoU (detail)" in table[0] and "box / target area: median" in table[0] and "no box (detail)" in table[0]
    assert "| Q-Zoom | 64 |" in capsys.readouterr().out


def test_skipped_detail_questions_still_get_the_twig_box(model):
    """A gate that never fires: no zoom, the global view's tokens only, and boxes from the forced run."""
    zoom, spec, processor = load_default(model, gate_threshold=2.0)
    samples = split("test", 4)
    base, correct = run_baseline(zoom.model, processor, spec, samples, 64, 4, torch.device("cpu"))
    q = run_qzoom(zoom, processor, samples, 64, 4, torch.device("cpu"), correct)
    assert zoom.config.gate_threshold == 2.0 and zoom.config.crop_max_pixels is None  # restored
    assert q["zoom_rate"] == 0.0 and q["visual_tokens"] == base["visual_tokens"]
    n_detail = sum(s.family == "detail" for s in samples)
    assert n_detail and q["boxes_scored"] + q["detail_without_box"] == n_detail and q["boxes_scored"] > 0
    gate = q["gate"]
    assert gate["fire_rate_detail"] == 0.0 and gate["detail_baseline_wrong"] == n_detail - sum(
        ok for s, ok in zip(samples, correct) if s.family == "detail")
    assert gate["skip_rate_global"] in (None, 1.0)


def test_pareto_plot_maps_points_inside_and_in_order():
    series = {"baseline": [(54, 0.1, "64"), (240, 0.35, "256"), (1000, 0.9, "1024")], "Q-Zoom": [(90, 0.6, "64")]}
    img = line_plot(series, "test")
    frame = LogXFrame([x for points in series.values() for x, _, _ in points])
    assert img.size == frame.size and (frame.lo, frame.hi) == (32, 1024)
    for name, points in series.items():
        for x, y, _ in points:
            px, py = frame.to_pixel(x, y)
            assert frame.left <= px <= frame.right and frame.top <= py <= frame.bottom
            assert img.getpixel((round(px), round(py))) == SERIES_COLOURS[name]  # the point is drawn there
    xs = [frame.to_pixel(x, 0.5)[0] for x in (32, 54, 64, 128, 256, 1000, 1024)]
    assert xs == sorted(xs) and len(set(xs)) == len(xs)
    assert (xs[0], xs[-1]) == (frame.left, frame.right)
    assert xs[3] - xs[2] == pytest.approx(xs[4] - xs[3])  # log scale: doublings are equally wide
    assert (frame.to_pixel(64, 0.0)[1], frame.to_pixel(64, 1.0)[1]) == (frame.bottom, frame.top)
