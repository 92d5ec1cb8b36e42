"""ZoomWorld RoI training items: the sequence the base model trains on is the pipeline's pass-B sequence."""
import random

import pytest
import torch

from qzoom_adapters.benchmarks.zoomworld.model import FACTOR, new_model
from qzoom_adapters.benchmarks.zoomworld.roi_items import roi_batch, roi_box, roi_hidden
from qzoom_adapters.benchmarks.zoomworld.train import AnswerCollate, AnswerObjective, stream_item


def _roi_batch_of_one(processor, seed, budget):
    """A one-item, one-question RoI batch at `budget` (or None when that seed gives no RoI batch)."""
    item = stream_item(seed, crop_p=0.0, square_p=0.0)
    collate = AnswerCollate(processor, (budget,), roi_p=1.0)
    roi = collate._as_roi([item])
    if roi is None:
        return None
    (r,), roi_budget = roi
    one = dict(r, qas=r["qas"][:1], boxes=[None], seed=seed)
    return AnswerCollate(processor, (budget,), roi_p=1.0)([one]), one, roi_budget


def test_roi_boxes_hold_the_plate_on_whole_cells():
    rng = random.Random(0)
    for _ in range(200):
        W, H = rng.randint(800, 1600), rng.randint(600, 1400)
        h_t, w_t = rng.randint(6, 20), rng.randint(6, 20)
        x1, y1 = rng.randint(0, W - 120), rng.randint(0, H - 60)
        plate = (x1, y1, x1 + rng.randint(40, 120), y1 + rng.randint(20, 60))
        box_tok, px = roi_box(plate, (W, H), (h_t, w_t), rng)
        tx1, ty1, tx2, ty2 = box_tok
        assert 0 <= tx1 < tx2 <= w_t and 0 <= ty1 < ty2 <= h_t
        # the token box covers the plate's cells, the pixel box is those cells (ends truncated to pixels)
        assert tx1 <= plate[0] * w_t // W and ty1 <= plate[1] * h_t // H
        assert tx2 >= -(-plate[2] * w_t // W) and ty2 >= -(-plate[3] * h_t // H)
        assert px[0] <= plate[0] and px[1] <= plate[1] and px[2] >= plate[2] - 1 and px[3] >= plate[3] - 1


def test_roi_items_ask_only_codes_in_the_crop():
    from qzoom_adapters.benchmarks.zoomworld.model import zoomworld_processor

    collate = AnswerCollate(zoomworld_processor(), (64,), roi_p=1.0)
    seen = 0
    for seed in range(3_000_000, 3_000_040):
        item = stream_item(seed, crop_p=0.0, square_p=0.0)
        roi = collate._as_roi([item])
        if roi is None:
            continue
        (r,), budget = roi
        assert budget in (64, 128, 256)
        rr, b = r["crop"].size
        codes = {code for _, code, _ in item["plates"]}
        assert r["qas"] and all(a in codes for _, a in r["qas"])
        for ch, cx, cy, h in r["crop_glyphs"]:
            assert 0 <= cx < rr and 0 <= cy < b
        seen += 1
    assert seen >= 10


@pytest.mark.parametrize("budget", [64, 128])
def test_roi_batch_is_the_pipelines_pass_b(budget, one_thread):
    """Ids and aligned positions equal the pipeline's RoI sequence for the same box, and the row before the answer
    gives the logits the pipeline decodes its first token from."""
    import qzoom_adapters as qz
    from qzoom_adapters.roi import pixels_to_token_box
    from qzoom_adapters.twig import TwigRPN

    model, processor = new_model(0)
    model.eval()
    objective = AnswerObjective(model, processor)
    checked = 0
    for seed in range(3_000_000, 3_000_060):
        made = _roi_batch_of_one(processor, seed, budget)
        if made is None:
            continue
        batch, one, roi_budget = made
        inputs = batch["inputs"]
        grid = inputs["image_grid_thw"][0]
        h_t, w_t = int(grid[1]) // 2, int(grid[2]) // 2
        box_tok = batch["roi"]["box_tok"][0]
        W, H = one["image"].size
        px = tuple(int(v) for v in (box_tok[0] * W / w_t, box_tok[1] * H / h_t, box_tok[2] * W / w_t, box_tok[3] * H / h_t))
        if pixels_to_token_box(px, (h_t, w_t), (W, H)) != tuple(box_tok):
            continue  # a caller's box touching one more cell: the pipeline would align it differently
        pixels = roi_budget * FACTOR**2
        twig = TwigRPN.from_backbone(model, K=4, T=2)
        zoom = qz.QZoom(model, processor, twig=twig,
                        config=qz.ZoomConfig(crop_min_pixels=pixels, crop_max_pixels=pixels))
        q = one["qas"][0][0]
        chat = zoom.spec.chat_inputs(processor, [one["image"]], [q], pixels=pixels)
        out = zoom.generate_from_inputs(chat, [one["image"]], max_new_tokens=1, return_trace=True,
                                        force_zoom=[True], boxes=[px])[0]
        with torch.no_grad():
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            pix = objective.layout.normalize(inputs["pixel_values_u8"])
            rb = roi_batch(objective, batch, ids, mask, pix, inputs["image_grid_thw"], torch.device("cpu"))
            first = int((rb.labels[0] != -100).nonzero()[0])  # the first answer token
            trace_ids = out.trace["roi_input_ids"]
            assert torch.equal(rb.ids[0, first - len(trace_ids): first], trace_ids)
            assert torch.allclose(rb.pos[:, 0, first - len(trace_ids): first], out.trace["roi_position_ids"].float())
            hidden = roi_hidden(objective, rb)[0, first - 1]
            logits = zoom.spec.lm_head(hidden).float()
        assert torch.allclose(logits, out.trace["first_logits"].float().flatten(), atol=1e-4)
        total, answer, glyph, _ = objective(batch, parts=True)
        assert torch.isfinite(total) and answer > 0 and torch.isclose(total, answer + glyph, atol=1e-5)
        checked += 1
        if checked == 2:
            break
    assert checked == 2
