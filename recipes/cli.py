"""The `qzoom` command line."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _demo(args) -> int:
    import torch

    import qzoom_adapters as qz
    from backbones.qwen2_5_vl import Qwen2_5_VLSpec
    from backbones.tiny_processor import TINY_VOCAB_SIZE, tiny_qwen2_5_vl_processor
    from qzoom_adapters.viz import heatmap_overlay
    from recipes.synthetic import demo_scenes

    print("qzoom demo: a TINY RANDOMLY INITIALISED Qwen2.5-VL (no trained default model is shipped yet),")
    print("so answers are noise; what the demo shows is the whole gated pipeline running end to end.")
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    cfg = Qwen2_5_VLSpec.tiny_config(text={"vocab_size": TINY_VOCAB_SIZE})
    model = Qwen2_5_VLSpec.model_class()._from_config(cfg).eval()
    model.generation_config.eos_token_id = 2
    processor = tiny_qwen2_5_vl_processor()
    twig = qz.TwigRPN.from_backbone(model, K=3, T=3)
    gate = qz.DynamicGate.from_backbone(model, K=3, T=3)
    with torch.no_grad():  # an untrained head: spread its random weights so decisions differ per question
        gate.head.weight.normal_(0.0, 1.0)
    zoom = qz.QZoom(model, processor, twig=twig, gate=gate, config=qz.ZoomConfig(gate_threshold=0.0, roi_threshold=2.0))
    scenes = demo_scenes(args.samples, seed=args.seed)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    gate_t, roi_t = args.gate_threshold, args.roi_threshold
    if gate_t is None or roi_t is None:  # untrained adapters: calibrate on this batch so some questions zoom
        probe = zoom.generate([s.image for s in scenes], [s.question for s in scenes], max_new_tokens=1)
        probs = torch.tensor([o.gate_prob for o in probe])
        heat = torch.cat([torch.sigmoid(o.heatmap).flatten() for o in probe])
        gate_t = float(probs.median()) if gate_t is None else gate_t
        roi_t = float(heat.quantile(0.9)) if roi_t is None else roi_t
        print(f"thresholds calibrated on this batch: gate {gate_t:.4f} (median), roi {roi_t:.4f} (90th percentile)")
    zoom.config = qz.ZoomConfig(gate_threshold=gate_t, roi_threshold=roi_t)
    outs = zoom.generate([s.image for s in scenes], [s.question for s in scenes], max_new_tokens=args.max_new_tokens)
    for i, (scene, o) in enumerate(zip(scenes, outs)):
        png = out_dir / f"sample_{i}.png"
        heatmap_overlay(scene.image, o.heatmap, o.bbox, scene.box).save(png)
        print(f"[{i + 1}/{len(scenes)}] {scene.question!r}  gate={o.gate_prob:.3f} zoomed={o.zoomed} "
              f"box={o.bbox} visual_tokens={o.visual_tokens}")
        print(f"      answer={o.text!r}  truth={scene.answer!r}  -> {png}")
    n_zoom = sum(o.zoomed for o in outs)
    print(f"summary: {len(outs)} questions, {n_zoom} zoomed, "
          f"{sum(o.visual_tokens for o in outs) / len(outs):.0f} visual tokens on average, "
          f"{time.perf_counter() - t0:.1f}s; pictures in {out_dir}/")
    return 0


def _infer(args) -> int:
    import json

    from PIL import Image
    from transformers import AutoProcessor

    import backbones.tiny_processor  # noqa: F401  (lets AutoProcessor load processors saved by the demo/tests)
    import qzoom_adapters as qz
    from qzoom_adapters.spec import spec_class_for
    from qzoom_adapters.viz import heatmap_overlay

    overrides = {k: v for k, v in (("gate_threshold", args.gate_threshold), ("roi_threshold", args.roi_threshold),
                                   ("position_mode", args.position_mode)) if v is not None}
    proc_dir = args.processor or args.model or args.reference
    processor = AutoProcessor.from_pretrained(proc_dir)
    if args.reference:
        zoom = qz.QZoom.from_reference_checkpoint(args.reference, processor, **overrides)
    else:
        if not (args.model and args.adapters):
            raise SystemExit("qzoom infer: give --model and --adapters, or --reference")
        model_type = json.loads((Path(args.model) / "config.json").read_text())["model_type"]
        model = spec_class_for(model_type).model_class().from_pretrained(args.model).eval()
        zoom = qz.QZoom.from_pretrained(args.adapters, model, processor, **overrides)
    image = Image.open(args.image).convert("RGB")
    out = zoom.generate([image], [args.question], max_new_tokens=args.max_new_tokens)[0]
    gate = "n/a" if out.gate_prob is None else f"{out.gate_prob:.3f}"
    print(f"gate={gate} zoomed={out.zoomed} box={out.bbox} visual_tokens={out.visual_tokens}")
    print(out.text)
    if args.heatmap:
        heatmap_overlay(image, out.heatmap, out.bbox).save(args.heatmap)
        print(f"heatmap -> {args.heatmap}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qzoom", description="Q-Zoom adapters for Hugging Face MLLMs")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run the gated pipeline end to end on the embedded default (CPU, no download)",
                       description="Example: qzoom demo --out qzoom-demo")
    d.add_argument("--out", default="qzoom-demo", help="folder for the per-sample PNGs")
    d.add_argument("--samples", type=int, default=4)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--gate-threshold", type=float, help="default: calibrated on the demo batch")
    d.add_argument("--roi-threshold", type=float, help="default: calibrated on the demo batch")
    d.add_argument("--max-new-tokens", type=int, default=8)
    d.set_defaults(func=_demo)
    i = sub.add_parser("infer", help="answer one question about one image",
                       description="Example: qzoom infer --adapters ADAPTERS --model MODEL --image img.png "
                                   "--question 'What is written on the red plate?' --heatmap heat.png")
    i.add_argument("--adapters", help="folder written by QZoom.save_pretrained")
    i.add_argument("--model", help="HF model folder the adapters belong to")
    i.add_argument("--reference", help="a released Q-Zoom checkpoint folder (instead of --model/--adapters)")
    i.add_argument("--processor", help="processor folder (default: the model folder)")
    i.add_argument("--image", required=True)
    i.add_argument("--question", required=True)
    i.add_argument("--heatmap", help="write the image with heatmap and box to this PNG")
    i.add_argument("--gate-threshold", type=float)
    i.add_argument("--roi-threshold", type=float)
    i.add_argument("--position-mode", choices=["aligned", "sequential"])
    i.add_argument("--max-new-tokens", type=int, default=32)
    i.set_defaults(func=_infer)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from qzoom_adapters.errors import QZoomError

    try:
        return args.func(args)
    except QZoomError as err:
        print(f"qzoom {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
