"""`qzoom bench speed --quick` on CPU: a well-formed report whose numbers hang together, with the fast vision path
on and off, the issue's target ratios recomputed from the rows, vision-attention closeness and the crop comparison."""
from __future__ import annotations

import contextlib
import importlib.util
import json

import pytest
import torch

from qzoom_adapters.benchmarks import speed, speed_report
from qzoom_adapters.recipes.cli import main

STAGES_ZOOMED = {"vision", "pass_a", "gate", "twig", "crop_encode", "roi_pass", "decode", "other_host"}


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed") / "speed.json"
    with pytest.warns(UserWarning, match="crop_preprocess='device'") if not _has_torchvision() \
            else contextlib.nullcontext():
        assert main(["bench", "speed", "--quick", "--out", str(out)]) == 0
    return out, json.loads(out.read_text())


def _has_torchvision() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def _row(report, budget, batch=1):
    n = min(speed.QUICK["new_tokens"])
    found = [r for r in report["rows"] if (r["budget"], r["batch"], r["new_tokens"]) == (budget, batch, n)]
    assert len(found) == 1, f"{len(found)} rows for budget {budget}, batch {batch}, {n} new tokens"
    return found[0]


def test_quick_report_is_well_formed(quick_report):
    out, report = quick_report
    q = speed.QUICK
    assert len(report["rows"]) == len(q["budgets"]) * len(q["batch_sizes"]) * len(q["new_tokens"])
    assert out.with_suffix(".md").read_text().count("| tiny_qwen2_5_vl |") == len(report["rows"])
    assert out.with_name("speed_tiny_qwen2_5_vl.png").is_file()
    assert report["floors"]["matmul_flops_per_s"] > 0 and report["floors"]["copy_bytes_per_s"] > 0
    depth = speed.build_backbone("tiny_qwen2_5_vl", torch.device("cpu"), torch.float32, "sdpa").model.config \
        .vision_config.depth
    for row in report["rows"]:
        B = row["batch"]
        measured = (["plain", "plain_fast"] if B == 1 else ["plain"]) + speed.modes_at(B)
        for mode in measured + ["fire50", "fire50_fast"]:
            assert row[mode]["latency_s"] > 0
            assert row[mode]["samples_per_s"] == pytest.approx(B / row[mode]["latency_s"])
        for mode in measured:
            assert 1 <= row[mode]["runs"] <= speed.QUICK["repeats"]
        for mode in speed.modes_at(B):
            m, stages = row[mode], set(row[mode]["stages_s"])
            zoomed = {"plain_ours": 0, "not_zoomed": 0, "zoomed": B, "fire50": (B + 1) // 2}[mode.removesuffix("_fast")]
            assert m["zoomed"] == zoomed and m["tokens_per_row"] == [row["new_tokens"]]  # EOS off: all tokens
            if zoomed:  # a mixed batch (50% zoomed) also runs the direct path for its other rows
                assert stages == (STAGES_ZOOMED if zoomed == B else STAGES_ZOOMED | {"direct_pass"})
            else:
                assert "crop_encode" not in stages and "direct_pass" in stages
            assert sum(m["stages_s"].values()) == pytest.approx(m["latency_s"], rel=0.05)
            if mode.endswith("_fast"):  # the packed attention ran: one call per layer and vision call (CPU: per segment)
                assert m["vision_attention_calls"] == {"per_segment": depth * (2 if zoomed else 1)}
            else:
                assert "vision_attention_calls" not in m
            if zoomed:
                assert 0 < m["box_area_share"] < 1 and m["visual_tokens"] > row["visual_tokens"]
                assert m["crop_preprocess"] == ("device" if mode.endswith("_fast") and _has_torchvision() else "host")
        assert row["prefill_flops"] > 0 and row["prefill_floor_s"] > 0 and row["decode_floor_s"] > 0
    assert set(report["targets"]["model"]["not_zoomed_overhead_vs_plain_ours"]["measured"]) == {
        f"tiny_qwen2_5_vl@{b}" for b in q["budgets"]}


def test_quick_report_targets_are_the_ratios_of_their_rows(quick_report):
    """Every target is recomputed from the rows: zoomed at the low budget against both baselines at the high one, the
    not-zoomed overheads and the batch scaling, for each vision setting."""
    _, report = quick_report
    q, t = speed.QUICK, report["targets"]
    lo, hi = min(q["budgets"]), max(q["budgets"])
    assert (t["low_budget"], t["high_budget"], t["new_tokens"]) == (lo, hi, min(q["new_tokens"]))
    for name, s in speed_report.VISION_SETTINGS.items():
        z, p = _row(report, lo)["zoomed" + s], _row(report, hi)
        g = t[name]["zoomed_low_vs_plain_generate_high"]
        assert g["measured"] == pytest.approx(p["plain"]["latency_s"] / z["latency_s"], rel=1e-9)
        assert g["end_to_end"] == pytest.approx(p["plain"]["end_to_end_s"] / z["end_to_end_s"], rel=1e-9)
        assert g["met"] == (g["measured"] >= 4.0) and g["bound"] == ">="
        ours = t[name]["zoomed_low_vs_plain_ours_high"]["measured"]
        assert ours == pytest.approx(p["plain_ours" + s]["latency_s"] / z["latency_s"], rel=1e-9)
        for b in q["budgets"]:
            one, two = _row(report, b), _row(report, b, 2)
            over = t[name]["not_zoomed_overhead_vs_plain_ours"]["measured"][f"tiny_qwen2_5_vl@{b}"]
            assert over == pytest.approx(one["not_zoomed" + s]["latency_s"] / one["plain_ours" + s]["latency_s"] - 1)
            scale = t[name][f"batch8_vs_batch1_fire50@{b}"]
            assert scale["per_batch"] == {"2": pytest.approx(two["fire50" + s]["samples_per_s"]
                                                             / one["fire50" + s]["samples_per_s"])}
            assert scale["measured"] is None and scale["met"] is None  # no batch 8 in a quick run
            assert one["fire50" + s]["latency_s"] == pytest.approx(
                (one["zoomed" + s]["latency_s"] + one["not_zoomed" + s]["latency_s"]) / 2)
    table = speed_report.markdown_table(report)
    assert all(line in table for line in speed_report.target_lines(t))


def test_quick_report_has_the_closeness_and_crop_comparison(quick_report):
    _, report = quick_report
    closeness = report["vision_closeness"]["tiny_qwen2_5_vl/sdpa"]
    assert set(closeness) == {str(b) for b in speed.QUICK["budgets"]}
    for c in closeness.values():
        for dtype in ("float32", "bfloat16"):  # on CPU the fallback is the model's own per-segment sdpa: equal
            d = c["fast_vs_sdpa"][dtype]
            assert (d["max_abs"], d["mean_abs"], d["path"]) == (0.0, 0.0, "per_segment") and d["ref_max_abs"] > 0
        assert 0 < c["bf16_vs_fp32_sdpa"]["sdpa"] == c["bf16_vs_fp32_sdpa"]["fast"]
    crop = report["crop_preprocess"]["tiny_qwen2_5_vl/sdpa"]
    if _has_torchvision():
        assert crop["available"] and crop["grids_equal"]
    else:
        assert crop["available"] is False and crop["budget"] == min(speed.QUICK["budgets"])
        assert "torchvision not installed" in crop["reason"]


def test_targets_are_met_only_when_every_value_is_within_its_bound():
    assert speed_report._target(4.2, 4.0, True)["met"] is True
    assert speed_report._target({"a": 0.01, "b": 0.05}, 0.03, False)["met"] is False
    assert speed_report._target({"a": 0.01, "b": None}, 0.03, False)["met"] is True
    assert speed_report._target(None, 2.0, True)["met"] is None


def test_plan_puts_target_configs_first_and_skips_by_prediction():
    cfgs = speed.plan((256, 576, 4096), (1, 8, 16), (16, 64))
    assert len(cfgs) == len(set(cfgs)) == 18
    assert cfgs[:3] == [(256, 1, 16), (576, 1, 16), (4096, 1, 16)]
    assert set(cfgs[3:7]) >= {(576, 8, 16), (4096, 8, 16)}
    assert speed._predicted_s({4096: (8, 30.0)}, 4096, 16) == 60.0  # scaled by batch from the last one measured
    assert speed._predicted_s({4096: (8, 30.0)}, 4096, 4) == 30.0 and speed._predicted_s({}, 576, 8) is None
    assert speed.modes_at(1) == ["plain_ours", "not_zoomed", "zoomed", "plain_ours_fast", "not_zoomed_fast",
                                 "zoomed_fast"]
    assert speed.modes_at(8) == ["fire50", "plain_ours_fast", "fire50_fast"]
    assert len(speed.modes_at(8, every_mode=True)) == 8
    assert speed.modes_at(8, fast=False) == ["fire50"] and "zoomed_fast" not in speed.modes_at(1, fast=False)


def test_targets_without_the_fast_path_are_reported_as_not_measured(quick_report):
    """A run whose fast path could not be selected (its rows hold no `_fast` keys) still reports every target."""
    _, report = quick_report
    rows = [{k: v for k, v in r.items() if not k.endswith("_fast")} for r in report["rows"]]
    t = speed_report.summarise_targets(rows)
    assert t["fast"]["zoomed_low_vs_plain_generate_high"]["met"] is None
    assert t["fast"]["not_zoomed_overhead_vs_plain_ours"]["measured"] == {}
    assert json.loads(json.dumps(t["model"])) == report["targets"]["model"]  # JSON keys are strings
    assert "not measured" in "\n".join(speed_report.target_lines(t))


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


@torch.no_grad()
def test_vision_closeness_leaves_the_model_exactly_as_it_was(one_thread):
    """The closeness step casts the tower's parameters to each dtype and puts the very same tensors back."""
    from qzoom_adapters.benchmarks.vision_closeness import vision_closeness

    bb = speed.build_backbone("tiny_qwen2_5_vl", torch.device("cpu"), torch.float32, "sdpa")
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    storage = [(p.data_ptr(), p.dtype) for p in bb.model.parameters()]
    out = vision_closeness(bb, speed.source_image(quick=True), [16], torch.device("cpu"),
                           lambda images, budget: speed.processed(bb, images, budget, "cpu"))
    assert out["16"]["fast_vs_sdpa"]["bfloat16"]["path"] == "per_segment"
    assert [(p.data_ptr(), p.dtype) for p in bb.model.parameters()] == storage  # the same tensors
    after = bb.model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
