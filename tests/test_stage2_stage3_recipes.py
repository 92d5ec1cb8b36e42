"""Stage-2 (mining, post-SFT) and stage-3 (budget answers, gate) recipes on tiny CPU setups (SPEC §4.3-§4.4).

Every check is an exact equality or an invariant: the post-SFT training sequence is the sequence the
gated pipeline reads when it zooms (logits, ids, positions), the loss sits on the answer tokens only,
training touches exactly the parameters it should, mining keeps exactly the regressions, budget
answers equal HF `generate`, and the gate trains on layers < K + itself only and resumes exactly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import qzoom_adapters.recipes.stage2 as s2
import qzoom_adapters.recipes.stage3 as s3
from qzoom_adapters import compat as _compat
from qzoom_adapters import QZoom, TwigRPN
from qzoom_adapters.config import ZoomConfig
from qzoom_adapters.io import load_adapters
from qzoom_adapters.recipes.config import load_config
from qzoom_adapters.recipes.data import load_image, read_jsonl, read_records, write_jsonl
from qzoom_adapters.recipes.judge import Verdict
from qzoom_adapters.recipes.models import load_backbone, placeholder_ids
from qzoom_adapters.recipes.stage1 import save_zoom
from qzoom_adapters.recipes.tiny import write_tiny_setup

K = 3  # the tiny recipes branch at K=3 with T=3
TARGET = "abc"


# --------------------------------------------------------------------------------------------- setups
@dataclass
class Tiny:
    family: str
    root: Path  # the tiny setup (model/, images/, records.jsonl, recipe.yaml)
    adapters: Path  # stage-1-like adapters: a twig copied from layers[K:K+T], slightly perturbed

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def model_dir(self) -> str:
        return str(self.root / "model")

    def load(self):
        return load_backbone(self.model_dir)

    def records(self, n=None):
        return read_records(self.root / "records.jsonl")[:n]


def _make_tiny(root: Path, family: str) -> Tiny:
    d = write_tiny_setup(root / family, family)
    model, processor, _ = load_backbone(str(d / "model"))
    twig = TwigRPN.from_backbone(model, K=K, T=3)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # not a copy of the trunk any more: a later re-copy would show
        for p in twig.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    save_zoom(model, processor, d / "adapters1", twig=twig)
    return Tiny(family, d, d / "adapters1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache: dict[str, Tiny] = {}
    root = tmp_path_factory.mktemp("tiny")

    def get(family: str) -> Tiny:
        if family not in cache:
            cache[family] = _make_tiny(root, family)
        return cache[family]

    return get


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _regressions(t: Tiny, path: Path, n: int = 4) -> Path:
    write_jsonl(path, [{**r.model_dump(), "target": TARGET} for r in t.records(n)])
    return path


def _losses(out: Path) -> list[float]:
    return [row["loss"] for row in read_jsonl(out / "train_log.jsonl")]


# --------------------------------------------------------------------------------------------- post-SFT objective
def _eos(model) -> int:
    eos = model.generation_config.eos_token_id
    return eos[0] if isinstance(eos, list) else eos


def _objective(model, processor, spec, twig, roi_threshold: float):
    cfg = ZoomConfig(roi_threshold=roi_threshold, position_mode=spec.default_position_mode)
    return s2.PostSFTObjective(model, spec, twig, processor.image_processor, cfg)


def _batch(spec, processor, model, images, questions, targets, noise=None, plain=None):
    items = [{"image": im, "question": q, "target": tg, "noise": None if noise is None else noise[i],
              "plain": False if plain is None else plain[i]}
             for i, (im, q, tg) in enumerate(zip(images, questions, targets))]
    return s2.Stage2Collate(spec, processor, _eos(model))(items)


def _run_captured(objective, batch):
    """The objective's loss plus what it built: the padded (ids, mask, pos, labels) and the text model's output."""
    rec = {}
    orig = s2._left_pad

    def left_pad(seqs, dev):
        rec["pad"] = orig(seqs, dev)
        return rec["pad"]

    def hook(module, args, out):
        rec["hidden"] = out.last_hidden_state  # after the final norm

    handle = objective.spec.text_model.register_forward_hook(hook)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(s2, "_left_pad", left_pad)
            loss = objective(batch)
    finally:
        handle.remove()
    return loss, rec


def _setup(tiny, family, n):
    """The tiny setup of `family`: (model, processor, spec, stage-1 twig, n records, their images)."""
    t = tiny(family)
    model, processor, spec = t.load()
    twig, _, _ = load_adapters(t.adapters, model)
    recs = t.records(n)
    return model, processor, spec, twig, recs, [load_image(r) for r in recs]


def _questions(records):
    # different lengths, so the batch is really left-padded
    return [r.question + " Be brief." * i for i, r in enumerate(records)]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "llava"])
def test_postsft_sequence_is_the_inference_sequence(tiny, family):
    """No box noise: the training sequence is exactly what the zoomed pipeline reads (SPEC §4.3, [fix] prompt query)."""
    model, processor, spec, twig, recs, images = _setup(tiny, family, 3)
    assert len({im.size for im in images}) > 1  # different global grids: the feature interleave is exercised
    questions = _questions(recs)
    inputs = spec.chat_inputs(processor, images, questions)

    probe = QZoom(model, processor, twig=twig, config=ZoomConfig(gate_threshold=0.0, roi_threshold=-1.0))
    blurred = [o.trace["blurred_map"] for o in probe.generate_from_inputs(inputs, images, 1, return_trace=True)]
    thr = min(float(torch.quantile(b.flatten(), 0.6)) for b in blurred)  # every sample zooms, on part of the grid

    zoom = QZoom(model, processor, twig=twig, config=ZoomConfig(gate_threshold=0.0, roi_threshold=thr))
    outs = zoom.generate_from_inputs(inputs, images, max_new_tokens=1, return_trace=True)
    assert all(o.zoomed for o in outs)
    grids = [tuple(b.shape) for b in blurred]
    assert any(o.trace["bbox_tokens"] != (0, 0, w, h) for o, (h, w) in zip(outs, grids)), "degenerate: all full boxes"

    targets = ["abc", "de", "fghij"]
    objective = _objective(model, processor, spec, twig, thr)
    batch = _batch(spec, processor, model, images, questions, targets)
    loss, rec = _run_captured(objective, batch)
    ids, mask, pos, labels = rec["pad"]
    hidden = rec["hidden"]
    L = ids.shape[1]
    with torch.no_grad():
        for b, o in enumerate(outs):
            n_t = len(batch["targets"][b])
            real = mask[b].bool()
            seq_ids, seq_pos = ids[b][real], pos[:, b][:, real]
            assert torch.equal(seq_ids[:-n_t].cpu(), o.trace["roi_input_ids"])
            assert torch.equal(seq_ids[-n_t:].cpu(), torch.tensor(batch["targets"][b]))
            assert torch.equal(seq_pos[:, :-n_t].cpu(), o.trace["roi_position_ids"])
            # the answer continues the positions of the last prompt token
            last = seq_pos[:, -n_t - 1 : -n_t]
            assert torch.equal(seq_pos[:, -n_t:], last + torch.arange(1, n_t + 1, dtype=seq_pos.dtype)[None])
            logits = spec.lm_head(hidden[b, L - n_t - 1]).float().cpu()  # at the last prompt token
            torch.testing.assert_close(logits, o.trace["first_logits"], atol=1e-4, rtol=0)
    assert loss.requires_grad and torch.isfinite(loss)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_postsft_loss_is_only_on_answer_tokens(tiny, family):
    model, processor, spec, twig, recs, images = _setup(tiny, family, 2)
    targets = ["xy", "hello"]
    batch = _batch(spec, processor, model, images, _questions(recs), targets)
    tok = processor.tokenizer
    assert batch["targets"] == [tok(x, add_special_tokens=False)["input_ids"] + [_eos(model)] for x in targets]
    loss, rec = _run_captured(_objective(model, processor, spec, twig, -1.0), batch)
    ids, mask, pos, labels = rec["pad"]
    L = ids.shape[1]
    for b, tgt in enumerate(batch["targets"]):
        n = len(tgt)
        assert labels[b, L - n :].tolist() == tgt
        assert (labels[b, : L - n] == -100).all()
        assert mask[b, L - n :].all()
    # hand-computed cross-entropy over the answer rows (row t-1 predicts token t)
    with torch.no_grad():
        logp = torch.log_softmax(spec.lm_head(rec["hidden"]).float(), dim=-1)
        terms = [-logp[b, t - 1, ids[b, t]] for b, tgt in enumerate(batch["targets"]) for t in range(L - len(tgt), L)]
        assert len(terms) == sum(map(len, batch["targets"]))
        torch.testing.assert_close(loss.detach(), torch.stack(terms).mean(), atol=1e-5, rtol=1e-5)


def test_left_pad_layout():
    seqs = [(torch.tensor([5, 6, 7, 8]), torch.arange(4.0)[None] + 10, 2),
            (torch.tensor([1, 2]), torch.tensor([[3.0, 4.0]]), 1)]
    ids, mask, pos, labels = s2._left_pad(seqs, "cpu")
    assert ids.tolist() == [[5, 6, 7, 8], [0, 0, 1, 2]]
    assert mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert pos.tolist() == [[[10, 11, 12, 13], [1, 1, 3, 4]]]
    assert labels.tolist() == [[-100, -100, 7, 8], [-100, -100, -100, 2]]


def test_samples_without_crop_give_no_loss(tiny):
    """roi_threshold above 1 never crops: only noise-box samples count; none at all -> an exact, differentiable 0."""
    t = tiny("qwen2_5_vl")
    model, processor, spec = t.load()
    twig, _, _ = load_adapters(t.adapters, model)
    objective = _objective(model, processor, spec, twig, 2.0)
    recs = t.records(2)
    images, qs = [load_image(r) for r in recs], _questions(recs)
    noise = (0.2, 0.3, 0.4, 0.5)
    mixed = objective(_batch(spec, processor, model, images, qs, ["ab", "cd"], noise=[noise, None]))
    alone = objective(_batch(spec, processor, model, images[:1], qs[:1], ["ab"], noise=[noise]))
    torch.testing.assert_close(mixed, alone, atol=1e-5, rtol=1e-5)
    zero = objective(_batch(spec, processor, model, images, qs, ["ab", "cd"]))
    assert zero.item() == 0.0 and zero.requires_grad


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@torch.no_grad()
def test_plain_replay_is_the_models_own_loss_on_prompt_and_answer(tiny, family):
    """A plain-replay sample's loss is the HF model's own cross-entropy on [prompt | answer] (its forward with
    labels); in a batch with RoI samples, the loss is the answer-token-weighted mean of the two kinds."""
    t = tiny(family)
    model, processor, spec = t.load()
    twig, _, _ = load_adapters(t.adapters, model)
    objective = _objective(model, processor, spec, twig, 0.0)
    recs = t.records(2)
    images, qs = [load_image(r) for r in recs], _questions(recs)
    targets = ["ab", "cdef"]
    ours = objective(_batch(spec, processor, model, images[:1], qs[:1], targets[:1], plain=[True]))
    inputs = spec.chat_inputs(processor, images[:1], qs[:1])
    answer = processor.tokenizer(targets[0], add_special_tokens=False)["input_ids"] + [_eos(model)]
    ids = torch.cat([inputs["input_ids"], torch.tensor([answer])], dim=1)
    labels = torch.full_like(ids, -100)
    labels[0, -len(answer):] = torch.tensor(answer)
    per_token = {k: torch.cat([v, v.new_zeros(1, len(answer))], dim=1) for k, v in inputs.items()
                 if torch.is_tensor(v) and v.shape == inputs["input_ids"].shape}  # e.g. mm_token_type_ids: text
    full = {**inputs, **per_token, "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    reference = model(**full).loss
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    roi = objective(_batch(spec, processor, model, images[1:], qs[1:], targets[1:], plain=[False]))
    assert not torch.isclose(roi, objective(_batch(spec, processor, model, images[1:], qs[1:], targets[1:],
                                                   plain=[True])))  # the RoI sequence is another sequence
    mixed = objective(_batch(spec, processor, model, images, qs, targets, plain=[True, False]))
    n = [len(answer), len(processor.tokenizer(targets[1], add_special_tokens=False)["input_ids"]) + 1]
    torch.testing.assert_close(mixed, (ours * n[0] + roi * n[1]) / sum(n), atol=1e-5, rtol=1e-5)


def test_budget_groups_encode_at_their_budget_and_weigh_by_answer_tokens(tiny):
    """Items of two budgets: one group per budget, each encoded (global view and crop) at that budget; the
    micro-batch's loss is the answer-token-weighted mean of the groups' losses, each equal to the group alone."""
    t = tiny("qwen2_5_vl")
    model, processor, spec = t.load()
    twig, _, _ = load_adapters(t.adapters, model)
    objective = _objective(model, processor, spec, twig, -1.0)
    recs = t.records(3)
    images, qs, targets = [load_image(r) for r in recs], _questions(recs), ["ab", "cdef", "g"]
    budgets = [16, 4, 16]
    items = [{"image": im, "question": q, "target": tg, "noise": None, "budget": b}
             for im, q, tg, b in zip(images, qs, targets, budgets)]
    collate = s2.Stage2Collate(spec, processor, _eos(model))
    groups = collate(items)
    assert isinstance(groups, list) and [g["pixels"] for g in groups] == [spec.budget_pixels(4), spec.budget_pixels(16)]
    counts = []
    for g, b in zip(groups, (4, 16)):
        per_image = (g["inputs"]["input_ids"] == spec.image_token_id).sum(dim=1).tolist()
        own = [int((spec.chat_inputs(processor, [it["image"]], [it["question"]], pixels=spec.budget_pixels(b))
                    ["input_ids"] == spec.image_token_id).sum()) for it in items if it["budget"] == b]
        assert per_image == own
        counts.append(per_image)
    assert max(counts[0]) < min(counts[1])
    assert [len(g["targets"]) for g in groups] == [1, 2]
    assert s2.PostSFTObjective.loss_terms(groups) == sum(len(g_t) for g in groups for g_t in g["targets"])
    with torch.no_grad():
        alone = [objective(collate([it for it in items if it["budget"] == b])) for b in (4, 16)]
        both = objective(groups)
    n = [sum(map(len, g["targets"])) for g in groups]
    torch.testing.assert_close(both, (alone[0] * n[0] + alone[1] * n[1]) / sum(n), atol=1e-6, rtol=1e-6)
    # the crop is encoded at the group's budget too: roi_threshold < 0 crops the whole image, so the RoI sequence
    # holds as many crop tokens as global ones
    rec = {}
    orig = s2._left_pad

    def left_pad(seqs, dev):
        rec.setdefault("n", []).append([int((ids == spec.image_token_id).sum()) for ids, _, _ in seqs])
        return orig(seqs, dev)

    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(s2, "_left_pad", left_pad)
        objective(groups)
    assert rec["n"] == [[2 * n for n in c] for c in counts]


def test_stage2_dataset_budget_draws(tiny):
    t = tiny("qwen2_5_vl")
    rows = [{**t.records(1)[0].model_dump(), "target": TARGET}] * 300
    plain = s2.Stage2Dataset(rows, 0.8, (0.1, 0.6), seed=3)
    ds = s2.Stage2Dataset(rows, 0.8, (0.1, 0.6), seed=3, budgets=[64, 128, 256])
    draws = [ds.get(i, 0) for i in range(len(rows))]
    assert [d["noise"] for d in draws] == [plain.get(i, 0)["noise"] for i in range(len(rows))]  # same noise
    assert all(plain.get(i, 0)["budget"] is None for i in range(5))
    chosen = [d["budget"] for d in draws]
    assert chosen == [ds.get(i, 0)["budget"] for i in range(len(rows))]  # fixed per (seed, epoch, i): resumable
    assert chosen != [ds.get(i, 1)["budget"] for i in range(len(rows))]
    assert {b: chosen.count(b) > 70 for b in (64, 128, 256)} == {64: True, 128: True, 256: True}
    replay = s2.Stage2Dataset(rows, 0.8, (0.1, 0.6), seed=3, budgets=[64, 128, 256], plain_replay=0.3)
    again = [replay.get(i, 0) for i in range(len(rows))]
    assert [d["budget"] for d in again] == chosen  # drawn last: the other draws stay as they were
    assert [d["noise"] for d in again] == [None if d["plain"] else e["noise"] for d, e in zip(again, draws)]
    assert 60 < sum(d["plain"] for d in again) < 120 and not any(d["plain"] for d in draws)
    assert [d["plain"] for d in again] == [replay.get(i, 0)["plain"] for i in range(len(rows))]  # resumable


def test_frozen_layers_train_only_the_layers_above_and_keep_a_tied_head():
    from types import SimpleNamespace

    from torch import nn

    embed = nn.Embedding(10, 4)
    layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(4))
    head = nn.Linear(4, 10, bias=False)
    model = nn.ModuleDict({"embed": embed, "layers": layers, "head": head})
    spec = SimpleNamespace(layers=layers, lm_head=head, embed_tokens=embed)

    def trainable():
        return {n for n, p in model.named_parameters() if p.requires_grad}

    s2._trainable_llm(model, spec, 2)
    assert trainable() == {f"layers.{i}.{w}" for i in (2, 3) for w in ("weight", "bias")} | {"head.weight"}
    head.weight = embed.weight  # tied: the head is the input embedding matrix, which feeds the frozen layers
    s2._trainable_llm(model, spec, 2)
    assert trainable() == {f"layers.{i}.{w}" for i in (2, 3) for w in ("weight", "bias")}
    s2._trainable_llm(model, spec, 0)  # nothing frozen: the tied head trains (as before the option existed)
    assert "embed.weight" in trainable() and "layers.0.weight" in trainable()
    with pytest.raises(s2.QZoomError, match="freezes all 4 decoder layers"):
        s2._trainable_llm(model, spec, 4)


def test_stage2_frozen_layers_keep_the_twig_input(tiny, tmp_path):
    """frozen_layers=K: the first K layers and the embeddings are bit-identical after training, so the layer-K
    states (what the twig and the gate read) are too; the layers above K trained."""
    t = tiny("qwen2_5_vl")
    cfg = _stage2_cfg(t, tmp_path, "stage2.train.max_steps=3", f"stage2.frozen_layers={K}", "stage2.budgets=[4, 16]")
    assert s2.train_stage2(cfg)["finished"]
    base, processor, base_spec = t.load()
    trained, _, spec = load_backbone(str(tmp_path / "out" / "model"))
    for i, (lb, lt) in enumerate(zip(base_spec.layers, spec.layers)):
        same = all(torch.equal(p, q) for p, q in zip(lb.parameters(), lt.parameters()))
        assert same == (i < K), f"layer {i}: {'unchanged' if same else 'changed'}"
    assert torch.equal(base_spec.embed_tokens.weight, spec.embed_tokens.weight)
    recs = t.records(2)
    inputs = spec.chat_inputs(processor, [load_image(r) for r in recs], _questions(recs))
    with torch.no_grad():
        h_base = base(**inputs, output_hidden_states=True).hidden_states[K]
        h_trained = trained(**inputs, output_hidden_states=True).hidden_states[K]
    assert torch.equal(h_base, h_trained)
    with pytest.raises(Exception, match="frozen_layers"):
        s2.train_stage2(_stage2_cfg(t, tmp_path / "lora", f"stage2.frozen_layers={K}",
                                    "stage2.lora={r: 4, alpha: 8, dropout: 0.0}"))


# --------------------------------------------------------------------------------------------- box noise
def test_stage2_dataset_box_noise_draws(tiny):
    t = tiny("qwen2_5_vl")
    rows = [{**t.records(1)[0].model_dump(), "target": TARGET}] * 400
    ds = s2.Stage2Dataset(rows, 0.8, (0.1, 0.6), seed=3)
    draws = [ds.get(i, 0)["noise"] for i in range(len(rows))]
    assert draws == [ds.get(i, 0)["noise"] for i in range(len(rows))]  # fixed per (seed, epoch, i)
    assert draws == [s2.Stage2Dataset(rows, 0.8, (0.1, 0.6), seed=3).get(i, 0)["noise"] for i in range(len(rows))]
    assert draws != [ds.get(i, 1)["noise"] for i in range(len(rows))]  # a new epoch draws anew
    assert draws != [s2.Stage2Dataset(rows, 0.8, (0.1, 0.6), seed=4).get(i, 0)["noise"] for i in range(len(rows))]
    noisy = [n for n in draws if n is not None]
    assert 0.74 <= len(noisy) / len(draws) <= 0.86
    for x, y, fw, fh in noisy:
        assert 0.1 <= fw <= 0.6 and 0.1 <= fh <= 0.6
        assert 0 <= x and x + fw <= 1 and 0 <= y and y + fh <= 1
    assert all(ds2["noise"] is None for ds2 in (s2.Stage2Dataset(rows, 0.0, (0.1, 0.6), 3).get(i, 0) for i in range(50)))
    item = ds.get(0, 0)
    assert item["target"] == TARGET and item["question"] == rows[0]["question"]
    assert list(item["image"].getdata()) == list(load_image(t.records(1)[0]).getdata())


@pytest.mark.parametrize("size", [(360, 200), (240, 320), (100, 60)])
def test_random_crop_box(size):
    from PIL import Image

    W, H = size
    image = Image.new("RGB", size, (10, 20, 30))
    grid = (5, 9)  # (h_t, w_t)
    for i in range(300):
        rng = s2.item_rng(0, 0, i)
        fw, fh = rng.uniform(0.1, 0.6), rng.uniform(0.1, 0.6)
        noise = (rng.uniform(0, 1 - fw), rng.uniform(0, 1 - fh), fw, fh)
        if i < 4:  # the corners, smallest boxes
            noise = ((0.0, 0.9)[i % 2], (0.0, 0.9)[i // 2], 0.1, 0.1)
        crop = s2.random_crop(image, noise, grid, 28)
        x1, y1, x2, y2 = crop.box_px
        assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H, (noise, crop.box_px)
        assert x2 - x1 >= 28 and y2 - y1 >= 28, (noise, crop.box_px)
        assert crop.image.size == (x2 - x1, y2 - y1)
        tx1, ty1, tx2, ty2 = crop.box_tok
        assert 0 <= tx1 < tx2 <= grid[1] and 0 <= ty1 < ty2 <= grid[0]
        # the token box covers the pixel box
        assert tx1 * W / grid[1] <= x1 and tx2 * W / grid[1] >= x2
        assert ty1 * H / grid[0] <= y1 and ty2 * H / grid[0] >= y2


# --------------------------------------------------------------------------------------------- stage-2 training
_STAGE2_SETS = ["stage2.box_noise=0", "stage2.roi_threshold=-1.0", "stage2.train.lr=1e-3", "stage2.train.batch_size=4",
                "stage2.train.effective_batch=4", "stage2.train.save_every=100", "stage2.train.warmup_ratio=0",
                "stage2.lora=null", "stage2.position_mode=null", "stage2.dtype=float32"]


def _stage2_cfg(t: Tiny, tmp_path: Path, *extra):
    """Overfit setup: 4 regressions, no box noise, every sample zooms (roi_threshold < 0 keeps the whole grid)."""
    reg = _regressions(t, tmp_path / "regressions.jsonl")
    return load_config(t.recipe, [f"stage2.data={reg}", f"stage2.adapters={t.adapters}", f"stage2.out={tmp_path / 'out'}",
                                  *_STAGE2_SETS, *extra])


def _names(model, module) -> set[str]:
    """Names (in `model`) of the parameters of `module`."""
    own = {id(p) for p in module.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in own}


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_stage2_full_training(tiny, tmp_path, family):
    t = tiny(family)
    cfg = _stage2_cfg(t, tmp_path, "stage2.train.max_steps=15")
    summary = s2.train_stage2(cfg)
    out = tmp_path / "out"
    assert summary["finished"] and summary["step"] == 15
    losses = _losses(out)
    assert len(losses) == 15 and losses[-1] < 0.5 * losses[0], losses

    base, _, base_spec = t.load()
    trained, processor, spec = load_backbone(str(out / "model"))
    layer_names, head_names = _names(trained, spec.layers), _names(trained, spec.lm_head)
    assert spec.lm_head.weight is not spec.embed_tokens.weight  # untied: the embeddings must stay frozen
    b_params, t_params = dict(base.named_parameters()), dict(trained.named_parameters())
    assert b_params.keys() == t_params.keys()
    frozen = [n for n in t_params if n not in layer_names | head_names]
    assert _names(trained, spec.embed_tokens) | _names(trained, spec.norm) <= set(frozen)
    for name in frozen:
        assert torch.equal(b_params[name], t_params[name]), f"{name} (vision tower, merger, embeddings, final norm) changed"
    assert not torch.equal(base_spec.lm_head.weight, spec.lm_head.weight)
    for i, (lb, lt) in enumerate(zip(base_spec.layers, spec.layers)):
        # every tensor moved (k_proj.bias may not: softmax is invariant to it, so its gradient is ~0)
        same = [n for (n, p), q in zip(lb.named_parameters(), lt.parameters()) if torch.equal(p, q)]
        assert set(same) <= {"self_attn.k_proj.bias"}, f"layer {i}: {same} did not train"

    # adapters at the top: the stage-1 twig, unchanged
    zoom = QZoom.from_pretrained(out, model=trained, processor=processor)
    ref_twig, _, _ = load_adapters(t.adapters, base)
    assert zoom.gate is None and zoom.position_mode == spec.default_position_mode
    assert _state(zoom.twig).keys() == _state(ref_twig).keys()
    assert all(torch.equal(v, _state(ref_twig)[k]) for k, v in _state(zoom.twig).items())
    assert not (out / "model" / "adapter_config.json").exists()  # transformers would read it as a peft adapter


def test_stage2_lora(tiny, tmp_path):
    t = tiny("qwen2_5_vl")
    lora = "stage2.lora={r: 4, alpha: 8, dropout: 0.0}"
    cfg = _stage2_cfg(t, tmp_path, "stage2.train.max_steps=3", lora)
    torch.manual_seed(111)
    assert s2.train_stage2(cfg)["finished"]
    out = tmp_path / "out"
    adapter_cfg = json.loads((out / "lora" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4 and adapter_cfg["lora_alpha"] == 8 and adapter_cfg["peft_type"] == "LORA"
    assert any((out / "lora").glob("adapter_model.*"))
    base, _, _ = t.load()
    merged, processor, spec = load_backbone(str(out / "model"))
    layer_names = _names(merged, spec.layers)
    targets = set(cfg.stage2.lora.target_modules)
    b, m = dict(base.state_dict()), dict(merged.state_dict())
    assert b.keys() == m.keys()  # merged: no lora_ / base_model keys left
    lora_names = {n for n in layer_names if n.endswith(".weight") and n.split(".")[-2] in targets}
    assert len(lora_names) == 7 * len(spec.layers)
    for name in b:
        if name in lora_names:
            assert not torch.equal(b[name], m[name]), f"{name}: LoRA delta not merged"
        else:
            assert torch.equal(b[name], m[name]), f"{name} changed but is no LoRA target"
    assert QZoom.from_pretrained(out, model=merged, processor=processor).twig is not None
    # out/lora is a peft adapter of the base model: base + adapter, merged, is the saved model
    from peft import PeftModel

    remerged = PeftModel.from_pretrained(base, str(out / "lora")).merge_and_unload().state_dict()
    assert remerged.keys() == m.keys()
    for name in m:
        torch.testing.assert_close(remerged[name], m[name], atol=1e-6, rtol=0)
    # LoRA's random init follows train.seed, not the global RNG: a second run gives the same adapter
    torch.manual_seed(222)
    s2.train_stage2(load_config(t.recipe, [f"stage2.data={tmp_path / 'regressions.jsonl'}",
                                           f"stage2.adapters={t.adapters}", f"stage2.out={tmp_path / 'again'}",
                                           *_STAGE2_SETS, "stage2.train.max_steps=3", lora]))
    from safetensors.torch import load_file

    first, second = (load_file(str(next((d / "lora").glob("adapter_model.safetensors")))) for d in (out, tmp_path / "again"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


# --------------------------------------------------------------------------------------------- mining
class StubJudge:
    """Verdicts by record id (read from the question): (A right, B right)."""

    def __init__(self, plan: dict[str, tuple[bool, bool]]):
        self.plan, self.seen = plan, []

    def judge(self, items):
        out = []
        for it in items:
            rid = it.question.rsplit("[", 1)[1].rstrip("]")
            self.seen.append((rid, it))
            a, b = self.plan.get(rid, (False, False))
            out.append(Verdict({"A": a, "B": b}, raw=f"stub {rid}"))
        return out


def test_mining_keeps_exactly_the_regressions(tiny, tmp_path, monkeypatch):
    t = tiny("qwen2_5_vl")
    records = [{**r.model_dump(), "question": f"{r.question} [{r.id}]"} for r in t.records(6)]
    write_jsonl(tmp_path / "records.jsonl", records)
    ids = [r["id"] for r in records]
    plan = {ids[0]: (True, False), ids[1]: (True, True), ids[2]: (False, True), ids[4]: (True, False)}
    judge = StubJudge(plan)
    made = []
    monkeypatch.setattr(s2, "make_judge", lambda name, **kw: made.append((name, kw)) or judge)
    sets = [f"mine.records={tmp_path / 'records.jsonl'}", f"mine.adapters={t.adapters}", f"mine.out={tmp_path / 'mine'}",
            "mine.batch_size=4", "mine.max_new_tokens=3", "mine.keep=regressions", "mine.target=response",
            "mine.judge=rule", "mine.metric=auto"]
    cfg = load_config(t.recipe, sets)
    res = s2.mine(cfg, show_progress=False)
    assert res["judged"] == 6 and res["new"] == 6 and res["regressions"] == 2
    assert made == [("rule", {"metric": "auto"})]
    assert sorted(rid for rid, _ in judge.seen) == sorted(ids)
    for rid, item in judge.seen:
        rec = next(r for r in records if r["id"] == rid)
        assert item.answers == rec["answers"] and set(item.responses) == {"A", "B"}
    mined_file = tmp_path / "mine" / "mined.jsonl"
    mined = {row["id"]: row for row in read_jsonl(mined_file)}
    for rid, item in judge.seen:
        assert (item.responses["A"], item.responses["B"]) == (mined[rid]["response_a"], mined[rid]["response_b"])
        assert mined[rid]["regression"] == (plan.get(rid) == (True, False))
    regs = read_jsonl(tmp_path / "mine" / "regressions.jsonl")
    assert [r["id"] for r in regs] == [ids[0], ids[4]]
    assert [r["target"] for r in regs] == [mined[ids[0]]["response_a"], mined[ids[4]]["response_a"]]
    assert set(regs[0]) == {"id", "image", "question", "answers", "mode", "dataset", "box", "target"}
    assert Path(regs[0]["image"]).is_file()

    # resumable: nothing new is judged and mined.jsonl is untouched
    before = mined_file.read_bytes()
    again = s2.mine(cfg, show_progress=False)
    assert again["new"] == 0 and again["judged"] == 6 and mined_file.read_bytes() == before
    assert len(judge.seen) == 6
    # a partial file resumes with the rest
    mined_file.write_text("".join(before.decode().splitlines(keepends=True)[:2]))
    part = s2.mine(cfg, show_progress=False)
    assert part["new"] == 4 and part["judged"] == 6
    by_id = lambda rows: sorted(rows, key=lambda r: r["id"])  # noqa: E731
    assert by_id(read_jsonl(mined_file)) == by_id(json.loads(x) for x in before.decode().splitlines())
    # keep: zoomed (RoI-SFT on every sample that got a crop), from the same judged file
    zoomed = s2.mine(load_config(t.recipe, sets + ["mine.keep=zoomed"]), show_progress=False)
    assert zoomed["new"] == 0 and any(row["zoomed"] for row in read_jsonl(mined_file))
    assert [r["id"] for r in read_jsonl(tmp_path / "mine" / "regressions.jsonl")] == \
        [row["id"] for row in read_jsonl(mined_file) if row["zoomed"]]
    # ground-truth targets
    gt = s2.mine(load_config(t.recipe, sets + ["mine.target=ground_truth"]), show_progress=False)
    assert gt["new"] == 0
    regs = read_jsonl(tmp_path / "mine" / "regressions.jsonl")
    assert sorted((r["id"], r["target"]) for r in regs) == sorted(
        (rid, next(r for r in records if r["id"] == rid)["answers"][0]) for rid in (ids[0], ids[4]))


# --------------------------------------------------------------------------------------------- stage-3 labels
def test_answers_at_budgets_equal_hf_generate(tiny, tmp_path):
    t = tiny("qwen2_5_vl")
    recs = t.records(6)
    write_jsonl(tmp_path / "records.jsonl", [r.model_dump() for r in recs[:4]])
    out = tmp_path / "answers.jsonl"
    budgets = [4, 9, 16, 36]
    sets = [f"labels_stage3.records={tmp_path / 'records.jsonl'}", f"labels_stage3.out={out}",
            f"labels_stage3.model={t.model_dir}", "labels_stage3.batch_size=3", "labels_stage3.max_new_tokens=4",
            f"labels_stage3.budgets={budgets}"]
    cfg = load_config(t.recipe, sets)
    assert cfg.labels_stage3.budgets == budgets
    res = s3.answer_at_budgets(cfg, show_progress=False)
    assert res["answered"] == 4 and res["total"] == 4
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == [r.id for r in recs[:4]]

    model, processor, spec = t.load()
    eos = model.generation_config.eos_token_id
    for row, rec in zip(rows, recs):
        assert row["budgets"] == budgets and len(row["budget_answers"]) == len(budgets) == len(row["visual_tokens"])
        assert all(a < b for a, b in zip(row["visual_tokens"], row["visual_tokens"][1:])), row["visual_tokens"]
        image = load_image(rec)
        text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                           {"type": "text", "text": rec.question}]}],
                                             add_generation_prompt=True, tokenize=False)
        for r, answer, n_vis in zip(budgets, row["budget_answers"], row["visual_tokens"]):
            px = r * spec.factor**2
            inputs = processor(text=[text], images=[image], return_tensors="pt", **_compat.budget_kwargs(px, px))
            h, w = spec.token_grid(inputs["image_grid_thw"][0])
            assert n_vis == h * w <= r
            with torch.no_grad():
                seq = model.generate(**inputs, do_sample=False, max_new_tokens=4, eos_token_id=eos,
                                     pad_token_id=processor.tokenizer.pad_token_id,
                                     suppress_tokens=placeholder_ids(spec))
            S = inputs["input_ids"].shape[1]
            assert answer == processor.tokenizer.decode(seq[0, S:], skip_special_tokens=True)

    # resumable: a rerun answers nothing; new records are appended, old rows untouched
    before = out.read_bytes()
    assert s3.answer_at_budgets(cfg, show_progress=False)["answered"] == 0 and out.read_bytes() == before
    write_jsonl(tmp_path / "records.jsonl", [r.model_dump() for r in recs])
    res = s3.answer_at_budgets(cfg, show_progress=False)
    assert res["answered"] == 2 and res["total"] == 6
    assert out.read_bytes().startswith(before) and [r["id"] for r in read_jsonl(out)] == [r.id for r in recs]


# --------------------------------------------------------------------------------------------- stage-3 gate
def _answers_file(t: Tiny, path: Path) -> Path:
    rows = []
    for i, rec in enumerate(t.records(4)):
        gt = rec.answers[0]
        rows.append({**rec.model_dump(), "budgets": [4, 9, 16, 36], "visual_tokens": [2, 6, 12, 30],
                     "budget_answers": ["zz", gt, gt, gt] if i % 2 == 0 else [gt] * 4})  # HARD, EASY, HARD, EASY
    write_jsonl(path, rows)
    return path


def _stage3_cfg(t: Tiny, tmp_path: Path, name: str, steps: int):
    answers = _answers_file(t, tmp_path / "answers.jsonl")
    return load_config(t.recipe, [f"stage3.answers={answers}", f"stage3.adapters={t.adapters}",
                                  f"stage3.out={tmp_path / name}", f"stage3.model={t.model_dir}", "stage3.p_hard=1.0",
                                  "stage3.reference=ground_truth",
                                  f"stage3.train.max_steps={steps}", "stage3.train.lr=1e-3", "stage3.train.batch_size=4",
                                  "stage3.train.effective_batch=4", "stage3.train.save_every=100",
                                  "stage3.train.warmup_ratio=0"])


def test_gate_training(tiny, tmp_path, monkeypatch):
    t = tiny("qwen2_5_vl")
    fired: dict[str, int] = {}
    captured = {}

    def load(section, *a, **kw):
        model, processor, spec = load_backbone(section, *a, **kw)
        captured.update(model=model, spec=spec, before=_state(model))
        names = {id(m): f"layer{i}" for i, m in enumerate(spec.layers)}
        names.update({id(spec.norm): "norm", id(spec.lm_head): "lm_head"})

        def hook(module, args, output):  # the gate's deep copies of layers[K:] carry this hook too: count by identity
            if id(module) in names:
                fired[names[id(module)]] = fired.get(names[id(module)], 0) + 1

        for m in [*spec.layers, spec.norm, spec.lm_head]:
            m.register_forward_hook(hook)
        return model, processor, spec

    class Recording(s3.GateObjective):
        def __init__(self, model, spec, gate):
            captured["gate0"] = _state(gate)
            super().__init__(model, spec, gate)

    monkeypatch.setattr(s3, "load_backbone", load)
    monkeypatch.setattr(s3, "GateObjective", Recording)
    summary = s3.train_stage3(_stage3_cfg(t, tmp_path, "gate", 20))
    assert summary["finished"] and summary["step"] == 20
    # only layers < K of the backbone ran (one prefill per budget group, >= 1 per step)
    assert set(fired) == {f"layer{i}" for i in range(K)}, fired
    assert fired["layer0"] == fired[f"layer{K - 1}"] >= 20
    model, spec = captured["model"], captured["spec"]
    # the gate started as an exact copy of layers[K:K+T] [fix] (+ a fresh head)
    gate0 = captured["gate0"]
    assert {k for k in gate0 if not k.startswith("layers.")} == {"head.weight", "head.bias"}
    for i in range(3):
        ref = spec.layers[K + i].state_dict()
        assert {k for k in gate0 if k.startswith(f"layers.{i}.")} == {f"layers.{i}.{k}" for k in ref}
        assert all(torch.equal(gate0[f"layers.{i}.{k}"], v) for k, v in ref.items())
    # the backbone is bit-identical after training
    after = _state(model)
    assert after.keys() == captured["before"].keys()
    assert all(torch.equal(v, captured["before"][k]) for k, v in after.items())
    # the loss went down on the overfit pool
    losses = _losses(tmp_path / "gate")
    assert len(losses) == 20 and sum(losses[-3:]) / 3 < 0.5 * losses[0], losses
    # saved adapters: the stage-2 twig unchanged, plus the trained gate
    twig, gate, zcfg = load_adapters(tmp_path / "gate", model)
    ref_twig, _, ref_cfg = load_adapters(t.adapters, model)
    assert _state(twig).keys() == _state(ref_twig).keys()
    assert all(torch.equal(v, _state(ref_twig)[k]) for k, v in _state(twig).items())
    assert gate is not None and any(not torch.equal(v, captured["gate0"][k]) for k, v in _state(gate).items())
    assert zcfg.position_mode == ref_cfg.position_mode
    assert json.loads((tmp_path / "gate" / "gate_pool.json").read_text())["pool"] == 4


def test_gate_training_resumes_exactly(tiny, tmp_path):
    """6 steps in one go == 3 steps, stop, resume; the random head init follows train.seed, not the global RNG."""
    t = tiny("qwen2_5_vl")
    torch.manual_seed(111)
    full = s3.train_stage3(_stage3_cfg(t, tmp_path, "full", 6))
    assert full["finished"]
    cfg = _stage3_cfg(t, tmp_path, "resumed", 6)
    torch.manual_seed(222)
    assert s3.train_stage3(cfg, stop_after=3) == {"step": 3, "finished": False}
    assert len(_losses(tmp_path / "resumed")) == 3
    torch.manual_seed(333)
    assert s3.train_stage3(cfg)["finished"]
    model, _, _ = t.load()
    _, g_full, _ = load_adapters(tmp_path / "full", model)
    _, g_res, _ = load_adapters(tmp_path / "resumed", model)
    a, b = _state(g_full), _state(g_res)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(tmp_path / "full") == _losses(tmp_path / "resumed")
