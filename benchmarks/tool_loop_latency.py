"""`python -m qzoom_adapters.benchmarks.tool_loop_latency`: the round-trip the Q-Zoom shortcut saves in a tool loop.

A tool-loop model (DeepEyes-style) answers a zoom question in two rounds: round 1 thinks and writes the zoom call,
the runner crops, round 2 reads the crop and answers. With `QZoomShortcut` the gate and twig decide on the first
pass and the call is written for the model, so round 1's decoding is skipped. Measured, in one run and at real
shapes with random weights (so the decisions are forced, never read from the model):

* `model_round1`: `ToolLoop` without a shortcut; round 1 is forced to write `think_tokens` of thinking and the
  grammar's call for a centred box, round 2 `answer_tokens` of answer;
* `shortcut`: the same loop with `QZoomShortcut(force_zoom=True, box=<the same centred box>)`: round 1 is the
  pipeline's first pass (gate, twig, crop prefill, one token), round 2 the same forced answer;
* `shortcut_declined`: the shortcut with the zoom forced off, so the model still writes round 1: the gate's cost
  where it declines.

Each is the wall-clock median (device-synchronised) of `repeats` whole `ToolLoop.run` calls after one warm-up, from
source images to the result. Prints one JSON report and the ratio; writes it only to `--out` (never into
benchmarks/results/ unless `--out` points there). `--tiny` runs the tiny test model on the CPU to prove the script.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from qzoom_adapters.backbones.tool_boxes import from_pixels
from qzoom_adapters.backbones.tool_grammars import GRAMMARS
from qzoom_adapters.backbones.tool_loop import QZoomShortcut, ToolLoop
from qzoom_adapters.benchmarks.forced_box import centred_box
from qzoom_adapters.benchmarks.provenance import git_commit, machine
from qzoom_adapters.benchmarks.speed import SHAPES, build_backbone, pipeline, source_image

BOX_SIDE = 0.25  # the forced box spans this share of each image side
TINY = dict(backbone="tiny_qwen2_5_vl", budget=36, think_tokens=16, answer_tokens=4, repeats=1, device="cpu")


class ForcedText(LogitsProcessor):
    """Forces row b of a `generate` call to write `texts[b]` and then EOS; a None text leaves that row to the model.

    Random (or tiny) weights write no tool calls, so benchmarks and tests force the text of each round this way while
    everything else (template, processor, `generate`, stop strings, crops) stays real."""

    def __init__(self, tokenizer, texts, eos_token_id: int):
        self.ids = [None if t is None else tokenizer.encode(t, add_special_tokens=False) + [eos_token_id]
                    for t in texts]
        self.start = None

    def __call__(self, input_ids, scores):
        self.start = input_ids.shape[1] if self.start is None else self.start
        step = input_ids.shape[1] - self.start
        for b, ids in enumerate(self.ids):
            if ids is not None:
                scores[b] = -float("inf")
                scores[b, ids[min(step, len(ids) - 1)]] = 0.0
        return scores


def forced_rounds(tokenizer, plan):
    """`ToolLoop.run(generate_kwargs=...)` that forces `plan[sample][round]` (None, or a round past the end of a
    sample's list: the model's own text)."""
    def kwargs(r, samples, inputs):
        texts = [plan[i][r] if r < len(plan[i]) else None for i in samples]
        return {"logits_processor": LogitsProcessorList([ForcedText(tokenizer, texts, tokenizer.eos_token_id)])}

    return kwargs


def _timed(fn, device: torch.device, repeats: int):
    """(median seconds of `repeats` runs after one warm-up, the last result)."""
    out = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def measure(backbone: str = "qwen2_5_vl_7b", grammar: str = "deepeyes", budget: int = 4096, think_tokens: int = 200,
            answer_tokens: int = 16, repeats: int = 3, device: str | None = None) -> dict:
    """The report (see the module docstring)."""
    from qzoom_adapters.backbones.tiny_processor import tiny_qwen2_5_vl_processor, tiny_qwen3_vl_processor

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    bb = build_backbone(backbone, dev, dtype, "sdpa")
    px = budget * bb.factor ** 2  # every image of the conversation (source and crop) at this budget
    make = tiny_qwen3_vl_processor if bb.factor == 32 else tiny_qwen2_5_vl_processor
    bb.processor = make(min_pixels=px, max_pixels=px)
    tok, g = bb.processor.tokenizer, GRAMMARS[grammar]
    image = source_image(quick=backbone.startswith("tiny"))
    box = centred_box(image.size, BOX_SIDE)
    seen = tuple(bb.processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0, [2, 1]]
                 .mul(bb.spec.factor // bb.processor.image_processor.merge_size).tolist())
    call = g.format_call(from_pixels(box, g.coords, image.size, seen))
    round1 = "<think>" + "a" * max(0, think_tokens - len("<think></think>\n")) + "</think>\n" + call
    answer = "<answer>" + "b" * max(1, answer_tokens - len("<answer></answer>")) + "</answer>"
    zoom = pipeline(bb, budget, gate=True)
    forced_box = partial(centred_box, side=BOX_SIDE)
    loops = {
        "model_round1": (ToolLoop(bb.model, bb.processor, g, max_rounds=2, max_new_tokens=len(round1) + 8),
                         [[round1, answer]]),
        "shortcut": (ToolLoop(bb.model, bb.processor, g, max_rounds=2, max_new_tokens=len(round1) + 8,
                              first_round=QZoomShortcut(zoom, force_zoom=True, box=forced_box)),
                     [[None, answer]]),
        "shortcut_declined": (ToolLoop(bb.model, bb.processor, g, max_rounds=2, max_new_tokens=len(round1) + 8,
                                       first_round=QZoomShortcut(zoom, force_zoom=False)), [[round1, answer]]),
    }
    latency, rounds = {}, {}
    for name, (loop, plan) in loops.items():
        run = partial(loop.run, [image], ["What is written on the small sign?"],
                      generate_kwargs=forced_rounds(tok, plan))
        latency[name], (res,) = _timed(run, dev, repeats)
        rounds[name] = [{"by_shortcut": r.by_shortcut, "box": r.box, "crop_size": r.crop_size,
                         "tokens": len(tok.encode(r.text, add_special_tokens=False))} for r in res.rounds]
        if [r["box"] for r in rounds[name]][0] != box or len(res.rounds) != 2:
            raise RuntimeError(f"{name}: the forced conversation did not run as planned: {rounds[name]}")
    model_s, short_s = latency["model_round1"], latency["shortcut"]
    return {
        "backbone": backbone, "grammar": grammar, "budget_tokens": budget, "think_tokens": think_tokens,
        "answer_tokens": answer_tokens, "source_size": list(image.size), "box": list(box), "repeats": repeats,
        "latency_s": latency, "saved_s": model_s - short_s, "ratio_shortcut_to_model": short_s / model_s,
        "declined_overhead_s": latency["shortcut_declined"] - model_s, "rounds": rounds,
        "info": bb.info, "machine": machine(dev), "git_commit": git_commit(),
        "note": "random weights, forced decisions and text; the tiny char-level tokenizer counts one token a character",
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="qwen2_5_vl_7b", choices=sorted(SHAPES) + ["tiny_qwen2_5_vl"])
    parser.add_argument("--grammar", default="deepeyes", choices=sorted(GRAMMARS))
    parser.add_argument("--budget", type=int, default=4096, help="visual tokens of every image (source and crop)")
    parser.add_argument("--think-tokens", type=int, default=200, help="round 1 thinking the model writes")
    parser.add_argument("--answer-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--tiny", action="store_true", help="the tiny test model on the CPU (proves the script runs)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here (default: print only)")
    args = vars(parser.parse_args(argv))
    out, tiny = args.pop("out"), args.pop("tiny")
    if tiny:
        args.update(TINY)
    report = measure(**args)
    print(json.dumps(report, indent=1))
    lat = report["latency_s"]
    print(f"model writes round 1: {lat['model_round1']:.3f} s; the shortcut writes it: {lat['shortcut']:.3f} s; "
          f"saved {report['saved_s']:.3f} s, ratio {report['ratio_shortcut_to_model']:.3f} "
          f"(gate declines: {report['declined_overhead_s']:+.3f} s)")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
