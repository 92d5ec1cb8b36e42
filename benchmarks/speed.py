"""`qzoom bench speed`: wall-clock of the plain backbone and of the Q-Zoom pipeline at real model shapes.

No real weights exist here, but real shapes do: Qwen2.5-VL-7B and Qwen3-VL-4B are built from their public
configs with random weights (bf16 on CUDA). Random weights make the gate's decision arbitrary, so every run
forces it (`force_zoom`), and the box is fixed (`boxes=`, `forced_box.centred_box`: a centred box a quarter of each side
of the image, 6-7% of its area, reported per row as `box_area_share`; the twig still runs). The crop is re-encoded at the crop
budget = the global budget, so a zoomed sample reads about 2x the budget in visual tokens.

Per backbone, attention implementation, visual-token budget, batch size and number of new tokens (EOS off):

* `plain`: the unmodified model, HF `generate` (greedy); at batch 1 also `plain_fast`, the same inside
  `qz.fast_vision_attention`;
* per vision setting, the model's own vision path (no suffix) and the fast one (suffix `_fast`, `FAST`: the packed
  vision attention + crops preprocessed on the device):
  * `plain_ours`: the pipeline without a gate and never zooming (pass A + layers K..L-1 + our decode loop), i.e.
    the plain model with this library's decoder;
  * `not_zoomed` / `zoomed` / `fire50`: the gated pipeline with the gate's decision forced off / on / on for
    every other sample (at batch 1, `fire50` is the mean of `zoomed` and `not_zoomed`: half the requests zoom).
  Batch 1 measures them all; a larger batch measures `fire50` for both settings and `plain_ours_fast` (the baseline
  of the fast ratios); `every_mode=True` measures all of them at every batch.

Times are device-synchronised medians after one warm-up, of at most `repeats` timed runs, fewer once the timed runs
of one measurement have taken `TIME_CAP_S` (each measurement records its `runs`), from processed inputs on the
device to token ids (`prep_s`, the processor on the host, is reported beside them). The pipeline's stages come from
`qzoom_adapters.timing.StageTimer` (CUDA events). Two floors are measured in the same run: prefill FLOPs
(counted by torch's FlopCounterMode on the plain forward) / the measured bf16 matmul rate, and decode bytes per
step (decoder weights + the KV cache read) / the measured device copy bandwidth. Also in the same run: how close the
fast vision attention is to sdpa (`vision_closeness.py`, fp32 and bf16, with the tower's own latency) and how far
crop preprocessing on the device is from the host path (`crop_preprocess.py`). The issue's target ratios come from
these rows (`speed_report.py`). With `max_seconds`, a configuration whose predicted time (from the last one at the
same budget, scaled by batch size) would end past it is skipped and listed.

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

from qzoom_adapters.benchmarks.crop_preprocess import crop_preprocess_report
from qzoom_adapters.benchmarks.forced_box import centred_box, with_sink_mask
from qzoom_adapters.benchmarks.provenance import git_commit, machine
from qzoom_adapters.benchmarks.speed_report import latency_plot, markdown_table, ms, summarise_targets
from qzoom_adapters.benchmarks.vision_closeness import vision_closeness

RESULTS_OUT = Path(__file__).resolve().parent / "results" / "speed.json"  # the committed results


def default_out() -> Path:
    """Where a run without an explicit `out` writes: `./qzoom-bench/speed.json` in the current directory. Only an
    explicit `out` (e.g. `RESULTS_OUT`) replaces the committed results in benchmarks/results/."""
    return Path.cwd() / "qzoom-bench" / RESULTS_OUT.name

BUDGETS = (256, 576, 1024, 2048, 4096)
BATCH_SIZES = (1, 4, 8, 16)
NEW_TOKENS = (16, 64)
PIPELINE_MODES = ("plain_ours", "not_zoomed", "zoomed", "fire50")
FAST = {"vision_attention": "varlen", "crop_preprocess": "device"}  # the fast vision path (suffix `_fast`)
MODES = ("plain", "plain_fast", *PIPELINE_MODES, *(m + "_fast" for m in PIPELINE_MODES))  # keys of a batch-1 row
TIME_CAP_S = 4.0  # a measurement stops adding timed runs once they took this long (at least one after the warm-up)
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
QUICK_SOURCE_SIZE = (320, 240)


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


def _timed_runs(fn, device, repeats: int, stages: bool = False, cap_s: float | None = None):
    """One warm-up call, then up to `repeats` synchronised calls (fewer once they have taken `cap_s`; at least one):
    (median seconds, median seconds per pipeline stage (`stages=True`, from a `StageTimer`) or None, the last call's
    result, the number of timed calls)."""
    from qzoom_adapters.timing import StageTimer

    out = fn()
    times, per_stage = [], []
    for _ in range(max(1, repeats)):
        _sync(device)
        t0 = time.perf_counter()
        with StageTimer(device) if stages else contextlib.nullcontext() as timer:
            out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if stages:
            per_stage.append(timer.seconds())
        if cap_s is not None and sum(times) >= cap_s:
            break
    if not stages:
        return statistics.median(times), None, out, len(times)
    names = sorted({k for s in per_stage for k in s})
    return (statistics.median(times), {k: statistics.median(s.get(k, 0.0) for s in per_stage) for k in names}, out,
            len(times))


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
def processed(bb: Backbone, images: list, budget: int, device):
    """Processor inputs for `images` (one question each) at `budget` visual tokens, on `device`."""
    from qzoom_adapters.recipes.models import batch_to

    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(len(images))]
    return batch_to(bb.spec.chat_inputs(bb.processor, images, questions, pixels=budget * bb.factor**2), device)


def _inputs(bb: Backbone, image, budget: int, batch: int, device):
    images = [image] * batch
    return processed(bb, images, budget, device), images


def source_image(quick: bool):
    """The benchmark's source image (5.4 MP; small in quick runs)."""
    from qzoom_adapters.testing.kit import synthetic_image

    return synthetic_image(*(QUICK_SOURCE_SIZE if quick else SOURCE_SIZE), seed=1)


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


def pipeline(bb: Backbone, budget: int, gate: bool, **settings):
    """The pipeline on `bb` with the crop budget = the global budget (`settings`: further `ZoomConfig` fields)."""
    from qzoom_adapters import QZoom, ZoomConfig

    px = budget * bb.factor**2
    cfg = ZoomConfig(crop_min_pixels=px, crop_max_pixels=px, **settings)
    return QZoom(bb.model, bb.processor, twig=bb.twig, gate=bb.gate if gate else None, config=cfg)


def _timed_pipeline(zoom, inputs, images, n_tokens: int, force, device, repeats: int) -> dict:
    """Median latency of one pipeline call, with the median of each stage (the warm-up captures the decode
    graph for this shape) and, with the fast vision attention, the calls each of its paths took per pipeline call."""
    from qzoom_adapters import vision_attention as va

    boxes = fixed_boxes(images)
    va.CALLS.clear()
    lat, med, outs, runs = _timed_runs(lambda: zoom.generate_from_inputs(inputs, images, max_new_tokens=n_tokens,
                                                                          force_zoom=force, boxes=boxes),
                                       device, repeats, stages=True, cap_s=TIME_CAP_S)
    med["other_host"] = max(0.0, lat - sum(med.values()))
    shares = [(o.bbox[2] - o.bbox[0]) * (o.bbox[3] - o.bbox[1]) / (im.width * im.height)
              for o, im in zip(outs, images) if o.bbox is not None]
    row = {"latency_s": lat, "stages_s": med, "runs": runs, "decode_mode": zoom.decoder.last_mode,
           "box_area_share": statistics.mean(shares) if shares else None,
           "tokens_per_row": sorted({len(o.tokens) for o in outs}),
           "zoomed": sum(o.zoomed for o in outs), "visual_tokens": statistics.mean(o.visual_tokens for o in outs)}
    if zoom.config.vision_attention != "model":
        row["vision_attention_calls"] = {k: v / (runs + 1) for k, v in sorted(va.CALLS.items())}
    if any(o.zoomed for o in outs):
        row["crop_preprocess"] = zoom.crop_preprocessor.last_where  # where the crops were processed
    return row


def modes_at(batch: int, every_mode: bool = False, fast: bool = True) -> list[str]:
    """The pipeline modes measured at `batch`, both vision settings (only the model's own with `fast=False`; see the
    module docstring)."""
    settings = ("", "_fast") if fast else ("",)
    if batch == 1:
        return [m + s for s in settings for m in PIPELINE_MODES if m != "fire50"]
    if every_mode:
        return [m + s for s in settings for m in PIPELINE_MODES]
    return ["fire50", "plain_ours_fast", "fire50_fast"] if fast else ["fire50"]


@torch.no_grad()
def measure_config(bb: Backbone, image, budget: int, batch: int, n_tokens: int, device, repeats: int,
                   every_mode: bool = False, fast: bool = True) -> dict:
    """One configuration's row (see the module docstring); `fast=False` leaves out the fast vision path."""
    from qzoom_adapters import fast_vision_attention

    row = {"backbone": bb.name, "attn": bb.info["attn"], "budget": budget, "batch": batch, "new_tokens": n_tokens}
    t0 = time.perf_counter()
    inputs, images = _inputs(bb, image, budget, batch, device)
    row["prep_s"] = time.perf_counter() - t0
    S = inputs["input_ids"].shape[1]
    row["prompt_len"] = S
    row["visual_tokens"] = int((inputs["input_ids"][0] == bb.spec.image_token_id).sum())

    def plain():
        return bb.model.generate(**inputs, do_sample=False, max_new_tokens=n_tokens)

    def plain_fast():
        with fast_vision_attention(bb.model):
            return plain()

    for name, fn in [("plain", plain), ("plain_fast", plain_fast)][: 2 if batch == 1 and fast else 1]:
        lat, _, _, runs = _timed_runs(fn, device, repeats, cap_s=TIME_CAP_S)
        row[name] = {"latency_s": lat, "runs": runs}
    ours, gated = pipeline(bb, budget, gate=False), pipeline(bb, budget, gate=True)
    forces = {"plain_ours": [False] * batch, "not_zoomed": [False] * batch, "zoomed": [True] * batch,
              "fire50": [i % 2 == 0 for i in range(batch)]}
    for mode in modes_at(batch, every_mode, fast):
        base = mode.removesuffix("_fast")
        zoom = ours if base == "plain_ours" else gated
        if mode.endswith("_fast"):
            zoom = zoom.with_config(**FAST)  # shares the decoder (buffers, graphs) with the stock one
        row[mode] = _timed_pipeline(zoom, inputs, images, n_tokens, forces[base], device, repeats)
    if batch == 1:
        for s in ("", "_fast") if fast else ("",):
            row["fire50" + s] = {"latency_s": (row["zoomed" + s]["latency_s"] + row["not_zoomed" + s]["latency_s"]) / 2}
    for mode in (m for m in MODES if m in row):
        row[mode]["samples_per_s"] = batch / row[mode]["latency_s"]
        row[mode]["end_to_end_s"] = row[mode]["latency_s"] + row["prep_s"]  # + the processor on the global view
    steps = max(n_tokens - 1, 1)
    row["decode_per_token_s"] = {m: row[m]["stages_s"]["decode"] / steps for m in MODES
                                 if m in row and "stages_s" in row[m]}
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


# --- the run --------------------------------------------------------------------------------------------
def _predicted_s(done: dict, budget: int, batch: int) -> float | None:
    """Seconds a configuration will take, from the last one measured at the same budget (scaled by batch size)."""
    if budget not in done:
        return None
    b, seconds = done[budget]
    return seconds * max(1.0, batch / b)


def _extras(bb: Backbone, image, budgets, dev) -> tuple[dict, dict]:
    """Vision-attention closeness (at the low and high budgets) and the crop-preprocessing comparison (low budget).

    A failure is recorded as {"error": ...} (and, for the closeness, the run goes on without the fast path) rather
    than ending a device run."""
    lo, hi = (576, 4096) if {576, 4096} <= set(budgets) else (min(budgets), max(budgets))
    inputs_for = lambda images, budget: processed(bb, images, budget, dev)  # noqa: E731
    out = []
    for fn in (lambda: vision_closeness(bb, image, sorted({lo, hi}), dev, inputs_for),
               lambda: crop_preprocess_report(pipeline(bb, lo, gate=True), image, lo, dev, inputs_for)):
        try:
            out.append(fn())
        except Exception as err:  # noqa: BLE001 - reported in the results
            out.append({"error": f"{type(err).__name__}: {err}"})
            print(f"[speed] {bb.name}: {out[-1]['error']}", flush=True)
    return out[0], out[1]


def bench(out=None, quick: bool = False, device: str | None = None, backbones=None, budgets=None, batch_sizes=None,
          new_tokens=None, repeats: int = 3, max_seconds: float | None = None, append: bool = False,
          every_mode: bool = False) -> dict:
    """Measure, then write the JSON report and the `.md` and `.png` files beside it; returns the report."""
    import transformers

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
    image = source_image(quick)
    rows, skipped, infos, agreement, closeness, crops = [], [], {}, {}, {}, {}
    for name in backbones:
        t_backbone = time.perf_counter()
        for attn in attention_implementations(dev):
            bb = build_backbone(name, dev, dtype, attn)
            key = f"{name}/{attn}"
            infos[key] = bb.info
            agreement[key] = decode_agreement(bb, image, budgets[0], dev)
            closeness[key], crops[key] = _extras(bb, image, budgets, dev)
            fast = "error" not in closeness[key]  # the fast path could not even be selected: measure without it
            print(f"[speed] {key}: vision closeness and crop preprocessing done "
                  f"({time.perf_counter() - t_backbone:.0f} s)", flush=True)
            flops_by_budget, done = {}, {}
            for budget, batch, n in plan(budgets, batch_sizes, new_tokens):
                cfg = {"backbone": name, "attn": attn, "budget": budget, "batch": batch, "new_tokens": n}
                elapsed, guess = time.perf_counter() - t_backbone, _predicted_s(done, budget, batch)
                if max_seconds is not None and (elapsed > max_seconds or (guess and elapsed + guess > max_seconds)):
                    skipped.append({**cfg, "predicted_s": guess})
                    continue
                t_cfg = time.perf_counter()
                try:
                    row = measure_config(bb, image, budget, batch, n, dev, repeats, every_mode, fast)
                except torch.cuda.OutOfMemoryError as err:
                    skipped.append({**cfg, "error": f"out of memory: {str(err)[:120]}"})
                    torch.cuda.empty_cache()
                    continue
                row["measure_s"] = done_s = time.perf_counter() - t_cfg
                if n == min(new_tokens):
                    done[budget] = (batch, done_s)
                if "prefill_flops_batch1" in row:
                    flops_by_budget[(name, budget)] = row["prefill_flops_batch1"]
                add_floors(row, floors, flops_by_budget)
                rows.append(row)
                print(f"[speed] {key} budget {budget} batch {batch} new {n}: plain {ms(row['plain']['latency_s'])} "
                      f"ms, 50% zoomed {ms(row['fire50']['latency_s'])} / fast {ms(row.get('fire50_fast', {}).get('latency_s'))} "
                      f"ms ({done_s:.0f} s)", flush=True)
            del bb
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    if append and out.is_file():
        old = json.loads(out.read_text())
        rows = [r for r in old["rows"] if r["backbone"] not in backbones] + rows
        skipped = [r for r in old.get("skipped", []) if r["backbone"] not in backbones] + skipped
        infos = {**old["meta"].get("backbones", {}), **infos}
        agreement = {**old.get("decode_agreement", {}), **agreement}
        closeness = {**old.get("vision_closeness", {}), **closeness}
        crops = {**old.get("crop_preprocess", {}), **crops}
    if not rows:
        raise SystemExit("no configuration was measured (is --max-seconds too small?)")
    report = {"meta": {"git_commit": git_commit(), "machine": machine(dev), "torch": torch.__version__,
                       "transformers": transformers.__version__, "dtype": str(dtype).replace("torch.", ""),
                       "quick": quick, "repeats": repeats, "time_cap_s": TIME_CAP_S, "fast": FAST,
                       "backbones": infos, "seconds": time.perf_counter() - t_start},
              "floors": floors, "decode_agreement": agreement, "vision_closeness": closeness,
              "crop_preprocess": crops, "rows": rows, "skipped": skipped, "targets": summarise_targets(rows)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown_table(report))
    for name in sorted({r["backbone"] for r in rows}):
        latency_plot(report, name).save(out.with_name(f"{out.stem}_{name}.png"))
    return report


@torch.no_grad()
def decode_agreement(bb: Backbone, image, budget: int, device) -> dict:
    """Share of tokens on which the default decode loop agrees with the dynamic one (batch of 2, one zoomed)."""
    zoom = pipeline(bb, budget, gate=True)
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
