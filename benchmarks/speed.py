"""`qzoom bench speed`: wall-clock of the plain backbone and of the Q-Zoom pipeline at real model shapes.

No real weights exist here, but real shapes do: Qwen2.5-VL-7B and Qwen3-VL-4B are built from their public
configs with random weights (bf16 on CUDA). Random weights make the gate's decision arbitrary, so every run
forces it (`force_zoom`), and the box is fixed (`boxes=`, `forced_box.centred_box`: a centred box a quarter of each side
of the image, 6-7% of its area, reported per row as `box_area_share`; the twig still runs). The crop is re-encoded at the crop
budget = the global budget, so a zoomed sample reads about 2x the budget in visual tokens.

Per backbone, attention implementation, visual-token budget, batch size and number of new tokens (EOS off):

* `plain`: the unmodified model, HF `generate` (greedy);
* `plain_ours`: the pipeline without a gate and never zooming (pass A + layers K..L-1 + our decode loop), i.e.
  the plain model with this library's decoder;
* `not_zoomed` / `zoomed` / `fire50`: the gated pipeline with the gate's decision forced off / on / on for
  every other sample (at batch 1, `fire50` is the mean of `zoomed` and `not_zoomed`: half the requests zoom).

Times are device-synchronised medians of `repeats` runs after one warm-up, from processed inputs on the device
to token ids (`prep_s`, the processor on the host, is reported beside them). The pipeline's stages come from
`qzoom_adapters.timing.StageTimer` (CUDA events). Two floors are measured in the same run: prefill FLOPs
(counted by torch's FlopCounterMode on the plain forward) / the measured bf16 matmul rate, and decode bytes per
step (decoder weights + the KV cache read) / the measured device copy bandwidth.

Writes a JSON report, a Markdown table and a latency plot (PNG) side by side: by default in `./qzoom-bench/` of the
current directory (`default_out`), never in `benchmarks/results/` (whose committed files the README links) unless
`out` points there.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qzoom_adapters.benchmarks.forced_box import centred_box, with_sink_mask
from qzoom_adapters.benchmarks.plots import line_plot
from qzoom_adapters.benchmarks.provenance import git_commit, machine

RESULTS_OUT = Path(__file__).resolve().parent / "results" / "speed.json"  # the committed results


def default_out() -> Path:
    """Where a run without an explicit `out` writes: `./qzoom-bench/speed.json` in the current directory. Only an
    explicit `out` (e.g. `RESULTS_OUT`) replaces the committed results in benchmarks/results/."""
    return Path.cwd() / "qzoom-bench" / RESULTS_OUT.name

BUDGETS = (256, 576, 1024, 2048, 4096)
BATCH_SIZES = (1, 4, 8, 16)
NEW_TOKENS = (16, 64)
MODES = ("plain", "plain_ours", "not_zoomed", "zoomed", "fire50")
QUESTIONS = ("What is written on the small sign?", "How many plates are there?",
             "What colour is the largest plate in this picture, and what is written on it?", "Read the code.")
SOURCE_SIZE = (2688, 2016)  # 5.4 MP: every budget up to 4096 tokens downsamples it

# Public configs (Hugging Face hub config.json of Qwen/Qwen2.5-VL-7B-Instruct and Qwen/Qwen3-VL-4B-Instruct);
# token ids are the offline tiny processor's (all inside the real vocabulary).
SHAPES = {
    "qwen2_5_vl_7b": dict(
        family="qwen2_5_vl", K=18, T=3,
        text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu",
                  rope_scaling={"type": "mrope", "rope_type": "default", "mrope_section": [16, 24, 24]}),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                    fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu", in_chans=3, tokens_per_second=2)),
    "qwen3_vl_4b": dict(
        family="qwen3_vl", K=24, T=3,
        text=dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                  rope_theta=5e6, rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu",
                  rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True}),
        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560,
                    patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                    deepstack_visual_indexes=[5, 11, 17], hidden_act="gelu_pytorch_tanh", in_channels=3)),
}
QUICK = dict(backbones=("tiny_qwen2_5_vl",), budgets=(16, 36), batch_sizes=(1, 2), new_tokens=(4,), repeats=1)


# --- the backbone ---------------------------------------------------------------------------------------
@dataclass
class Backbone:
    name: str
    model: torch.nn.Module
    processor: object
    spec: object
    K: int
    T: int
    factor: int
    twig: object = None
    gate: object = None
    info: dict = field(default_factory=dict)


def _spec_class(family: str):
    from qzoom_adapters.backbones.qwen2_5_vl import Qwen2_5_VLSpec
    from qzoom_adapters.backbones.qwen3_vl import Qwen3VLSpec

    return {"qwen2_5_vl": Qwen2_5_VLSpec, "qwen3_vl": Qwen3VLSpec}[family]


def build_backbone(name: str, device: torch.device, dtype: torch.dtype, attn: str) -> Backbone:
    """A random-weight model of `name`'s shapes (or the tiny test model), its processor and Q-Zoom adapters."""
    from qzoom_adapters import DynamicGate, TwigRPN
    from qzoom_adapters.spec import get_spec

    torch.manual_seed(0)
    if name == "tiny_qwen2_5_vl":
        spec_cls = _spec_class("qwen2_5_vl")
        cfg, K, T = spec_cls.tiny_config(), 4, 2
    else:
        shape = SHAPES[name]
        spec_cls = _spec_class(shape["family"])
        text = shape["text"]
        cfg = spec_cls.model_class().config_class(text_config=text, vision_config=shape["vision"],
                                                  **spec_cls.TINY_IDS, **text)
        K, T = shape["K"], shape["T"]
    cfg._attn_implementation = attn
    for sub in ("text_config", "vision_config"):
        if getattr(cfg, sub, None) is not None:
            getattr(cfg, sub)._attn_implementation = attn
    with torch.device(device):
        model = spec_cls.model_class()._from_config(cfg, dtype=dtype, attn_implementation=attn).eval()
    processor = spec_cls.tiny_processor()
    model.generation_config.eos_token_id = None  # EOS off: every run decodes exactly its new tokens
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    spec = get_spec(model)
    info = {"parameters": sum(p.numel() for p in model.parameters()), "K": K, "T": T,
            "layers": len(spec.layers), "dtype": str(dtype).replace("torch.", ""), "attn": attn}
    bb = Backbone(name, model, processor, spec, K, T, spec.factor, info=info)
    bb.twig = TwigRPN.from_backbone(model, K=K, T=T).eval()
    bb.gate = DynamicGate.from_backbone(model, K=K, T=T).eval()
    return bb


def attention_implementations(device: torch.device) -> list[str]:
    """sdpa, plus flash-attention 2 where it is importable (CUDA only)."""
    impls = ["sdpa"]
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        impls.append("flash_attention_2")
    return impls


# --- floors ---------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_runs(fn, device, repeats: int, stages: bool = False):
    """One warm-up call, then `repeats` synchronised calls: (median seconds, median seconds per pipeline
    stage (`stages=True`, from a `StageTimer`) or None, the last call's result)."""
    from qzoom_adapters.timing import StageTimer

    out = fn()
    times, per_stage = [], []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        with StageTimer(device) if stages else contextlib.nullcontext() as timer:
            out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if stages:
            per_stage.append(timer.seconds())
    if not stages:
        return statistics.median(times), None, out
    names = sorted({k for s in per_stage for k in s})
    return statistics.median(times), {k: statistics.median(s.get(k, 0.0) for s in per_stage) for k in names}, out


def _median_time(fn, device, repeats: int) -> float:
    return _timed_runs(fn, device, repeats)[0]


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, quick: bool) -> float:
    n = 512 if quick else 8192
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    reps = 1 if quick else 10
    return 2 * n**3 * reps / _median_time(lambda: [a @ b for _ in range(reps)], device, 3)


def copy_bytes_per_s(device: torch.device, quick: bool) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    n = (16 if quick else 1024) << 20
    src, dst = torch.empty(n, dtype=torch.uint8, device=device), torch.empty(n, dtype=torch.uint8, device=device)
    reps = 1 if quick else 10
    return 2 * n * reps / _median_time(lambda: [dst.copy_(src) for _ in range(reps)], device, 3)


def _attention_flops(query_shape, key_shape, *args, out_shape=None, **kwargs) -> int:
    """QK^T and PV of one attention call as executed (full S_q x S_k, any number of KV heads)."""
    b, h, s_q, d = query_shape
    return 4 * b * h * s_q * key_shape[-2] * d


@torch.no_grad()
def prefill_flops(model, inputs) -> int:
    """FLOPs of the plain model's prefill (vision + decoder + head on the last token), counted by torch.

    Attention kernels are counted by `_attention_flops` (torch's own counter rejects grouped KV heads).
    """
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    names = ("_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    mapping = {getattr(aten, n): _attention_flops for n in names if hasattr(aten, n)}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(**inputs, logits_to_keep=1)
    return int(counter.get_total_flops())


def decode_bytes_per_step(bb: Backbone, batch: int, context: float) -> float:
    """Bytes a decode step must read: every decoder weight once (+ the head) and each row's KV cache."""
    spec = bb.spec
    seen, total = set(), 0
    for module in (spec.layers, spec.norm, spec.lm_head):
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
    cfg = spec.text_config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * next(spec.layers.parameters()).element_size()
    return total + batch * context * kv_per_token


# --- one configuration ----------------------------------------------------------------------------------
def _inputs(bb: Backbone, image, budget: int, batch: int, device):
    from qzoom_adapters.recipes.models import batch_to

    images = [image] * batch
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(batch)]
    inputs = bb.spec.chat_inputs(bb.processor, images, questions, pixels=budget * bb.factor**2)
    return batch_to(inputs, device), images


BOX_SIDE = 0.5  # the fixed box's side is about BOX_SIDE / 2 of each grid side (+ the blur's one-cell halo)


def fixed_boxes(images) -> list[tuple[int, int, int, int]]:
    """The forced box of each sample (`generate_from_inputs(boxes=...)`): centred, BOX_SIDE / 2 of each side."""
    return [centred_box(im.size, BOX_SIDE / 2) for im in images]


def fixed_box_spec(spec):
    """The backbone's spec whose sink mask keeps only a centred box of the token grid (the keep-mask this benchmark
    used before `boxes=`; kept for older callers, the benchmark forces `fixed_boxes` instead)."""
    def centred(h_t: int, w_t: int) -> torch.Tensor:
        keep = torch.zeros(h_t, w_t)
        dh, dw = max(1, round(h_t * BOX_SIDE / 2)), max(1, round(w_t * BOX_SIDE / 2))
        keep[h_t // 2 - dh // 2 + 1 : h_t // 2 + dh // 2, w_t // 2 - dw // 2 + 1 : w_t // 2 + dw // 2] = 1
        if not keep.any():
            keep[h_t // 2, w_t // 2] = 1
        return keep

    return with_sink_mask(spec, centred, "FixedBox")


def _zoom(bb: Backbone, budget: int, gate: bool):
    from qzoom_adapters import QZoom, ZoomConfig

    px = budget * bb.factor**2
    cfg = ZoomConfig(crop_min_pixels=px, crop_max_pixels=px)
    return QZoom(bb.model, bb.processor, twig=bb.twig, gate=bb.gate if gate else None, config=cfg)


def _timed_pipeline(zoom, inputs, images, n_tokens: int, force, device, repeats: int) -> dict:
    """Median latency of one pipeline call, with the median of each stage (the warm-up captures the decode
    graph for this shape)."""
    boxes = fixed_boxes(images)
    lat, med, outs = _timed_runs(lambda: zoom.generate_from_inputs(inputs, images, max_new_tokens=n_tokens,
                                                                    force_zoom=force, boxes=boxes),
                                 device, repeats, stages=True)
    med["other_host"] = max(0.0, lat - sum(med.values()))
    shares = [(o.bbox[2] - o.bbox[0]) * (o.bbox[3] - o.bbox[1]) / (im.width * im.height)
              for o, im in zip(outs, images) if o.bbox is not None]
    return {"latency_s": lat, "stages_s": med, "decode_mode": zoom.decoder.last_mode,
            "box_area_share": statistics.mean(shares) if shares else None,
            "tokens_per_row": sorted({len(o.tokens) for o in outs}),
            "zoomed": sum(o.zoomed for o in outs), "visual_tokens": statistics.mean(o.visual_tokens for o in outs)}


@torch.no_grad()
def measure_config(bb: Backbone, image, budget: int, batch: int, n_tokens: int, device, repeats: int) -> dict:
    row = {"backbone": bb.name, "attn": bb.info["attn"], "budget": budget, "batch": batch, "new_tokens": n_tokens}
    t0 = time.perf_counter()
    inputs, images = _inputs(bb, image, budget, batch, device)
    row["prep_s"] = time.perf_counter() - t0
    S = inputs["input_ids"].shape[1]
    row["prompt_len"] = S
    row["visual_tokens"] = int((inputs["input_ids"][0] == bb.spec.image_token_id).sum())

    def plain():
        return bb.model.generate(**inputs, do_sample=False, max_new_tokens=n_tokens)

    row["plain"] = {"latency_s": _median_time(plain, device, repeats)}
    ours, gated = _zoom(bb, budget, gate=False), _zoom(bb, budget, gate=True)
    row["plain_ours"] = _timed_pipeline(ours, inputs, images, n_tokens, [False] * batch, device, repeats)
    row["not_zoomed"] = _timed_pipeline(gated, inputs, images, n_tokens, [False] * batch, device, repeats)
    row["zoomed"] = _timed_pipeline(gated, inputs, images, n_tokens, [True] * batch, device, repeats)
    if batch > 1:
        row["fire50"] = _timed_pipeline(gated, inputs, images, n_tokens, [i % 2 == 0 for i in range(batch)],
                                        device, repeats)
    else:
        row["fire50"] = {"latency_s": (row["zoomed"]["latency_s"] + row["not_zoomed"]["latency_s"]) / 2}
    for mode in MODES:
        row[mode]["samples_per_s"] = batch / row[mode]["latency_s"]
        row[mode]["end_to_end_s"] = row[mode]["latency_s"] + row["prep_s"]  # + the processor on the global view
    steps = max(n_tokens - 1, 1)
    row["decode_per_token_s"] = {m: row[m]["stages_s"]["decode"] / steps for m in ("plain_ours", "not_zoomed", "zoomed")}
    if batch == 1:
        row["prefill_flops_batch1"] = prefill_flops(bb.model, inputs)
    row["decode_bytes_per_step"] = decode_bytes_per_step(bb, batch, S + n_tokens / 2)
    return row


def add_floors(row: dict, floors: dict, flops_by_budget: dict) -> None:
    """Prefill and decode floors of a row from the run's measured rates."""
    flops = flops_by_budget.get((row["backbone"], row["budget"]))  # batch 1; a batch of n does n times that
    if flops:
        row["prefill_flops"] = flops * row["batch"]
        row["prefill_floor_s"] = row["prefill_flops"] / floors["matmul_flops_per_s"]
    row["decode_floor_s"] = row["decode_bytes_per_step"] / floors["copy_bytes_per_s"]
    row["decode_vs_floor"] = {m: v / row["decode_floor_s"] for m, v in row["decode_per_token_s"].items()}


# --- the plan -------------------------------------------------------------------------------------------
def plan(budgets, batch_sizes, new_tokens, target_budgets=(576, 4096)) -> list[tuple[int, int, int]]:
    """(budget, batch, new tokens) in priority order: what the targets need first, then cheapest first."""
    all_cfgs = [(b, n, t) for b in budgets for n in batch_sizes for t in new_tokens]
    first_t = min(new_tokens)

    def priority(cfg):
        b, n, t = cfg
        if n == 1 and t == first_t:
            return (0, b)
        if n in (1, 8) and t == first_t and b in target_budgets:
            return (1, b * n)
        return (2, b * n * t)

    return sorted(all_cfgs, key=priority)


def summarise_targets(rows: list[dict]) -> dict:
    """The issue's four targets from the rows that are there (None where a row is missing)."""
    def find(backbone, budget, batch, n):
        return next((r for r in rows if (r["backbone"], r["budget"], r["batch"], r["new_tokens"]) == (backbone, budget, batch, n)), None)

    out = {}
    backbone = "qwen2_5_vl_7b" if any(r["backbone"] == "qwen2_5_vl_7b" for r in rows) else rows[0]["backbone"]
    n = min(r["new_tokens"] for r in rows)
    budgets = sorted({r["budget"] for r in rows if r["backbone"] == backbone})
    lo, hi = (576, 4096) if {576, 4096} <= set(budgets) else (budgets[0], budgets[-1])
    z, p = find(backbone, lo, 1, n), find(backbone, hi, 1, n)
    out["zoomed_low_vs_plain_high"] = {
        "backbone": backbone, "zoomed_budget": lo, "plain_budget": hi, "new_tokens": n, "target": 4.0,
        "speedup": p["plain"]["latency_s"] / z["zoomed"]["latency_s"] if z and p else None,
        "speedup_end_to_end": p["plain"]["end_to_end_s"] / z["zoomed"]["end_to_end_s"] if z and p else None}
    over = {}
    for r in rows:
        if r["batch"] == 1 and r["new_tokens"] == n:
            over[f"{r['backbone']}@{r['budget']}"] = {
                "vs_plain_generate": r["not_zoomed"]["latency_s"] / r["plain"]["latency_s"] - 1,
                "vs_plain_ours (gate cost)": r["not_zoomed"]["latency_s"] / r["plain_ours"]["latency_s"] - 1}
    out["not_zoomed_overhead"] = {"target": 0.05, "per_config": over}
    scale = {}
    for r in rows:
        one = find(r["backbone"], r["budget"], 1, r["new_tokens"])
        if r["batch"] == 8 and one:
            scale[f"{r['backbone']}@{r['budget']}/{r['new_tokens']}"] = (
                r["fire50"]["samples_per_s"] / one["fire50"]["samples_per_s"])
    out["batch8_vs_batch1_fire50"] = {"target": 4.0, "per_config": scale}
    out["decode_step_vs_hbm_floor_bs1"] = {
        "target": 2.0, "per_config": {f"{r['backbone']}@{r['budget']}/{r['new_tokens']}": r["decode_vs_floor"]["not_zoomed"]
                                      for r in rows if r["batch"] == 1 and "decode_vs_floor" in r}}
    return out


# --- report ---------------------------------------------------------------------------------------------
def _ms(x) -> str:
    return "–" if x is None else f"{1000 * x:.1f}"


COLUMNS = ("backbone", "budget", "batch", "new tok", "plain (HF generate)", "plain, our decode", "not zoomed",
           "zoomed", "50% zoomed", "decode/token ours", "decode floor", "prefill floor", "zoomed: vision / pass A / "
           "gate / twig / crop+enc / RoI pass / decode")


def markdown_table(report: dict) -> str:
    lines = ["Latency per batch in ms (median).", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in report["rows"]:
        st = r["zoomed"]["stages_s"]
        stages = " / ".join(_ms(st.get(k)) for k in ("vision", "pass_a", "gate", "twig", "crop_encode", "roi_pass",
                                                       "decode"))
        cells = [r["backbone"], str(r["budget"]), str(r["batch"]), str(r["new_tokens"]),
                 _ms(r["plain"]["latency_s"]), _ms(r["plain_ours"]["latency_s"]), _ms(r["not_zoomed"]["latency_s"]),
                 _ms(r["zoomed"]["latency_s"]), _ms(r["fire50"]["latency_s"]),
                 _ms(r["decode_per_token_s"]["not_zoomed"]), _ms(r.get("decode_floor_s")), _ms(r.get("prefill_floor_s")),
                 stages]
        lines.append("| " + " | ".join(cells) + " |")
    t = report["targets"]
    z = t["zoomed_low_vs_plain_high"]
    lines += ["", "Targets:", "",
              f"* zoomed @{z['zoomed_budget']} vs plain @{z['plain_budget']} ({z['backbone']}, batch 1, "
              f"{z['new_tokens']} tokens): {_ratio(z['speedup'])} lower latency, {_ratio(z['speedup_end_to_end'])} with "
              "the global view's preprocessing included (target >= 4x)",
              "* not-zoomed overhead over plain HF generate / over the plain model with our decoder (gate cost): "
              + ", ".join(f"{k}: {v['vs_plain_generate']:+.1%} / {v['vs_plain_ours (gate cost)']:+.1%}"
                          for k, v in t["not_zoomed_overhead"]["per_config"].items()) + " (target <= +5%)",
              "* batch 8 vs batch 1 throughput, 50% zoomed: "
              + (", ".join(f"{k}: {_ratio(v)}" for k, v in t["batch8_vs_batch1_fire50"]["per_config"].items()) or "–")
              + " (target >= 4x)",
              "* decode step / HBM floor at batch 1 (not zoomed): "
              + ", ".join(f"{k}: {_ratio(v)}" for k, v in t["decode_step_vs_hbm_floor_bs1"]["per_config"].items())
              + " (target <= 2x)"]
    m = report["meta"]
    f = report["floors"]
    lines += ["", f"{m['machine']['device_name']} ({m['machine']['device']}), torch {m['torch']}, transformers "
                  f"{m['transformers']}, commit {m['git_commit'] or 'unknown'}, {m['dtype']}, random weights. "
                  f"Measured in the same run: matmul {f['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s, copy "
                  f"{f['copy_bytes_per_s'] / 1e9:.0f} GB/s. Skipped (time): {len(report['skipped'])} configs."]
    return "\n".join(lines) + "\n"


def _ratio(x) -> str:
    return "–" if x is None else f"{x:.2f}x"


def latency_plot(report: dict, backbone: str):
    """Latency (ms) against visual tokens read per sample, batch 1, shortest answer: plain vs the pipeline."""
    n = min(r["new_tokens"] for r in report["rows"])
    rows = sorted((r for r in report["rows"] if r["backbone"] == backbone and r["batch"] == 1 and r["new_tokens"] == n),
                  key=lambda r: r["budget"])
    series = {"plain": [(r["visual_tokens"], 1000 * r["plain"]["latency_s"], str(r["budget"])) for r in rows],
              "not zoomed": [(r["visual_tokens"], 1000 * r["not_zoomed"]["latency_s"], "") for r in rows],
              "zoomed": [(r["zoomed"]["visual_tokens"], 1000 * r["zoomed"]["latency_s"], str(r["budget"])) for r in rows]}
    y_max = max(y for pts in series.values() for _, y, _ in pts) * 1.1
    return line_plot(series, f"{backbone}, batch 1, {n} new tokens: latency vs visual tokens", y_label="ms",
                     y_max=y_max, x_label="visual tokens read per sample (log scale)")


def bench(out=None, quick: bool = False, device: str | None = None, backbones=None, budgets=None, batch_sizes=None,
          new_tokens=None, repeats: int = 3, max_seconds: float | None = None, append: bool = False) -> dict:
    """Measure, then write the JSON report and the `.md` and `.png` files beside it; returns the report."""
    import transformers

    from qzoom_adapters.testing.kit import synthetic_image

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if quick:
        backbones = backbones or QUICK["backbones"]
        budgets, batch_sizes = budgets or QUICK["budgets"], batch_sizes or QUICK["batch_sizes"]
        new_tokens, repeats = new_tokens or QUICK["new_tokens"], QUICK["repeats"]
    backbones = list(backbones or SHAPES)
    budgets, batch_sizes, new_tokens = budgets or BUDGETS, batch_sizes or BATCH_SIZES, new_tokens or NEW_TOKENS
    unknown = [b for b in backbones if b not in SHAPES and b != "tiny_qwen2_5_vl"]
    if unknown:
        raise SystemExit(f"unknown backbone(s) {unknown}; choose from {sorted(SHAPES)} or tiny_qwen2_5_vl")
    out = Path(out) if out else default_out()
    t_start = time.perf_counter()
    floors = {"matmul_flops_per_s": matmul_flops_per_s(dev, dtype, quick), "copy_bytes_per_s": copy_bytes_per_s(dev, quick)}
    image = synthetic_image(*((320, 240) if quick else SOURCE_SIZE), seed=1)
    rows, skipped, infos, agreement = [], [], {}, {}
    for name in backbones:
        t_backbone = time.perf_counter()
        for attn in attention_implementations(dev):
            bb = build_backbone(name, dev, dtype, attn)
            infos[f"{name}/{attn}"] = bb.info
            agreement[f"{name}/{attn}"] = decode_agreement(bb, image, budgets[0], dev)
            flops_by_budget = {}
            for budget, batch, n in plan(budgets, batch_sizes, new_tokens):
                if max_seconds is not None and time.perf_counter() - t_backbone > max_seconds:
                    skipped.append({"backbone": name, "attn": attn, "budget": budget, "batch": batch, "new_tokens": n})
                    continue
                try:
                    row = measure_config(bb, image, budget, batch, n, dev, repeats)
                except torch.cuda.OutOfMemoryError as err:
                    skipped.append({"backbone": name, "attn": attn, "budget": budget, "batch": batch, "new_tokens": n,
                                    "error": f"out of memory: {str(err)[:120]}"})
                    torch.cuda.empty_cache()
                    continue
                if "prefill_flops_batch1" in row:
                    flops_by_budget[(name, budget)] = row["prefill_flops_batch1"]
                add_floors(row, floors, flops_by_budget)
                rows.append(row)
                print(f"[speed] {name} {attn} budget {budget} batch {batch} new {n}: plain "
                      f"{_ms(row['plain']['latency_s'])} ms, not zoomed {_ms(row['not_zoomed']['latency_s'])} ms, "
                      f"zoomed {_ms(row['zoomed']['latency_s'])} ms", flush=True)
            del bb
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    if append and out.is_file():
        old = json.loads(out.read_text())
        rows = [r for r in old["rows"] if r["backbone"] not in backbones] + rows
        skipped = [r for r in old.get("skipped", []) if r["backbone"] not in backbones] + skipped
        infos = {**old["meta"].get("backbones", {}), **infos}
        agreement = {**old.get("decode_agreement", {}), **agreement}
    if not rows:
        raise SystemExit("no configuration was measured (is --max-seconds too small?)")
    report = {"meta": {"git_commit": git_commit(), "machine": machine(dev), "torch": torch.__version__,
                       "transformers": transformers.__version__, "dtype": str(dtype).replace("torch.", ""),
                       "quick": quick, "repeats": repeats, "backbones": infos,
                       "seconds": time.perf_counter() - t_start},
              "floors": floors, "decode_agreement": agreement, "rows": rows, "skipped": skipped,
              "targets": summarise_targets(rows)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown_table(report))
    for name in sorted({r["backbone"] for r in rows}):
        latency_plot(report, name).save(out.with_name(f"{out.stem}_{name}.png"))
    return report


@torch.no_grad()
def decode_agreement(bb: Backbone, image, budget: int, device) -> dict:
    """Share of tokens on which the default decode loop agrees with the dynamic one (batch of 2, one zoomed)."""
    zoom = _zoom(bb, budget, gate=True)
    inputs, images = _inputs(bb, image, budget, 2, device)
    tokens = {}
    for mode in ("dynamic", "auto"):
        zoom.config = zoom.config.model_copy(update={"decode": mode})
        tokens[mode] = [o.tokens for o in zoom.generate_from_inputs(inputs, images, max_new_tokens=16,
                                                                     force_zoom=[True, False],
                                                                     boxes=fixed_boxes(images))]
        tokens[mode + "_ran"] = zoom.decoder.last_mode
    pairs = [(a, b) for ra, rb in zip(tokens["dynamic"], tokens["auto"]) for a, b in zip(ra, rb)]
    first = [next((i for i, (a, b) in enumerate(zip(ra, rb)) if a != b), None)
             for ra, rb in zip(tokens["dynamic"], tokens["auto"])]
    return {"auto_ran": tokens["auto_ran"], "token_agreement": sum(a == b for a, b in pairs) / len(pairs),
            "first_difference_per_row": first}
