"""The invariants every backbone spec must keep; each check takes a `Kit` and raises AssertionError."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from torch.testing import assert_close

from ..config import ZoomConfig
from ..errors import QZoomError
from ..hooks import run_until
from ..pipeline import QZoom
from ..spec import get_spec
from ..trunk import Trunk
from ..twig import TwigRPN
from .kit import Kit, NotApplicable, raises, split_pixels, synthetic_image

CHECKS = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


@check
@torch.no_grad()
def twig_copy_equals_trunk(kit: Kit):
    """The twig's T layers equal `layers[K:K+T]` in value (not storage) and in what they compute."""
    model, spec = kit.model, get_spec(kit.model)
    twig = TwigRPN.from_backbone(model, K=kit.K, T=kit.T)
    for a, b in zip(twig.parameters(), torch.nn.ModuleList(spec.layers[kit.K : kit.K + kit.T]).parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), "twig parameters must be equal copies"
    inputs = kit.inputs(kit.images, kit.questions)
    grids = spec.image_grids(inputs)
    pos = spec.position_ids(inputs["input_ids"], inputs["attention_mask"], grids)
    kw = kit.text_forward_inputs(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], grids, pos)
    h_in = run_until(spec.text_model, spec.layers[kit.K], use_cache=False, **kw)
    h_out = run_until(spec.text_model, spec.layers[kit.K + kit.T], use_cache=False, **kw)
    ours = Trunk(spec).run_layers(twig.layers, h_in.hidden, h_in.kwargs)
    valid = inputs["attention_mask"].bool()
    assert_close(ours[valid], h_out.hidden[valid], rtol=0, atol=1e-5)


@check
@torch.no_grad()
def never_zoom_equals_generate(kit: Kit):
    """With the gate closed, answers equal the unmodified model's greedy `generate` (EOS active)."""
    zoom = kit.zoom(gate_threshold=1.5)
    eos = kit.processor.tokenizer.eos_token_id
    for img, q in zip(kit.images, kit.questions):
        inputs = kit.inputs([img], [q])
        out = zoom.generate_from_inputs(inputs, [img], max_new_tokens=10)[0]
        ref = kit.model.generate(**inputs, max_new_tokens=10, do_sample=False)[0, inputs["input_ids"].shape[1] :].tolist()
        ref = ref[: ref.index(eos) + 1] if eos in ref else ref
        assert not out.zoomed and out.bbox is None and out.roi_tokens is None and out.gate_prob is not None
        assert out.tokens == ref, f"direct path {out.tokens} != HF generate {ref}"


def _forced_runs(kit: Kit, mode: str):
    """Forced-zoom traces (one per sample, run alone), cached per position mode."""
    def build():
        zoom = kit.zoom(gate_threshold=0.0, roi_threshold=0.0, position_mode=mode)
        return [(img, q, kit.inputs([img], [q]),
                 zoom.generate_from_inputs(kit.inputs([img], [q]), [img], max_new_tokens=4, return_trace=True)[0])
                for img, q in zip(kit.images, kit.questions)]
    return kit._once(("forced", mode), build)


def roi_forward_logits(kit: Kit, inputs, images: list, out, mode: str) -> torch.Tensor:
    """(vocab,) last-position logits of the unmodified model's own forward (its vision encoding and visual inputs)
    of one sample's RoI sequence (`out.trace`, our positions): its images in token order, the crop right after the
    RoI image `out.roi_image` (default the last of `images`), cut from that image's source pixels."""
    spec = get_spec(kit.model)
    tr = out.trace
    t = len(images) - 1 if out.roi_image is None else out.roi_image
    crop = spec.process_crops(kit.image_processor, [images[t].crop(out.bbox)], None, None)
    assert torch.equal(crop["image_grid_thw"][0].cpu(), tr["roi_image_grid_thw"]), "crop grid differs"
    grids = spec.image_grids(inputs)
    pixels = split_pixels(inputs["pixel_values"], grids)
    pos = tr["roi_position_ids"][:, None]
    pos = pos.round().long() if mode == "sequential" else pos
    full = kit.model_forward_logits(tr["roi_input_ids"][None],
                                    torch.cat([*pixels[: t + 1], crop["pixel_values"], *pixels[t + 1 :]]),
                                    torch.cat([grids[: t + 1], crop["image_grid_thw"], grids[t + 1 :]]), pos)
    return full[0, -1].float()


@check
@torch.no_grad()
def kv_reuse_equals_recompute(kit: Kit):
    """RoI-pass logits with the reused cache of layers < K equal the unmodified model's own forward
    of the whole RoI sequence (its own vision encoding and visual inputs, our positions)."""
    for mode in kit.position_modes():
        for img, _, inputs, out in _forced_runs(kit, mode):
            assert out.zoomed and out.roi_tokens == out.tokens
            assert_close(out.trace["first_logits"], roi_forward_logits(kit, inputs, [img], out, mode), rtol=0,
                         atol=1e-4)


def _spec_positions(pos, at, s0, grid_r, box, mode):
    """SPEC §3.2 written out element by element (independent of positions.py)."""
    h_r, w_r = grid_r
    if pos.shape[0] == 1:  # 1-D RoPE: the crop continues the positions
        return torch.arange(pos.shape[1] + h_r * w_r, dtype=torch.float32)[None] + pos[0, 0]
    cols = [list(map(float, pos[:, j])) for j in range(at)]
    p_e = cols[-1][0]
    cols.append([p_e + 1] * 3)
    x1, y1, x2, y2 = box
    for r in range(h_r):
        for c in range(w_r):
            if mode == "aligned":
                h = s0 + y1 + (r * (y2 - 1 - y1) / (h_r - 1) if h_r > 1 else 0.0)
                w = s0 + x1 + (c * (x2 - 1 - x1) / (w_r - 1) if w_r > 1 else 0.0)
            else:
                h, w = p_e + 2 + r, p_e + 2 + c
            cols.append([p_e + 2, h, w])
    cols.append([p_e + max(h_r, w_r) + 2] * 3)
    cols += [[float(v) + max(h_r, w_r) + 2 for v in pos[:, j]] for j in range(at, pos.shape[1])]
    return torch.tensor(cols).T


@check
@torch.no_grad()
def roi_positions_follow_spec(kit: Kit):
    """RoI positions equal SPEC §3.2; sequential equals the backbone's own positions; boxes are valid."""
    spec = get_spec(kit.model)
    for mode in kit.position_modes():
        for img, _, inputs, out in _forced_runs(kit, mode):
            tr = out.trace
            ids = inputs["input_ids"][0]
            pos = spec.position_ids(inputs["input_ids"], inputs["attention_mask"], spec.image_grids(inputs))[:, 0]
            at = spec.roi_insert_index(ids)
            img_idx = (ids == spec.image_token_id).nonzero()[:, 0]
            assert int(img_idx[-1]) < at and int(ids[at - 1]) in (spec.image_token_id, spec.vision_end_id), \
                f"the RoI block must follow the global image (inserted at {at}, image ends at {int(img_idx[-1])})"
            s0 = int(pos[0, int((ids == spec.image_token_id).nonzero()[0])])
            grid_r = spec.token_grid(tr["roi_image_grid_thw"])
            expected = _spec_positions(pos, at, s0, grid_r, tr["bbox_tokens"], mode)
            assert_close(tr["roi_position_ids"], expected, rtol=0, atol=1e-5)
            if mode == "sequential":
                grids = torch.stack([spec.image_grids(inputs)[0].cpu(), tr["roi_image_grid_thw"]])
                own = spec.position_ids(tr["roi_input_ids"][None], None, grids)[:, 0]
                assert torch.equal(own.float(), tr["roi_position_ids"]), "sequential != the backbone's positions"
            x1, y1, x2, y2 = out.bbox
            W, H = img.size
            assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H, f"box {out.bbox} outside {img.size}"
            assert min(x2 - x1, y2 - y1) >= ZoomConfig().min_crop_px, f"box {out.bbox} under the minimum side"


@check
@torch.no_grad()
def batch_equals_single(kit: Kit):
    """A batch with mixed gate outcomes (and `emit_direct`) equals each sample run alone."""
    inputs = kit.inputs(kit.images, kit.questions)
    zoom = kit.zoom(gate_threshold=0.0, roi_threshold=0.0, emit_direct=True)
    zoom.gate.head.bias.fill_(0.0)
    torch.manual_seed(0)
    zoom.gate.head.weight.normal_(0, 1.0)
    probs = sorted(o.gate_prob for o in zoom.generate_from_inputs(inputs, kit.images, max_new_tokens=1))
    assert probs[0] < probs[1] < probs[2], f"need three distinct gate scores, got {probs}"
    zoom.config = zoom.config.model_copy(update={"gate_threshold": (probs[0] + probs[1]) / 2})
    batch = zoom.generate_from_inputs(inputs, kit.images, max_new_tokens=6, return_trace=True)
    assert sorted(o.zoomed for o in batch) == [False, True, True]
    for b, img, q in zip(batch, kit.images, kit.questions):
        single = zoom.generate_from_inputs(kit.inputs([img], [q]), [img], max_new_tokens=6, return_trace=True)[0]
        fields = ("tokens", "zoomed", "bbox", "direct_tokens", "roi_tokens", "visual_tokens")
        assert [getattr(b, f) for f in fields] == [getattr(single, f) for f in fields]
        assert_close(b.trace["first_logits"], single.trace["first_logits"], rtol=0, atol=1e-4)
        assert abs(b.gate_prob - single.gate_prob) < 1e-5
        if b.zoomed:
            assert b.direct_tokens is not None
            assert_close(b.heatmap, single.heatmap, rtol=0, atol=1e-4)
            assert_close(b.trace["roi_position_ids"], single.trace["roi_position_ids"])


@check
@torch.no_grad()
def save_load_same_outputs(kit: Kit):
    """save_pretrained -> from_pretrained gives bit-identical outputs; bad targets fail clearly."""
    inputs = kit.inputs(kit.images, kit.questions)
    zoom = kit.zoom(gate_threshold=0.3, roi_threshold=0.0, position_mode=kit.position_modes()[-1])
    torch.manual_seed(1)
    zoom.gate.head.weight.normal_(0, 1.0)
    before = zoom.generate_from_inputs(inputs, kit.images, max_new_tokens=5, return_trace=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        zoom.save_pretrained(path)
        assert sorted(p.name for p in path.iterdir()) == ["README.md", "adapter_config.json",
                                                          "adapter_model.safetensors"]  # + the model card
        loaded = QZoom.from_pretrained(path, model=kit.model, processor=kit.processor)
        assert loaded.config == zoom.config
        after = loaded.generate_from_inputs(inputs, kit.images, max_new_tokens=5, return_trace=True)
        for a, b in zip(before, after):
            assert (a.tokens, a.zoomed, a.bbox, a.gate_prob) == (b.tokens, b.zoomed, b.bbox, b.gate_prob)
            assert torch.equal(a.trace["first_logits"], b.trace["first_logits"])
        cfg = json.loads((path / "adapter_config.json").read_text())
        n_layers = len(get_spec(kit.model).layers)
        (path / "adapter_config.json").write_text(json.dumps({**cfg, "K": n_layers}))
        with raises(QZoomError, f"but the model has only {n_layers} decoder layers"):
            QZoom.from_pretrained(path, model=kit.model)
        (path / "adapter_config.json").write_text(json.dumps({**cfg, "backbone_family": "not_" + cfg["backbone_family"]}))
        with raises(QZoomError, "saved for backbone family"):
            QZoom.from_pretrained(path, model=kit.model)


def _hooks(model) -> dict:
    """Every forward (pre-)hook handle id per module."""
    return {n: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for n, m in model.named_modules()}


@check
def backbone_untouched_and_no_hooks_left(kit: Kit):
    """No hook survives a normal run, a run failing after pass A, or a forward raising inside the hooks."""
    model = kit.fresh_model(0)
    inputs = kit.inputs(kit.images, kit.questions)
    with torch.no_grad():
        model(**inputs)  # transformers may install its own output-capturing hooks on a first forward
    hooks = _hooks(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    zoom = kit.zoom(model, gate_threshold=0.0, roi_threshold=0.0, emit_direct=True)
    zoom.generate_from_inputs(inputs, kit.images, max_new_tokens=3)
    assert _hooks(model) == hooks, "a hook was left on the backbone"
    broken = QZoom(model, twig=zoom.twig, gate=zoom.gate, config=zoom.config)  # no image processor for the crop
    with raises(QZoomError, "image_processor"):
        broken.generate_from_inputs(inputs, kit.images, max_new_tokens=3)
    assert _hooks(model) == hooks, "a failed run left a hook on the backbone"
    bad = get_spec(model).layers[1].register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    try:
        with raises(RuntimeError, "boom"):
            zoom.generate_from_inputs(inputs, kit.images, max_new_tokens=3)
    finally:
        bad.remove()
    assert _hooks(model) == hooks, "a forward raising inside the hooked region left a hook"
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed"


@check
@torch.no_grad()
def bad_input_fails_clearly(kit: Kit):
    """Inputs Q-Zoom cannot answer correctly raise a QZoomError that names the problem."""
    spec = get_spec(kit.model)
    zoom = kit.zoom(gate_threshold=0.0)
    img = kit.images[0]
    inputs = kit.inputs([img], ["What?"])
    no_image = dict(inputs, input_ids=torch.where(inputs["input_ids"] == spec.image_token_id, 0, inputs["input_ids"]))
    with raises(QZoomError, "no image tokens"):
        zoom.generate_from_inputs(no_image, [img])
    pair = kit.inputs(kit.images[:2], ["What?", "What is written on the plate?"])
    with raises(QZoomError, "1 source images for a batch of 2"):
        zoom.generate_from_inputs(pair, [img])
    flipped = dict(pair, input_ids=pair["input_ids"].flip(1), attention_mask=pair["attention_mask"].flip(1))
    with raises(QZoomError, "padding_side='left'"):
        zoom.generate_from_inputs(flipped, kit.images[:2])
    with raises(QZoomError, "20x120 px"):
        zoom.generate_from_inputs(inputs, [synthetic_image(20, 120)])
    if getattr(spec, "video_token_id", None) is not None:
        with raises(QZoomError, "video"):
            zoom.generate_from_inputs(dict(inputs, pixel_values_videos=torch.zeros(4, 8)), [img])


def _image_run_spans(ids: torch.Tensor, image_token_id: int) -> list[tuple[int, int]]:
    """[start, end) of each contiguous run of image tokens in a (S,) row (an image, where images are separated)."""
    cols = (ids == image_token_id).nonzero()[:, 0].tolist()
    runs = []
    for c in cols:
        if runs and runs[-1][1] == c:
            runs[-1][1] = c + 1
        else:
            runs.append([c, c + 1])
    return [tuple(r) for r in runs]


def check_roi_of_image(kit: Kit, inputs, images: list, out, mode: str, target: int) -> None:
    """One zoomed sample with several images: heatmap, box, RoI block, positions and logits belong to image
    `target` (SPEC §3.1-§3.2 with that image as the global one)."""
    spec = get_spec(kit.model)
    tr = out.trace
    ids = inputs["input_ids"][0]
    grids = spec.image_grids(inputs)
    runs = _image_run_spans(ids, spec.image_token_id)
    assert len(runs) == len(images), f"{len(runs)} image runs for {len(images)} images"
    assert out.zoomed and out.roi_image == tr["roi_image"] == target, f"RoI image {out.roi_image}, not {target}"
    h_t, w_t = spec.token_grid(grids[target])
    assert tuple(out.heatmap.shape) == (h_t, w_t), f"heatmap {tuple(out.heatmap.shape)} is not image {target}'s grid"
    x1, y1, x2, y2 = out.bbox
    W, H = images[target].size
    assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H, f"box {out.bbox} outside image {target} ({W}x{H})"
    start, end = runs[target]
    at = end + (spec.vision_end_id is not None)  # right after the RoI image's tokens and end marker
    h_r, w_r = spec.token_grid(tr["roi_image_grid_thw"])
    block = [spec.vision_start_id] * (spec.vision_start_id is not None) + [spec.image_token_id] * (h_r * w_r) + \
        [spec.vision_end_id] * (spec.vision_end_id is not None)
    expected_ids = torch.cat([ids[:at].cpu(), torch.tensor(block, dtype=ids.dtype), ids[at:].cpu()])
    assert torch.equal(tr["roi_input_ids"], expected_ids), f"the RoI block must follow image {target} (index {at})"
    pos = spec.position_ids(inputs["input_ids"], inputs["attention_mask"], grids)[:, 0]
    expected = _spec_positions(pos, at, float(pos[0, start]), (h_r, w_r), tr["bbox_tokens"], mode)
    assert_close(tr["roi_position_ids"], expected, rtol=0, atol=1e-5)
    if mode == "sequential":
        in_order = torch.cat([grids[: target + 1].cpu(), tr["roi_image_grid_thw"][None], grids[target + 1 :].cpu()])
        own = spec.position_ids(tr["roi_input_ids"][None], None, in_order)[:, 0]
        assert torch.equal(own.float(), tr["roi_position_ids"]), "sequential != the backbone's positions"
    assert_close(tr["first_logits"], roi_forward_logits(kit, inputs, images, out, mode), rtol=0, atol=1e-4)


@check
@torch.no_grad()
def several_images_per_sample(kit: Kit):
    """Several images per sample, where the spec takes them: the RoI image (the last by default, or `roi_image`)
    gets the heatmap, the crop and the RoI block, with SPEC §3.2 positions in its frame and KV-reuse logits equal to
    the model's own forward, first image or last; a batch mixing one- and two-image samples equals each sample
    alone; a bad `roi_image` and a wrong number of source images fail clearly. A spec with `multi_image = False`
    refuses two images with one clear error."""
    spec = get_spec(kit.model)
    a, b, c = kit.images
    pair = [a, b]
    two = kit.inputs([pair], [kit.questions[0]])
    zoom = kit.zoom(gate_threshold=0.0, roi_threshold=0.0)
    if not getattr(spec, "multi_image", True):
        with raises(QZoomError, "one image per sample"):
            zoom.generate_from_inputs(two, [pair])
        return
    for mode in kit.position_modes():
        zoom.config = zoom.config.model_copy(update={"position_mode": mode})
        for target in (None, 0):
            out = zoom.generate_from_inputs(two, [pair], max_new_tokens=3, return_trace=True, roi_image=[target])[0]
            check_roi_of_image(kit, two, pair, out, mode, 1 if target is None else target)
    groups, targets = [pair, c, [c, a]], [0, None, None]
    batch = zoom.generate_from_inputs(kit.inputs(groups, kit.questions), groups, max_new_tokens=4, return_trace=True,
                                      roi_image=targets)
    for out, group, q, t in zip(batch, groups, kit.questions, targets):
        alone = zoom.generate_from_inputs(kit.inputs([group], [q]), [group], max_new_tokens=4, return_trace=True,
                                          roi_image=[t])[0]
        assert (out.tokens, out.bbox, out.roi_image) == (alone.tokens, alone.bbox, alone.roi_image)
        assert_close(out.trace["first_logits"], alone.trace["first_logits"], rtol=0, atol=1e-4)
        assert_close(out.trace["roi_position_ids"], alone.trace["roi_position_ids"])
    with raises(QZoomError, r"roi_image\[0\] = 2, but sample 0 has 2 image"):
        zoom.generate_from_inputs(two, [pair], roi_image=[2])
    with raises(QZoomError, "2 image.* in the inputs but 1 source image"):
        zoom.generate_from_inputs(two, [a])


@check
@torch.no_grad()
def empty_mask_answers_directly(kit: Kit):
    """An empty heatmap mask gives the direct answer with the never-zoom path's logits."""
    img = kit.images[0]
    inputs = kit.inputs([img], [kit.questions[0]])
    zoom = kit.zoom(gate_threshold=0.0, roi_threshold=2.0)
    out = zoom.generate_from_inputs(inputs, [img], max_new_tokens=4, return_trace=True)[0]
    zoom.config = zoom.config.model_copy(update={"gate_threshold": 2.0})
    ref = zoom.generate_from_inputs(inputs, [img], max_new_tokens=4, return_trace=True)[0]
    assert not out.zoomed and out.bbox is None and out.heatmap is not None
    assert out.tokens == ref.tokens and torch.equal(out.trace["first_logits"], ref.trace["first_logits"])


BUDGET_GRIDS = (3, 4, 6)


def _image_tokens(spec, inputs) -> list[int]:
    return (inputs["input_ids"] == spec.image_token_id).sum(dim=1).tolist()


@check
@torch.no_grad()
def budget_views_give_their_grid(kit: Kit):
    """Training views (stage 1/3). Dynamic resolution: a square view at `budget_pixels(g*g)` encodes to exactly
    g x g tokens. Fixed resolution (`budget_pixels` returns None for the family's own grid): every image, of any
    size, encodes to that grid, and every other budget is refused. A spec with no budgets at all: not applicable."""
    spec = get_spec(kit.model)
    asked = {}
    for g in BUDGET_GRIDS:
        try:
            asked[g] = spec.budget_pixels(g * g)
        except QZoomError as err:
            asked[g] = err
    if all(isinstance(p, int) for p in asked.values()):  # dynamic resolution
        for g, pixels in asked.items():
            side = int(round(pixels ** 0.5))
            inputs = spec.chat_inputs(kit.processor, [synthetic_image(side, side, g)], ["What is here?"], pixels=pixels)
            h_w = spec.token_grid(spec.image_grids(inputs)[0])
            assert h_w == (g, g), f"budget_pixels({g * g}) gave a {h_w} grid for a square view"
            assert _image_tokens(spec, inputs) == [g * g], f"budget_pixels({g * g}): {_image_tokens(spec, inputs)} tokens"
        return
    assert not any(isinstance(p, int) for p in asked.values()), \
        f"budget_pixels gives pixel budgets for some grids and not for others: {asked}"
    # fixed resolution: the processor's own size gives one grid for every image
    images = kit.images + [synthetic_image(s, s, s) for s in (64, 150)]
    inputs = spec.chat_inputs(kit.processor, images, ["What is here?"] * len(images))
    grids = {spec.token_grid(row) for row in spec.image_grids(inputs)}
    if len(grids) != 1:
        raise NotApplicable(f"budget_pixels gives no pixel budget ({asked[BUDGET_GRIDS[0]]}) and images of different "
                            f"sizes give grids {sorted(grids)}: the family has no visual-token budgets")
    (h, w), = grids
    n = h * w
    try:
        own = spec.budget_pixels(n)
    except QZoomError as err:
        raise NotApplicable(f"the family encodes every image at a fixed {h}x{w} grid but budget_pixels({n}) "
                            f"refuses that grid too ({err}): it defines no visual-token budgets") from err
    assert own is None, f"budget_pixels({n}) of a fixed-resolution family must be None (the processor's size), got {own}"
    assert _image_tokens(spec, inputs) == [n] * len(images), f"{_image_tokens(spec, inputs)} image tokens, not {n} each"
    assert spec.chat_inputs(kit.processor, images[:1], ["What is here?"], pixels=own)["input_ids"].equal(
        spec.chat_inputs(kit.processor, images[:1], ["What is here?"])["input_ids"]), "pixels=None changed the view"
    for g, pixels in asked.items():
        if g * g == n:
            assert pixels is None, f"budget_pixels({n}) differs between calls: {pixels}"
        else:
            assert isinstance(pixels, QZoomError), f"budget_pixels({g * g}) must refuse a grid the family cannot give"
