"""Two diagnostic probes of a ZoomWorld default, for the README's "what it shows":

* **crop reading:** the plain model on crops around the asked plate (1.3-5x its size, as in training), so
  reading is measured apart from finding the plate;
* **oracle twig:** Q-Zoom with the twig's box replaced by the true plate's box (`oracle_box`: the grid cells that
  touch it and one cell around, forced through `generate_from_inputs(boxes=...)`), so the crop pass is measured
  apart from the twig;
* **grounding:** the plain model asked "Where is the red plate?" (and the detail question + GROUNDING_PROMPT,
  the stage-1 teacher's prompt) on whole scenes: the share of well-formed boxes, mean IoU with the asked plate
  and the share with IoU >= 0.5. It says whether the base model binds a colour word to a plate, which the
  natural-mode labels need;
* **binding:** per decoder head, the share of its plate attention that lands on the asked plate (`binding`), from
  the rows that must find it (an answer's first row, a box's rows, the question's colour word).

    python -m qzoom_adapters.benchmarks.zoomworld.probes [--model DEFAULT_DIR] [--n 32] [--budgets 64,128] [--grounding-only]

Validation split, detail questions, batch size 1 for the oracle.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random

import torch

from qzoom_adapters.roi import box_to_pixels, token_box

from .generator import GROUNDING_PROMPT, VAL_SEED, make_sample, parse_box_text
from .model import FACTOR
from .scoring import exact_match, iou


def box_cells(box, size, h_t: int, w_t: int) -> torch.Tensor:
    """(h_t, w_t) 0/1 mask of the grid cells that touch the pixel `box` of an image of `size` (W, H)."""
    (x1, y1, x2, y2), (W, H) = box, size
    keep = torch.zeros(h_t, w_t)
    keep[y1 * h_t // H: -(-y2 * h_t // H), x1 * w_t // W: -(-x2 * w_t // W)] = 1
    return keep


def oracle_box(box, size, grid_hw, min_side: int = 28) -> tuple[int, int, int, int]:
    """The source-pixel box of the (h_t, w_t) grid cells that touch the pixel `box` plus one cell around them: the
    box the twig gives for a map whose only foreground is those cells (the blur's one-cell halo at threshold 0)."""
    h_t, w_t = grid_hw
    x1, y1, x2, y2 = token_box(box_cells(box, size, h_t, w_t) > 0)
    grown = max(0, x1 - 1), max(0, y1 - 1), min(w_t, x2 + 1), min(h_t, y2 + 1)
    return box_to_pixels(grown, (h_t, w_t), size, min_side)


@torch.no_grad()
def grounding(model, processor, spec, samples, budgets=(256, 1024), batch_size: int = 16) -> dict:
    """Per budget and prompt ("where": "Where is the red plate?", "box_for": the detail question +
    GROUNDING_PROMPT): the share of answers that parse as a box, mean IoU with the asked plate (an unparsable
    answer counts 0) and the share with IoU >= 0.5. `samples` are detail samples (the asked plate is `box`)."""
    from .bench import plain_answers

    colour = {s.id: next(p.colour for p in s.plates if p.box == s.box) for s in samples}
    prompts = {"where": lambda s: f"Where is the {colour[s.id]} plate?",
               "box_for": lambda s: f"{s.question}\n{GROUNDING_PROMPT}"}
    out = {}
    for b in budgets:
        for name, ask in prompts.items():
            asked = [dataclasses.replace(s, question=ask(s)) for s in samples]
            answers = plain_answers(model, processor, spec, asked, b, batch_size, model.device, max_new_tokens=20)[0]
            boxes = [parse_box_text(a, s.image.size) for a, s in zip(answers, samples)]
            ious = [iou(x, s.box) if x is not None else 0.0 for x, s in zip(boxes, samples)]
            out[f"{name}@{b}"] = {"parsed": sum(x is not None for x in boxes) / len(samples),
                                  "mean_iou": sum(ious) / len(samples),
                                  "iou_ge_0.5": sum(v >= 0.5 for v in ious) / len(samples)}
    return out


@torch.no_grad()
def binding(model, processor, n: int = 24, budgets=(64, 128, 1024), layers=range(6)) -> dict:
    """Per budget and (layer, head): of the attention that the rows binding to a plate (`AnswerCollate.binding_targets`:
    an answer's first row, a box's rows, the question's colour word) give to plates, the share on the asked plate;
    `uniform` is that share for attention spread evenly over the plates' cells. A head that binds colour words
    to plates is well above uniform; before the binding loss every head of the run-11 model sat at uniform."""
    from contextlib import ExitStack

    from qzoom_adapters.hooks import capture_layer_input

    from .train import AnswerCollate, AnswerObjective, stream_item

    items = [stream_item(VAL_SEED + i, crop_p=0.0, square_p=0.0) for i in range(n)]
    dev = next(model.parameters()).device
    objective = AnswerObjective(model, processor, bind_pairs={layer: tuple(range(model.config.text_config.num_attention_heads))
                                                              for layer in layers})
    out = {}
    for b in budgets:
        batch = AnswerCollate(processor, (b,))(items)
        inputs = {k: v.to(dev) for k, v in batch["inputs"].items()}
        pixels = objective.layout.normalize(inputs.pop("pixel_values_u8")).to(model.dtype)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        embeds, pos, _, extra = objective.trunk.encode(ids, mask, pixels, inputs["image_grid_thw"])
        with ExitStack() as stack:
            caps = {i: stack.enter_context(capture_layer_input(objective.spec.layers[i], prefill_only=False))
                    for i in objective.bind_pairs}
            model(inputs_embeds=embeds, attention_mask=mask, position_ids=objective.trunk.model_positions(pos),
                  use_cache=False, **extra)
        image, valid, target = ids == objective.image_token_id, batch["bind_valid"].to(dev), batch["bind_target"].to(dev)
        plates = target.any(1, keepdim=True).expand_as(target)  # every plate the item asks about (all of them)
        asked = objective.binding_mass(caps, batch, image, mask)
        spread = objective.binding_mass(caps, batch, image, mask, target=plates)
        out[b] = {f"{layer}.{head}": round(float(asked[(layer, head)][0][valid].sum() / spread[(layer, head)][0][valid].sum()), 3)
                  for layer, head in asked}
        out[b]["uniform"] = round(float((target.sum(-1).float() / plates.sum(-1).float().clamp(min=1))[valid].mean()), 3)
    return out


@torch.no_grad()
def probe(model_dir=None, n: int = 32, budgets=(64, 128), grounding_only: bool = False) -> dict:
    from .bench import run_baseline, view_inputs
    from .shipped import DEFAULT_DIR, load_default
    from .train import crop_view

    from pathlib import Path

    samples = [make_sample(VAL_SEED + i, "detail") for i in range(n)]
    if grounding_only and (Path(model_dir or DEFAULT_DIR) / "config.json").is_file():  # a bare model folder
        from qzoom_adapters.recipes.models import load_backbone

        model, processor, spec = load_backbone(str(model_dir), eval_mode=True)
        if torch.cuda.is_available():
            model.to("cuda", torch.bfloat16)
        return {"n": n, "grounding": grounding(model, processor, spec, samples), "binding": binding(model, processor)}
    zoom, spec, processor = load_default(model_dir or DEFAULT_DIR)
    found = grounding(zoom.model, processor, spec, samples)
    if grounding_only:
        return {"n": n, "grounding": found, "binding": binding(zoom.model, processor)}
    crops = [dataclasses.replace(s, image=crop_view(s.image, s.box, random.Random(i))[0]) for i, s in enumerate(samples)]
    out = {"n": n, "grounding": found, "crop_reading": {}, "oracle_twig": {}}
    for b in budgets:
        out["crop_reading"][b] = run_baseline(zoom.model, processor, spec, crops, b, 16, zoom.model.device)[0]["accuracy"]["all"]
        oracle = zoom.with_config(crop_min_pixels=b * FACTOR**2, crop_max_pixels=b * FACTOR**2)
        right = []
        for s in samples:
            inputs = view_inputs(spec, processor, [s], b, zoom.model.device)
            grid = spec.token_grid(spec.image_grids(inputs)[0])
            box = oracle_box(s.box, s.image.size, grid, oracle.config.min_crop_px)
            o = oracle.generate_from_inputs(inputs, [s.image], max_new_tokens=5, boxes=[box])[0]
            right.append(o.zoomed and exact_match(o.text, s.answer))
        out["oracle_twig"][b] = sum(right) / n
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a default folder (or, with --grounding-only, a bare model folder)")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--budgets", default="64,128")
    p.add_argument("--grounding-only", action="store_true", help="only the grounding probe")
    args = p.parse_args(argv)
    print(json.dumps(probe(args.model, args.n, tuple(int(b) for b in args.budgets.split(",")), args.grounding_only),
                     indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
