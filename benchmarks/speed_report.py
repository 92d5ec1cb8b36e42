"""The speed bench's report: the issue's target ratios from one run's rows, the Markdown table and the latency plot.

Row keys (see `speed.measure_config`): `plain` (HF generate), `plain_fast` (HF generate inside
`fast_vision_attention`, batch 1), and per vision setting the pipeline's modes: `plain_ours`, `not_zoomed`,
`zoomed`, `fire50` with the model's own vision path, and the same names with `_fast` with the fast path
(`speed.FAST`: packed vision attention + crop preprocessing on the device). Rows at batch > 1 hold `fire50` and, for
the fast path, `plain_ours_fast` (the baseline the fast ratios need); batch 1 holds them all.
"""
from __future__ import annotations

from qzoom_adapters.benchmarks.plots import line_plot

VISION_SETTINGS = {"model": "", "fast": "_fast"}  # name -> key suffix
DECODE_FLOOR_TARGETS = {"qwen2_5_vl_7b": 1.5, "qwen3_vl_4b": 2.0}  # decode step / HBM floor at batch 1, at most


def _find(rows, backbone, budget, batch, n):
    return next((r for r in rows if (r["backbone"], r["budget"], r["batch"], r["new_tokens"]) == (backbone, budget,
                                                                                                   batch, n)), None)


def _latency(row, key):
    return row[key]["latency_s"] if row is not None and key in row else None


def _ratio(a, b):
    return a / b if a is not None and b is not None else None


def _target(measured, target: float, at_least: bool) -> dict:
    """One target: its measured value (or per-config values: met when every one is) against the bound."""
    values = list(measured.values()) if isinstance(measured, dict) else [measured]
    values = [v for v in values if v is not None]
    met = (all(v >= target for v in values) if at_least else all(v <= target for v in values)) if values else None
    return {"measured": measured, "target": target, "bound": ">=" if at_least else "<=", "met": met}


def summarise_targets(rows: list[dict]) -> dict:
    """The issue's targets, per vision setting ("model", "fast"), from the rows that are there (None where missing).

    * zoomed at the low budget vs plain HF generate at the high budget (batch 1, fewest new tokens): >= 4x;
    * the same vs the plain model with this library's decoder and the same vision path at the high budget: >= 2x;
    * batch 8 vs batch 1 throughput, 50% zoomed: >= 4x at the low budget, >= 3x at the high one (batch 4 and 16 are
      reported beside them);
    * not-zoomed overhead over the plain model with our decoder and the same vision path: <= 3% at every budget;
    * decode step / measured HBM floor at batch 1: <= 1.5x (Qwen2.5-VL-7B), <= 2x (Qwen3-VL-4B).
    """
    backbone = "qwen2_5_vl_7b" if any(r["backbone"] == "qwen2_5_vl_7b" for r in rows) else rows[0]["backbone"]
    n = min(r["new_tokens"] for r in rows)
    budgets = sorted({r["budget"] for r in rows if r["backbone"] == backbone})
    lo, hi = (576, 4096) if {576, 4096} <= set(budgets) else (budgets[0], budgets[-1])
    out = {"backbone": backbone, "low_budget": lo, "high_budget": hi, "new_tokens": n}
    z, p = _find(rows, backbone, lo, 1, n), _find(rows, backbone, hi, 1, n)
    for name, s in VISION_SETTINGS.items():
        t = {}
        t["zoomed_low_vs_plain_generate_high"] = _target(_ratio(_latency(p, "plain"), _latency(z, "zoomed" + s)), 4.0,
                                                         True)
        end = (p["plain"]["end_to_end_s"] / z["zoomed" + s]["end_to_end_s"]) if z and p and "zoomed" + s in z else None
        t["zoomed_low_vs_plain_generate_high"]["end_to_end"] = end
        t["zoomed_low_vs_plain_ours_high"] = _target(_ratio(_latency(p, "plain_ours" + s), _latency(z, "zoomed" + s)),
                                                     2.0, True)
        scale = {b: {} for b in (lo, hi)}
        for r in rows:
            one = _find(rows, r["backbone"], r["budget"], 1, r["new_tokens"])
            if (r["backbone"], r["new_tokens"]) == (backbone, n) and r["budget"] in scale and one and r["batch"] > 1:
                key = "fire50" + s
                if key in r and key in one:
                    scale[r["budget"]][r["batch"]] = r[key]["samples_per_s"] / one[key]["samples_per_s"]
        for b, bound in ((lo, 4.0), (hi, 3.0)):
            t[f"batch8_vs_batch1_fire50@{b}"] = {**_target(scale[b].get(8), bound, True), "per_batch": scale[b]}
        over = {}
        for r in rows:
            if r["batch"] == 1 and r["new_tokens"] == n and "not_zoomed" + s in r:
                over[f"{r['backbone']}@{r['budget']}"] = _latency(r, "not_zoomed" + s) / _latency(r, "plain_ours" + s) - 1
        t["not_zoomed_overhead_vs_plain_ours"] = _target(over, 0.03, False)
        out[name] = t
    out["decode_step_vs_hbm_floor_bs1"] = {
        bb: _target({f"{r['backbone']}@{r['budget']}/{r['new_tokens']}": r["decode_vs_floor"].get("not_zoomed")
                     for r in rows if r["backbone"] == bb and r["batch"] == 1 and "decode_vs_floor" in r},
                    DECODE_FLOOR_TARGETS.get(bb, 2.0), False)
        for bb in sorted({r["backbone"] for r in rows})}
    return out


# --- Markdown ----------------------------------------------------------------------------------------------------
def ms(x) -> str:
    return "–" if x is None else f"{1000 * x:.1f}"


def ratio(x) -> str:
    return "–" if x is None else f"{x:.2f}x"


COLUMNS = ("backbone", "budget", "batch", "new tok", "plain (HF generate)", "plain, HF generate, fast vision",
           "plain, our decode / fast", "not zoomed / fast", "zoomed / fast", "50% zoomed / fast", "decode/token ours",
           "decode floor", "prefill floor", "zoomed (fast): vision / pass A / gate / twig / crop+enc / RoI pass / decode")
STAGES = ("vision", "pass_a", "gate", "twig", "crop_encode", "roi_pass", "decode")


def _pair(r, key) -> str:
    return f"{ms(_latency(r, key))} / {ms(_latency(r, key + '_fast'))}"


def _met(t: dict) -> str:
    return {True: "met", False: "not met", None: "not measured"}[t["met"]]


def _values(measured, fmt) -> str:
    if isinstance(measured, dict):
        return ", ".join(f"{k}: {fmt(v)}" for k, v in measured.items()) or "–"
    return fmt(measured)


def target_lines(targets: dict) -> list[str]:
    """One line per target and vision setting: measured value(s), the bound, met or not."""
    lo, hi = targets["low_budget"], targets["high_budget"]
    lines = []
    for name in VISION_SETTINGS:
        t = targets[name]
        z = t["zoomed_low_vs_plain_generate_high"]
        lines += [f"* [{name} vision] zoomed @{lo} vs plain HF generate @{hi} (batch 1, {targets['new_tokens']} "
                  f"tokens): {ratio(z['measured'])}, {ratio(z['end_to_end'])} with the host preprocessing of the "
                  f"global view (target >= 4x): {_met(z)}",
                  f"* [{name} vision] zoomed @{lo} vs plain model + our decoder + the same vision @{hi}: "
                  f"{ratio(t['zoomed_low_vs_plain_ours_high']['measured'])} (target >= 2x): "
                  f"{_met(t['zoomed_low_vs_plain_ours_high'])}"]
        for b, bound in ((lo, 4), (hi, 3)):
            s = t[f"batch8_vs_batch1_fire50@{b}"]
            per = ", ".join(f"bs{k}: {ratio(v)}" for k, v in sorted(s["per_batch"].items())) or "–"
            lines.append(f"* [{name} vision] throughput vs batch 1, 50% zoomed, @{b}: {per} (target bs8 >= {bound}x): "
                         f"{_met(s)}")
        o = t["not_zoomed_overhead_vs_plain_ours"]
        lines.append(f"* [{name} vision] not-zoomed overhead over the plain model + our decoder: "
                     f"{_values(o['measured'], lambda v: f'{v:+.1%}')} (target <= +3%): {_met(o)}")
    for bb, d in targets["decode_step_vs_hbm_floor_bs1"].items():
        lines.append(f"* decode step / HBM floor, batch 1, {bb}: {_values(d['measured'], ratio)} (target <= "
                     f"{d['target']}x): {_met(d)}")
    return lines


def markdown_table(report: dict) -> str:
    lines = ["Latency per batch in ms (median); `a / b`: the model's own vision path / the fast path (packed vision "
             "attention + crops preprocessed on the device).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in report["rows"]:
        key = "zoomed_fast" if "zoomed_fast" in r else "fire50_fast"
        st = r.get(key, {}).get("stages_s", {})
        decode = r["decode_per_token_s"].get("not_zoomed", r["decode_per_token_s"].get("plain_ours_fast"))
        cells = [r["backbone"], str(r["budget"]), str(r["batch"]), str(r["new_tokens"]), ms(_latency(r, "plain")),
                 ms(_latency(r, "plain_fast")), _pair(r, "plain_ours"), _pair(r, "not_zoomed"), _pair(r, "zoomed"),
                 _pair(r, "fire50"), ms(decode), ms(r.get("decode_floor_s")), ms(r.get("prefill_floor_s")),
                 " / ".join(ms(st.get(k)) for k in STAGES)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Targets (ratios from this run):", "", *target_lines(report["targets"])]
    lines += ["", *closeness_lines(report.get("vision_closeness", {})), *crop_lines(report.get("crop_preprocess", {}))]
    m, f = report["meta"], report["floors"]
    lines += ["", f"{m['machine']['device_name']} ({m['machine']['device']}), torch {m['torch']}, transformers "
                  f"{m['transformers']}, commit {m['git_commit'] or 'unknown'}, {m['dtype']}, random weights. "
                  f"Measured in the same run: matmul {f['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s, copy "
                  f"{f['copy_bytes_per_s'] / 1e9:.0f} GB/s. Skipped (time): {len(report['skipped'])} configs."]
    return "\n".join(lines) + "\n"


def closeness_lines(closeness: dict) -> list[str]:
    lines = []
    for name, per_budget in closeness.items():
        if "error" in per_budget:
            lines.append(f"* vision features, {name}: the fast path failed ({per_budget['error']})")
            continue
        for budget, c in per_budget.items():
            parts = [f"{dt}: max {v['max_abs']:.3g} / mean {v['mean_abs']:.3g} ({v['path']})"
                     for dt, v in c["fast_vs_sdpa"].items()]
            ref = c.get("bf16_vs_fp32_sdpa", {})
            tower = c.get("tower_ms", {})
            lines.append(f"* vision features, {name} @{budget}, fast vs sdpa: " + "; ".join(parts)
                         + (f"; vs the fp32 sdpa features, bf16 sdpa max {ref['sdpa']:.3g}, bf16 fast max "
                            f"{ref['fast']:.3g}" if ref else "")
                         + (f"; tower alone (bf16) sdpa {tower['sdpa']:.1f} ms, fast {tower['fast']:.1f} ms"
                            if tower else ""))
    return lines


def crop_lines(crop: dict) -> list[str]:
    lines = []
    for name, c in crop.items():
        if not c.get("available"):
            lines.append(f"* crop preprocessing on the device, {name}: not available ({c.get('reason', c.get('error'))})")
            continue
        lines.append(f"* crop preprocessing on the device, {name} @{c['budget']}: pixel_values max abs diff "
                     f"{c['max_abs']:.3g} (mean {c['mean_abs']:.3g}), grids equal: {c['grids_equal']}; host "
                     f"{c['host_ms']:.1f} ms, device {c['device_ms']:.1f} ms for {c['crops']} crops; answers equal: "
                     f"{c['answers_equal']}/{c['answers']} rows, token agreement {c['token_agreement']:.1%}")
    return lines


def latency_plot(report: dict, backbone: str):
    """Latency (ms) against visual tokens read per sample, batch 1, shortest answer: plain vs the pipeline."""
    n = min(r["new_tokens"] for r in report["rows"])
    rows = sorted((r for r in report["rows"] if r["backbone"] == backbone and r["batch"] == 1 and r["new_tokens"] == n),
                  key=lambda r: r["budget"])
    series = {"plain": [(r["visual_tokens"], 1000 * r["plain"]["latency_s"], str(r["budget"])) for r in rows],
              "not zoomed": [(r["visual_tokens"], 1000 * r["not_zoomed"]["latency_s"], "") for r in rows],
              "zoomed": [(r["zoomed"]["visual_tokens"], 1000 * r["zoomed"]["latency_s"], str(r["budget"])) for r in rows],
              "zoomed, fast vision": [(r["zoomed_fast"]["visual_tokens"], 1000 * r["zoomed_fast"]["latency_s"], "")
                                      for r in rows if "zoomed_fast" in r]}
    y_max = max(y for pts in series.values() for _, y, _ in pts) * 1.1
    return line_plot(series, f"{backbone}, batch 1, {n} new tokens: latency vs visual tokens", y_label="ms",
                     y_max=y_max, x_label="visual tokens read per sample (log scale)")
