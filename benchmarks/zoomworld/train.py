"""Train the ZoomWorld default model from scratch (answers at mixed budgets), on the project's trainer.

    python -m qzoom_adapters.benchmarks.zoomworld.train --out zoomworld-model --steps 20000 [--batch-size 32]

Every step draws fresh ZoomWorld items (seeded: the index fixes the item) at one visual-token budget
per batch: a scene with all its questions as one conversation, or a crop around a plate. The loss
is the answers' cross-entropy plus a dense reading loss on the visual features (`AnswerObjective`).
Checkpoints, resume and the loss curve (train_log.csv) come from `qzoom_adapters.recipes.trainer.Trainer`.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from qzoom_adapters.hooks import capture_layer_input
from qzoom_adapters.probe import attention_rows

from .batches import FastChatInputs, PatchLayout, budget_size
from .generator import COLOURS, TEST_SEED, VAL_SEED, Plate, grounding_questions, make_scene, scene_questions
from .model import BUDGETS, FACTOR, new_model
from .roi_items import ROI_BUDGETS, roi_item, roi_loss


CROP_VIEW_P = 0.5  # share of items that show a crop around one plate (teaches reading at many scales)
SQUARE_VIEW_P = 0.15  # share of scene items padded to a grey square (the stage-1 teacher's view, SPEC 4.1)
GREY = (127, 127, 127)


def crop_view(image, box, rng: random.Random):
    """A random crop holding the whole `box`, 1.3-5x its size: (crop, its (left, top) offset)."""
    x1, y1, x2, y2 = box
    W, H = image.size
    side = max(x2 - x1, y2 - y1) * rng.uniform(1.3, 5.0)
    aspect = rng.uniform(0.6, 1.6)
    cw = int(min(W, max(x2 - x1 + 2, side * aspect ** 0.5)))
    ch = int(min(H, max(y2 - y1 + 2, side / aspect ** 0.5)))
    left = rng.randint(max(0, x2 - cw), min(x1, W - cw))
    top = rng.randint(max(0, y2 - ch), min(y1, H - ch))
    return image.crop((left, top, left + cw, top + ch)), (left, top, left + cw, top + ch)


class StreamDataset(torch.utils.data.Dataset):
    """Index i -> the training-stream item at seed `base + i`: an image and the questions it answers, in a
    seeded order (one conversation, so one image encoding teaches several answers).

    The image is the scene or, with probability `crop_p`, a crop around one plate; a scene is padded to a
    grey square with probability `square_p` (the stage-1 teacher's view). Questions: every code question
    of the plates wholly in view, the global questions on whole scenes, and, with `grounding`, per plate in
    view one grounding question ("Where is ...?" or the detail question + GROUNDING_PROMPT, answered with
    its box on the 0-1000 grid of the view) and one reverse-binding question for a random plate.
    """

    def __init__(self, n: int, base: int = 1_000, crop_p: float = CROP_VIEW_P, grounding: bool = True,
                 square_p: float = SQUARE_VIEW_P):
        if base + n > VAL_SEED and base < TEST_SEED + 10**6:
            raise ValueError(f"training seeds {base}..{base + n} would reach the val/test seeds ({VAL_SEED}+)")
        self.n, self.base, self.crop_p, self.grounding, self.square_p = n, base, crop_p, grounding, square_p

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return stream_item(self.base + i, self.crop_p, self.square_p, self.grounding)


def stream_item(seed: int, crop_p: float = CROP_VIEW_P, square_p: float = SQUARE_VIEW_P, grounding: bool = True) -> dict:
    """The item `StreamDataset` gives for `seed` (any split's seeds: the probes read validation scenes with it)."""
    rng = random.Random(seed * 104729 + 17)
    image, plates = make_scene(seed)
    qas = scene_questions(plates)
    l, t = 0, 0
    if rng.random() < crop_p:
        image, (l, t, r, b) = crop_view(image, rng.choice(plates).box, rng)
        qas = [qa for qa in qas if qa[3] == "code"]
    elif grounding and rng.random() < square_p:
        W, H = image.size
        side = max(W, H)
        square = Image.new("RGB", (side, side), GREY)
        l, t = -((side - W) // 2), -((side - H) // 2)
        square.paste(image, (-l, -t))
        image = square
    W, H = image.size
    # the plates in view, in the view's coordinates
    shown = [Plate(p.colour, p.code, (p.box[0] - l, p.box[1] - t, p.box[2] - l, p.box[3] - t), p.glyphs)
             for p in plates]
    shown = [p for p in shown if p.box[0] >= 0 and p.box[1] >= 0 and p.box[2] <= W and p.box[3] <= H]
    codes = {p.code for p in shown}
    qas = [qa for qa in qas if qa[3] != "code" or qa[1] in codes]
    if grounding and shown:
        ground = grounding_questions(shown, (W, H))
        by_plate = [ground[k:k + 3] for k in range(0, len(ground), 3)]  # where, box_for, reverse
        qas += [rng.choice(g[:2]) for g in by_plate] + [rng.choice(by_plate)[2]]
    rng.shuffle(qas)
    boxes = [None if box is None else (box if qa_kind == "grounding" else _moved(box, l, t))
             for _, _, qa_kind, _, box in qas]
    glyphs = [(ch, (x1 + x2) / 2 - l, (y1 + y2) / 2 - t, y2 - y1) for p in plates for ch, (x1, y1, x2, y2) in p.glyphs
              if 0 <= (x1 + x2) / 2 - l < W and 0 <= (y1 + y2) / 2 - t < H]
    return {"image": image, "qas": [(q, a) for q, a, *_ in qas], "boxes": boxes, "seed": seed, "glyphs": glyphs,
            "plates": [(p.colour, p.code, p.box) for p in shown]}


def _colour_word_end(question: str, ids_of) -> int | None:
    """The token index, within the question's tokens, of the last character of its colour word (None without one)."""
    for colour in COLOURS:
        at = question.find(f" {colour} ")
        if at >= 0:
            return len(ids_of(question[: at + 1 + len(colour)])) - 1
    return None


def _last_occurrence(seq: list, sub: list) -> int | None:
    for i in range(len(seq) - len(sub), -1, -1):
        if seq[i: i + len(sub)] == sub:
            return i
    return None


def _moved(box, left: int, top: int):
    """A scene-pixel box in the coordinates of a view whose top-left corner is the scene's (left, top)."""
    return box[0] - left, box[1] - top, box[2] - left, box[3] - top


class AnswerCollate:
    """One budget per batch (from its first item's seed); each item is a conversation of its questions and
    answers (prompt left-padded, the rest right-padded), with labels on the answers (+ end of turn) only.

    With `roi_p` > 0 that share of batches (drawn from the first item's seed) are RoI batches (`roi_items`): at a
    Q-Zoom budget, every item gets a crop around one of its plates, `batch["roi"]` holds the crops' patches, grids
    and token boxes, and only the code questions of plates in the crop are asked; `AnswerObjective` lays them out
    as the pipeline's pass B. A batch in which some item has no such question stays an ordinary one.

    Pixels stay uint8 patches (`FastChatInputs`); `AnswerObjective` normalises them on the device.
    """

    def __init__(self, processor, budgets=BUDGETS, roi_p: float = 0.0):
        if not 0.0 <= roi_p <= 1.0:
            raise ValueError(f"roi_p must be in [0, 1], got {roi_p}")
        self.processor, self.budgets, self.roi_p = processor, budgets, roi_p
        self.fast = FastChatInputs(processor)
        turn = processor.apply_chat_template(
            [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
             {"role": "user", "content": "Q"}], add_generation_prompt=True, tokenize=False)
        self.next_turn = turn[turn.index("A<|im_end|>") + len("A<|im_end|>"):].split("Q")  # between answer and question

    def _ids(self, text: str) -> list[int]:
        return self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _as_roi(self, items):
        """(RoI items, their budget), or None for an ordinary batch."""
        seed = items[0]["seed"]
        rng = random.Random(seed * 15485863 + 7)
        if not self.roi_p or rng.random() >= self.roi_p:
            return None
        budget = ROI_BUDGETS[rng.randrange(len(ROI_BUDGETS))]
        unit = self.fast.layout.factor
        out = []
        for it in items:
            h, w = budget_size(it["image"].width, it["image"].height, budget * FACTOR**2, unit)
            r = roi_item(it, (h // unit, w // unit), it["seed"])
            if r is None:
                return None
            out.append(r)
        return out, budget

    def __call__(self, items):
        budget = self.budgets[items[0]["seed"] % len(self.budgets)]
        roi = self._as_roi(items)
        if roi is not None:
            items, budget = roi
        inputs = self.fast([it["image"] for it in items], [it["qas"][0][0] for it in items], budget * FACTOR**2)
        eos, pad = self.processor.tokenizer.eos_token_id, self.processor.tokenizer.pad_token_id
        tails, answer_spans = [], []
        for it in items:
            ids, lab, spans = [], [], []
            for k, (q, a) in enumerate(it["qas"]):
                if k:  # the next user turn (no loss), then its answer
                    turn = self._ids(self.next_turn[0]) + self._ids(q) + self._ids(self.next_turn[1])
                    ids += turn
                    lab += [-100] * len(turn)
                ans = self._ids(a) + [eos]
                spans.append((len(ids), len(ans) - 1))  # where its answer starts in the tail, its length without eos
                ids += ans
                lab += ans
            tails.append((ids, lab))
            answer_spans.append(spans)
        n = max(len(t[0]) for t in tails)
        B = len(items)
        ids = torch.full((B, n), pad)
        labels = torch.full((B, n), -100)
        mask = torch.zeros(B, n, dtype=torch.long)
        for b, (t, lab) in enumerate(tails):
            ids[b, : len(t)] = torch.tensor(t)
            labels[b, : len(t)] = torch.tensor(lab)
            mask[b, : len(t)] = 1
        labels = torch.cat([torch.full_like(inputs["input_ids"], -100), labels], dim=1)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], ids], dim=1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], mask], dim=1)
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(ids)], dim=1)
        glyph_rows, glyph_ids = self.glyph_targets(items, inputs["image_grid_thw"])
        prompt_len = labels.shape[1] - n
        out = {"inputs": inputs, "labels": labels, "glyph_rows": glyph_rows, "glyph_ids": glyph_ids}
        if roi is None:
            return {**out, **self.binding_targets(items, answer_spans, prompt_len, inputs["input_ids"],
                                                  inputs["image_grid_thw"])}
        crops = self.fast([it["crop"] for it in items], [""] * len(items), budget * FACTOR**2)
        crop_rows, crop_ids = self.glyph_targets([{"image": it["crop"], "glyphs": it["crop_glyphs"]} for it in items],
                                                 crops["image_grid_thw"])
        B, S = inputs["input_ids"].shape  # the binding loss's rows would move with the RoI block: none here
        return {**out, "bind_rows": torch.zeros(B, 1, dtype=torch.long), "bind_valid": torch.zeros(B, 1, dtype=torch.bool),
                "bind_target": torch.zeros(B, 1, S, dtype=torch.bool),
                "roi": {"pixel_values_u8": crops["pixel_values_u8"], "image_grid_thw": crops["image_grid_thw"],
                        "box_tok": [it["box_tok"] for it in items], "glyph_rows": crop_rows, "glyph_ids": crop_ids}}

    def binding_targets(self, items, answer_spans, prompt_len: int, input_ids, grids, max_rows: int = 8) -> dict:
        """The rows that predict an answer about one plate (the first; a box's first `max_rows`) and, per row, the image
        tokens whose merged cell touches that plate: `bind_rows` (B, R), `bind_valid` (B, R), `bind_target` (B, R, S).

        Image tokens are the prompt's image pads, in the raster order of the merged grid (one image per item)."""
        unit = self.fast.layout.factor
        image = input_ids == self.fast.image_token_id
        per_item = []
        for it, spans, (_, gh, gw), b in zip(items, answer_spans, grids.tolist(), range(len(items))):
            W, H = it["image"].size
            ch_, cw_ = gh * self.fast.layout.patch // unit, gw * self.fast.layout.patch // unit
            sx, sy = gw * self.fast.layout.patch / W, gh * self.fast.layout.patch / H
            pads = image[b].nonzero().flatten()
            rows = []
            for box, (start, length), (question, answer) in zip(it.get("boxes", ()), spans, it["qas"]):
                if box is None:
                    continue
                # a code or colour answer's later rows could find the plate by echoing the characters already
                # written (a teacher-forced 'K' matches the glyph K): only its first row must bind; a box's
                # digits echo nothing in the image, so all its rows (up to max_rows) count
                n_rows = min(length, max_rows) if answer.startswith("[") else 1
                x1, y1, x2, y2 = box
                cells = torch.zeros(ch_, cw_, dtype=torch.bool)
                cells[min(int(y1 * sy // unit), ch_ - 1): max(int(-(-y2 * sy // unit)), 1),
                      min(int(x1 * sx // unit), cw_ - 1): max(int(-(-x2 * sx // unit)), 1)] = True
                keys = pads[cells.flatten()]
                for r in range(n_rows):
                    rows.append((prompt_len + start + r - 1, keys))
                word = _colour_word_end(question, self._ids)
                if word is not None:  # the question's colour word (its last character): the same plate
                    q_ids = self._ids(question)
                    at = _last_occurrence(input_ids[b, : prompt_len + start].tolist(), q_ids)
                    if at is not None:
                        rows.append((at + word, keys))
            per_item.append(rows)
        B, S = input_ids.shape
        R = max(1, max(len(r) for r in per_item))
        out = {"bind_rows": torch.zeros(B, R, dtype=torch.long), "bind_valid": torch.zeros(B, R, dtype=torch.bool),
               "bind_target": torch.zeros(B, R, S, dtype=torch.bool)}
        for b, rows in enumerate(per_item):
            for r, (row, keys) in enumerate(rows):
                out["bind_rows"][b, r] = row
                out["bind_valid"][b, r] = True
                out["bind_target"][b, r, keys] = True
        return out

    def glyph_targets(self, items, grids, min_height: float = 10.0):
        """Rows of the visual features (all images concatenated, raster order of merged cells) that hold exactly
        one character's centre, drawn at least `min_height` px high in the resized view, and that character's id."""
        unit = self.fast.layout.factor
        rows, ids, offset = [], [], 0
        for it, (_, gh, gw) in zip(items, grids.tolist()):
            W, H = it["image"].size
            ch_, cw_ = gh * self.fast.layout.patch // unit, gw * self.fast.layout.patch // unit  # merged grid
            sx, sy = gw * self.fast.layout.patch / W, gh * self.fast.layout.patch / H
            cells = {}
            for ch, cx, cy, h in it["glyphs"]:
                if h * sy < min_height:
                    continue
                cell = min(int(cy * sy // unit), ch_ - 1) * cw_ + min(int(cx * sx // unit), cw_ - 1)
                cells.setdefault(cell, []).append(ch)
            for cell, chars in sorted(cells.items()):
                if len(chars) == 1:
                    rows.append(offset + cell)
                    ids.append(self.processor.tokenizer.convert_tokens_to_ids(chars[0]))
            offset += ch_ * cw_
        return torch.tensor(rows, dtype=torch.long), torch.tensor(ids, dtype=torch.long)


BIND_PAIRS = {2: (0, 1), 3: (0, 1)}  # (layer: heads) whose attention the binding loss teaches to find the asked plate


class AnswerObjective(nn.Module):
    """Answer loss (every parameter training) plus, with weight `glyph_weight`, a dense reading loss: the LM
    head must name the character under each visual feature that holds one (see `glyph_targets`). It gives
    the from-scratch vision tower a signal per character instead of one per answer; the model and its
    forward are the ordinary HF ones (the loss only reads the features the LLM receives).

    With `bind_weight` > 0, a binding loss as well: at the `BIND_PAIRS` heads, the rows that predict an answer
    about a plate (its code, its box, its colour) must put their image attention on that plate's cells
    (-log of the share of image attention there, mean over rows and pairs). It stands in for the grounded
    attention real VLMs bring from their pretraining data (a 6M model with no absolute position features did not
    learn to ground from box answers in 1430 steps: box IoU 0.002-0.02); the twig still learns from the model's
    own attention, with heads chosen by `qzoom heads`."""

    def __init__(self, model, processor, glyph_weight: float = 1.0, bind_weight: float = 0.0, bind_pairs=None):
        super().__init__()
        from qzoom_adapters.spec import get_spec
        from qzoom_adapters.trunk import Trunk

        self.model = model
        self.layout = PatchLayout(processor.image_processor)
        self.glyph_weight = glyph_weight
        self.bind_weight = bind_weight
        self.bind_pairs = dict(BIND_PAIRS if bind_pairs is None else bind_pairs)
        self.spec = get_spec(model)
        self.trunk = Trunk(self.spec)
        self.image_token_id = processor.tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", "<|image_pad|>"))

    @staticmethod
    def loss_terms(batch) -> int:
        return int((batch["labels"][:, 1:] != -100).sum())

    def forward(self, batch, parts: bool = False):
        dev = next(self.model.parameters()).device
        inputs = {k: v.to(dev, non_blocking=True) for k, v in batch["inputs"].items()}
        pixels = self.layout.normalize(inputs.pop("pixel_values_u8"))
        ids, mask, grids = inputs["input_ids"], inputs["attention_mask"], inputs["image_grid_thw"]
        if "roi" in batch:  # the pass-B layout; the binding loss has no rows here
            loss, feats, crop_feats = roi_loss(self, batch, ids, mask, pixels, grids, dev)
            glyph = loss.new_zeros(())
            if self.glyph_weight:
                glyph = self.glyph_loss(feats, batch["glyph_rows"], batch["glyph_ids"], crop_feats,
                                        batch["roi"]["glyph_rows"], batch["roi"]["glyph_ids"])
            total = loss + self.glyph_weight * glyph
            return (total, loss.detach(), glyph.detach(), loss.new_zeros(())) if parts else total
        embeds, pos, feats, extra = self.trunk.encode(ids, mask, pixels, grids)
        binding = self.bind_weight > 0 and bool(batch["bind_valid"].any())
        with ExitStack() as stack:
            caps = {i: stack.enter_context(capture_layer_input(self.spec.layers[i], prefill_only=False))
                    for i in (self.bind_pairs if binding else ())}
            out = self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=self.trunk.model_positions(pos),
                             labels=batch["labels"].to(dev), use_cache=False, **extra)
        loss, glyph, bind = out.loss, out.loss.new_zeros(()), out.loss.new_zeros(())
        if self.glyph_weight:
            glyph = self.glyph_loss(feats, batch["glyph_rows"], batch["glyph_ids"])
        if binding:
            bind = self.binding_loss(caps, batch, ids == self.image_token_id, mask)
        total = loss + self.glyph_weight * glyph + self.bind_weight * bind
        return (total, loss.detach(), glyph.detach(), bind.detach()) if parts else total

    def glyph_loss(self, *feats_rows_ids) -> torch.Tensor:
        """Mean character CE over (features, rows, ids) triples: the LM head names the glyph under each row."""
        head = self.model.get_output_embeddings()
        dev = head.weight.device
        rows = [(f.embeds[r.to(dev)], i.to(dev)) for f, r, i in zip(*[iter(feats_rows_ids)] * 3) if r.numel()]
        if not rows:
            return head.weight.new_zeros(())
        x, y = torch.cat([r for r, _ in rows]), torch.cat([i for _, i in rows])
        return nn.functional.cross_entropy(head(x).float(), y)

    def binding_mass(self, caps, batch, image, mask, target=None) -> dict:
        """{(layer, head): ((B, R) attention on the rows' plate cells, (B, R) attention on all image tokens)}."""
        dev = image.device
        rows = batch["bind_rows"].to(dev)
        target = (batch["bind_target"] if target is None else target).to(dev)
        masses = {}
        for layer, heads in self.bind_pairs.items():
            attn = attention_rows(self.spec, self.spec.layers[layer], caps[layer].hidden, caps[layer].kwargs, rows, mask)
            on_image = (attn * image[:, None, None, :]).sum(-1)  # (B, H, R)
            on_plate = (attn * target[:, None]).sum(-1)
            for h in heads:
                masses[(layer, h)] = on_plate[:, h], on_image[:, h]
        return masses

    def binding_loss(self, caps, batch, image, mask) -> torch.Tensor:
        """-log(plate / (image + 0.01)): a head that looks away from the image is pushed to the plate too (a bare
        plate / image ratio would reward a head whose little image attention happens to sit there)."""
        valid = batch["bind_valid"].to(image.device).float()
        per_pair = [-(((plate + 1e-6) / (img + 0.01)).clamp(max=1.0).log() * valid).sum() / valid.sum()
                    for plate, img in self.binding_mass(caps, batch, image, mask).values()]
        return torch.stack(per_pair).mean()


def measure(objective, collate, batch_size: int, num_workers: int, seconds: float = 12.0,
            crop_p: float = CROP_VIEW_P, square_p: float = SQUARE_VIEW_P) -> dict:
    """Samples/s the loader gives, and the seconds of one forward + backward per budget (to plan a time budget).

    The loader is timed after the batches its workers queue at start; keep `max_seconds` set beside
    `plan_seconds` all the same (a stop at the time budget saves the model with the schedule unfinished)."""
    dataset = StreamDataset(10**6, base=5_000_000, crop_p=crop_p, square_p=square_p)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=num_workers,
                                         shuffle=False, persistent_workers=False, prefetch_factor=4 if num_workers else None)
    # the workers start by filling their queues (prefetch_factor batches each): the clock starts after those
    # batches, so the rate is the steady one (counting them overestimated it ~1.5x and cut runs short)
    queued = num_workers * 4 if num_workers else 0
    t0, n, first = time.perf_counter(), 0, None
    for k, batch in enumerate(loader):
        if k < queued:
            continue
        if first is None:
            first = time.perf_counter()
            continue
        n += batch["labels"].shape[0]
        if time.perf_counter() - first > seconds:
            break
    data_rate = n / max(time.perf_counter() - first, 1e-9)
    step = {}
    cuda = torch.cuda.is_available()
    for budget in collate.budgets:
        items = [dataset[i] for i in range(batch_size)]
        batch = AnswerCollate(collate.processor, (budget,))(items)
        times = []
        for _ in range(3):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                objective(batch).backward()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        step[budget] = min(times[1:])
    objective.zero_grad(set_to_none=True)
    # the plan takes loading and computing as not overlapping: on the lent H200 (16 cores, 14 workers) run 10
    # measured 0.21 s a batch loaded and 0.22 s a step computed but trained at 0.36-0.40 s a step (the workers
    # and the main process share the cores), so the larger of the two overestimated throughput ~1.7x; the sum
    # is the safe side (the schedule ends a little early rather than being cut at `max_seconds`)
    return {"loader_samples_per_s": data_rate, "step_s_per_budget": step,
            "step_s": batch_size / data_rate + sum(step.values()) / len(step), "startup_s": first - t0}


def train(out, steps: int | None, batch_size: int = 32, lr: float = 1e-3, num_workers: int = 0, seed: int = 0,
          stop_after: int | None = None, max_seconds: float | None = None, init: str | None = None,
          plan_seconds: float | None = None, budgets=BUDGETS, crop_p: float = CROP_VIEW_P,
          square_p: float = SQUARE_VIEW_P, grounding: bool = True, bind_weight: float = 0.0,
          roi_p: float = 0.0) -> dict:
    """Train (or continue from `init`, a saved model folder) for `steps`, or as many as `plan_seconds` allow
    at the measured throughput (the cosine schedule then ends on time)."""
    from qzoom_adapters.recipes.config import TrainSection
    from qzoom_adapters.recipes.trainer import Trainer, process_state

    model, processor = new_model(seed)
    if init is not None:
        from qzoom_adapters.recipes.models import load_backbone

        model = load_backbone(init)[0].float()
    model.train()
    # one process per GPU under `accelerate launch` / torchrun: each process trains on its own device
    state = process_state()
    world = state.num_processes
    objective = AnswerObjective(model.to(state.device), processor, bind_weight=bind_weight)
    collate = AnswerCollate(processor, tuple(budgets), roi_p=roi_p)
    probe = None
    if plan_seconds is not None and world > 1:
        from qzoom_adapters.errors import QZoomError

        raise QZoomError("--plan-seconds measures one process; with several processes give --steps and "
                         "--max-seconds (all processes stop together at the time budget)")
    if plan_seconds is not None:
        probe = measure(objective, collate, batch_size, num_workers, crop_p=crop_p, square_p=square_p)
        steps = max(1, int(0.95 * (plan_seconds - probe["startup_s"]) / probe["step_s"]))
        print(json.dumps({"plan": probe, "steps": steps}, indent=1), flush=True)
    cfg = TrainSection(lr=lr, weight_decay=0.01, warmup_ratio=0.03, max_steps=steps, batch_size=batch_size,
                       effective_batch=batch_size * world, save_every=max(1, min(1000, steps)), seed=seed,
                       num_workers=num_workers, log_every=max(1, min(50, steps)))
    # a continued run draws fresh scenes: seed s > 0 starts the stream at s million (all below the val seeds)
    dataset = StreamDataset(steps * batch_size * world, base=1_000 + (seed % 9) * 10**6 if init else 1_000, crop_p=crop_p,
                            grounding=grounding, square_p=square_p)

    def save(module, out_dir):
        # a bf16 copy is what ships (~12 MB); the training weights stay fp32
        copy.deepcopy(module.model).to(torch.bfloat16).save_pretrained(str(Path(out_dir) / "model"))
        processor.save_pretrained(str(Path(out_dir) / "model"))

    result = Trainer(objective, dataset, collate, cfg, out, save, stop_after=stop_after,
                     max_seconds=max_seconds).train()
    if probe is not None:
        result["plan"] = probe
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--plan-seconds", type=float, help="measure throughput, then plan as many steps as fit in this time")
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="visual-token budgets, one per batch")
    p.add_argument("--crop-p", type=float, default=CROP_VIEW_P, help="share of items that are crop views")
    p.add_argument("--square-p", type=float, default=SQUARE_VIEW_P,
                   help="share of scene items padded to a grey square (the stage-1 teacher's view)")
    p.add_argument("--no-grounding", action="store_true",
                   help="train without the grounding and reverse-binding questions (the mix before run 10)")
    p.add_argument("--bind-weight", type=float, default=0.0,
                   help="weight of the binding loss (AnswerObjective): the BIND_PAIRS heads' attention on the asked plate")
    p.add_argument("--roi-p", type=float, default=0.0,
                   help="share of batches in the pass-B layout [global | RoI] at the Q-Zoom budgets (roi_items)")
    p.add_argument("--init", help="continue from this saved model folder (new optimizer and schedule)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num-workers", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, help="finish (and save) at the first step past this time budget")
    args = p.parse_args(argv)
    result = train(args.out, args.steps, args.batch_size, args.lr, args.num_workers, args.seed,
                   max_seconds=args.max_seconds, init=args.init, plan_seconds=args.plan_seconds,
                   budgets=[int(b) for b in args.budgets.split(",")], crop_p=args.crop_p, square_p=args.square_p,
                   grounding=not args.no_grounding, bind_weight=args.bind_weight, roi_p=args.roi_p)
    from qzoom_adapters.recipes.trainer import process_state

    if process_state().is_main_process:  # every process returns the same summary
        print(json.dumps(result, indent=1))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # under torchrun: leave the process group cleanly
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
