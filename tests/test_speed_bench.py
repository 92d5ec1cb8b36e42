"""`qzoom bench speed --quick` on CPU: a well-formed report whose numbers hang together."""
from __future__ import annotations

import json

import pytest
import torch

from qzoom_adapters.benchmarks import speed
from qzoom_adapters.recipes.cli import main


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed") / "speed.json"
    assert main(["bench", "speed", "--quick", "--out", str(out)]) == 0
    return out, json.loads(out.read_text())


def test_quick_report_is_well_formed(quick_report):
    out, report = quick_report
    q = speed.QUICK
    assert len(report["rows"]) == len(q["budgets"]) * len(q["batch_sizes"]) * len(q["new_tokens"])
    assert out.with_suffix(".md").read_text().count("| tiny_qwen2_5_vl |") == len(report["rows"])
    assert out.with_name("speed_tiny_qwen2_5_vl.png").is_file()
    assert report["floors"]["matmul_flops_per_s"] > 0 and report["floors"]["copy_bytes_per_s"] > 0
    for row in report["rows"]:
        for mode in speed.MODES:
            assert row[mode]["latency_s"] > 0
            assert row[mode]["samples_per_s"] == pytest.approx(row["batch"] / row[mode]["latency_s"])
        zoomed, plain = row["zoomed"], row["not_zoomed"]
        assert zoomed["zoomed"] == row["batch"] and plain["zoomed"] == 0
        assert zoomed["tokens_per_row"] == [row["new_tokens"]]  # EOS off: every row decodes all its tokens
        assert set(zoomed["stages_s"]) == {"vision", "pass_a", "gate", "twig", "crop_encode", "roi_pass", "decode",
                                           "other_host"}
        assert "crop_encode" not in plain["stages_s"] and "direct_pass" in plain["stages_s"]
        assert sum(zoomed["stages_s"].values()) == pytest.approx(zoomed["latency_s"], rel=0.05)
        assert 0 < zoomed["box_area_share"] < 1
        assert zoomed["visual_tokens"] > row["visual_tokens"]  # the crop's tokens come on top
        assert row["prefill_flops"] > 0 and row["prefill_floor_s"] > 0 and row["decode_floor_s"] > 0
    t = report["targets"]
    assert set(t["not_zoomed_overhead"]["per_config"]) == {f"tiny_qwen2_5_vl@{b}" for b in q["budgets"]}


def _row(report, budget, batch=1):
    n = min(speed.QUICK["new_tokens"])
    found = [r for r in report["rows"] if (r["budget"], r["batch"], r["new_tokens"]) == (budget, batch, n)]
    assert len(found) == 1, f"{len(found)} rows for budget {budget}, batch {batch}, {n} new tokens"
    return found[0]


def test_quick_report_targets_are_the_ratios_of_their_rows(quick_report):
    """The headline speedup is plain generate at the high budget over zoomed at the low one, recomputed from the
    rows; so are the not-zoomed overheads."""
    _, report = quick_report
    q, t = speed.QUICK, report["targets"]
    lo, hi = min(q["budgets"]), max(q["budgets"])
    target = t["zoomed_low_vs_plain_high"]
    assert (target["zoomed_budget"], target["plain_budget"], target["new_tokens"]) == (lo, hi, min(q["new_tokens"]))
    zoomed, plain = _row(report, lo)["zoomed"], _row(report, hi)["plain"]
    assert target["speedup"] == pytest.approx(plain["latency_s"] / zoomed["latency_s"], rel=1e-9)
    assert target["speedup_end_to_end"] == pytest.approx(plain["end_to_end_s"] / zoomed["end_to_end_s"], rel=1e-9)
    assert target["speedup"] != pytest.approx(_row(report, lo)["plain"]["latency_s"] / zoomed["latency_s"], rel=1e-9)
    for b in q["budgets"]:
        row = _row(report, b)
        over = t["not_zoomed_overhead"]["per_config"][f"tiny_qwen2_5_vl@{b}"]
        assert over["vs_plain_generate"] == pytest.approx(row["not_zoomed"]["latency_s"] / row["plain"]["latency_s"] - 1)
        assert over["vs_plain_ours (gate cost)"] == pytest.approx(
            row["not_zoomed"]["latency_s"] / row["plain_ours"]["latency_s"] - 1)


def test_plan_puts_target_configs_first():
    cfgs = speed.plan((256, 576, 4096), (1, 8, 16), (16, 64))
    assert len(cfgs) == len(set(cfgs)) == 18
    assert cfgs[:3] == [(256, 1, 16), (576, 1, 16), (4096, 1, 16)]
    assert set(cfgs[3:7]) >= {(576, 8, 16), (4096, 8, 16)}


def test_decode_bytes_count_weights_once_and_kv_per_row():
    bb = speed.build_backbone("tiny_qwen2_5_vl", torch.device("cpu"), torch.float32, "sdpa")
    cfg = bb.spec.text_config
    w = sum(p.numel() * 4 for p in bb.spec.layers.parameters()) + sum(p.numel() * 4 for p in bb.spec.norm.parameters())
    w += bb.spec.lm_head.weight.numel() * 4
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert speed.decode_bytes_per_step(bb, 3, 100) == w + 3 * 100 * kv


def test_fixed_box_spec_keeps_a_centred_box(qwen25):
    spec = speed.fixed_box_spec(qwen25.zoom().spec)
    keep = spec.sink_mask(20, 28)
    rows, cols = keep.nonzero(as_tuple=True)
    assert keep.sum() > 0 and 0 < rows.min() and rows.max() < 19 and 0 < cols.min() and cols.max() < 27
    assert abs((rows.min() + rows.max()) / 2 - 9.5) <= 1 and abs((cols.min() + cols.max()) / 2 - 13.5) <= 1
    assert spec.sink_mask(1, 1).sum() == 1
