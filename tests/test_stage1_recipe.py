"""Stage 1 of the training recipes (SPEC §4.1-§4.2), end to end on the offline tiny setups (CPU).

Labels: sharded, resumable, bit-identical on resume, equal to the model's own eager attention.
Training: only the twig learns and only layers < K + the twig run; a stopped run resumes to the
same adapters; stage-2.5 init continues from given adapters; the LR schedule counts optimizer steps.
"""
from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import qzoom_adapters.recipes.stage1 as stage1
from qzoom_adapters import QZoom, QZoomError, get_spec
from qzoom_adapters.decode import eos_ids
from qzoom_adapters.labels import padding_cells, tristate_labels
from qzoom_adapters.twig import TwigRPN
from qzoom_adapters.recipes.config import load_config
from qzoom_adapters.recipes.data import fixed_grid_view, load_image, read_records
from qzoom_adapters.recipes.label_store import MANIFEST, LabelStore, LabelWriter
from qzoom_adapters.recipes.models import load_backbone
from qzoom_adapters.recipes.stage1 import (Stage1Collate, Stage1Dataset, TwigObjective, build_twig, make_stage1_labels,
                            stage1_prompt, train_stage1)
from qzoom_adapters.recipes.tiny import write_tiny_setup
from qzoom_adapters.recipes.teacher import response_rows
from qzoom_adapters.recipes.trainer import DONE_NAME

FAMILIES = ["qwen2_5_vl", "qwen3_vl", "llava"]
ADAPTERS = "adapter_model.safetensors"


# --- helpers ------------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(tmp_path, family="qwen2_5_vl", samples=16):
    return write_tiny_setup(tmp_path / "t", family, samples=samples)


def _cfg(root, *overrides):
    return load_config(root / "recipe.yaml", list(overrides))


def _state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_states_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not bad, f"tensors differ: {bad[:5]}"


def _peaked_maps(records, grid: int) -> dict:
    """Per record a grounding map with a clear one-cell peak on a real (non-padding) border cell, different per
    record, so every sample has valid tri-state labels with a small box (SPEC §4.1)."""
    maps = {}
    for i, rec in enumerate(records):
        pad = padding_cells(load_image(rec).size, (grid, grid))
        border = [(y, x) for y in range(grid) for x in range(grid)
                  if (y in (0, grid - 1) or x in (0, grid - 1)) and not pad[y, x]]
        y, x = border[(5 * i) % len(border)]
        A = torch.full((grid, grid), 1e-3)
        A[y, x] = 0.5
        tri = tristate_labels(A, torch.zeros_like(A), pad)
        assert tri.valid and int((tri.labels == 1).sum()) == 1 and int((tri.labels == 0).sum()) > 0
        maps[rec.id] = A
    return maps


def _handmade_store(root, cfg, n: int, shard_size: int = 3):
    """A label folder written with LabelWriter directly: peaked maps for the first `n` records."""
    records = read_records(cfg.labels_stage1.records)[:n]
    grid = cfg.labels_stage1.grid
    maps = _peaked_maps(records, grid)
    folder = root / "handmade_labels"
    writer = LabelWriter(folder, {"grid": grid, "source": "hand-made"}, shard_size)
    for rec in records:
        writer.add(rec.id, maps[rec.id], torch.zeros(grid, grid), {"mode": rec.mode})
    writer.flush()
    return folder, records, maps


def _train_overrides(labels, out, steps, lr=1e-3, warmup=0.0, save_every=2, batch=4, extra=()):
    return [f"stage1.labels={labels}", f"stage1.out={out}", f"stage1.train.max_steps={steps}",
            f"stage1.train.lr={lr}", f"stage1.train.warmup_ratio={warmup}", f"stage1.train.save_every={save_every}",
            f"stage1.train.batch_size={batch}", f"stage1.train.effective_batch={batch}", *extra]


def _log(out) -> list[dict]:
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


def _csv_steps(out) -> list[int]:
    lines = (out / "train_log.csv").read_text().splitlines()
    assert lines[0].split(",")[0] == "step"
    return [int(x.split(",")[0]) for x in lines[1:]]


class _Capture:
    """Wraps stage1.load_backbone / build_twig to keep the model and twig that train_stage1 used."""

    def __init__(self, monkeypatch):
        self.models, self.twigs = [], []
        load, build = stage1.load_backbone, stage1.build_twig

        def load_backbone_(*a, **k):
            out = load(*a, **k)
            self.models.append(out[0])
            return out

        def build_twig_(*a, **k):
            twig = build(*a, **k)
            self.twigs.append(twig)
            return twig

        monkeypatch.setattr(stage1, "load_backbone", load_backbone_)
        monkeypatch.setattr(stage1, "build_twig", build_twig_)


def _eager(model):
    model.config._attn_implementation = "eager"
    for sub in (getattr(model.config, "text_config", None), getattr(model.config, "vision_config", None)):
        if sub is not None:
            sub._attn_implementation = "eager"
    return model


def _eager_reference_maps(model, processor, spec, rec, sec):
    """The stage-1 maps of one record computed independently: HF generate, then the full model's eager
    `output_attentions` on prompt + response, averaged over the decode-step rows and the (layer, head) pairs."""
    view, pixels = fixed_grid_view(spec, load_image(rec), sec.grid)
    inputs = spec.chat_inputs(processor, [view], [stage1_prompt(rec, sec)], pixels=pixels)
    S = inputs["input_ids"].shape[1]
    eos = eos_ids(model)
    suppress = [t for t in (spec.image_token_id, spec.video_token_id, spec.vision_start_id, spec.vision_end_id)
                if t is not None]
    pad = processor.tokenizer.pad_token_id or 0
    with torch.no_grad():
        seq = model.generate(**inputs, do_sample=False, max_new_tokens=sec.max_new_tokens, eos_token_id=sorted(eos),
                             pad_token_id=pad, suppress_tokens=suppress)
    gen = seq[0, S:].tolist()
    L = next((i + 1 for i, t in enumerate(gen) if t in eos), len(gen))
    resp = torch.tensor([gen[:L]])
    ids = torch.cat([inputs["input_ids"], resp], dim=1)
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
              output_attentions=True, use_cache=False)
    for key in ("image_grid_thw", "image_sizes"):
        if key in inputs:
            kw[key] = inputs[key]
    if "mm_token_type_ids" in inputs:
        kw["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(resp)], dim=1)
    with torch.no_grad():
        attn = model(**kw).attentions
    rows = list(range(S, S + L - 1))  # the generated tokens fed back (not the prefill row, not the last token)
    image = ids[0] == spec.image_token_id

    def avg(pairs):
        if not pairs or not rows:
            return torch.zeros(sec.grid, sec.grid)
        parts = [attn[layer][0, h][rows][:, image].float() for layer, heads in pairs.items() for h in heads]
        return torch.stack(parts).mean(dim=(0, 1)).reshape(sec.grid, sec.grid)

    pairs, sink_pairs = stage1._pairs_for(sec, rec.mode)
    return avg(pairs), avg(sink_pairs), L - 1


# --- 2. response rows ---------------------------------------------------------------------------
def test_response_rows_exact():
    P, pad, eos = 3, 0, {2, 9}
    prompt = [[11, 12, 13]] * 5
    gen = [[5, 6, 2, 7, 7],  # EOS third: tokens after it become padding
           [2, 4, 4, 4, 4],  # EOS first: no decode step
           [5, 6, 7, 8, 4],  # no EOS: all 5 kept, 4 fed back
           [5, 9, 2, 7, 1],  # the first of several EOS ids ends it
           [8, 8, 8, 8, 9]]  # EOS last
    seq = torch.tensor([p + g for p, g in zip(prompt, gen)])
    resp, resp_mask, rows, row_mask = response_rows(P, seq, eos, pad)
    assert resp.tolist() == [[5, 6, 2, 0, 0], [2, 0, 0, 0, 0], [5, 6, 7, 8, 4], [5, 9, 0, 0, 0], [8, 8, 8, 8, 9]]
    assert resp_mask.dtype == torch.long
    assert resp_mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0],
                                  [1, 1, 1, 1, 1]]
    assert rows.tolist() == [[3, 4, 5, 6]] * 5
    assert row_mask.tolist() == [[True, True, False, False], [False] * 4, [True] * 4, [True, False, False, False],
                                 [True] * 4]
    # every valid row holds a generated token that was fed back: all response tokens but the last kept one
    full = torch.cat([seq[:, :P], resp], dim=1)
    for b in range(5):
        fed = full[b, rows[b][row_mask[b]]].tolist()
        kept = resp[b][resp_mask[b].bool()].tolist()
        assert fed == kept[:-1]


def test_response_rows_all_single_token_and_custom_pad():
    seq = torch.tensor([[1, 2, 3, 2, 5], [1, 2, 3, 2, 2]])
    resp, resp_mask, rows, row_mask = response_rows(3, seq, {2}, pad_id=77)
    assert resp.tolist() == [[2, 77], [2, 77]]
    assert resp_mask.tolist() == [[1, 0], [1, 0]]
    assert rows.tolist() == [[3], [3]]  # at least one row, none valid
    assert row_mask.tolist() == [[False], [False]]


# --- 1. labels: manifest, shards, resume, settings ----------------------------------------------
def test_labels_shards_resume_bit_identical_and_settings_guard(tmp_path):
    root = _tiny(tmp_path)
    cfg = _cfg(root)
    sec = cfg.labels_stage1
    records = read_records(sec.records)
    res = make_stage1_labels(cfg, show_progress=False)
    assert (res["labelled"], res["total"]) == (16, 16)
    out = root / "runs" / "labels1"
    manifest = json.loads((out / MANIFEST).read_text())
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert [i for s in manifest["shards"] for i in s["ids"]] == [r.id for r in records]
    assert manifest["settings"]["grid"] == sec.grid and manifest["settings"]["max_new_tokens"] == sec.max_new_tokens
    assert manifest["settings"]["textual_pairs"] == {"4": [0, 1], "5": [2]}
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "shard-00000.safetensors", "shard-00001.safetensors"]
    store = LabelStore(out)
    assert len(store) == 16
    first = {}
    for rec in records:
        A, S = store.maps(rec.id)
        assert A.shape == S.shape == (sec.grid, sec.grid) and A.dtype == S.dtype == torch.float32
        meta = store.meta[rec.id]
        assert meta["mode"] == rec.mode and meta["image_size"] == list(load_image(rec).size)
        assert 0 <= meta["steps"] <= sec.max_new_tokens - 1
        assert (A >= 0).all() and (S >= 0).all() and float(A.sum()) <= 1.0 + 1e-2
        if meta["steps"] > 0:
            assert float(A.sum()) > 0
        else:
            assert not A.any()
        if rec.mode == "textual":  # the tiny recipe has no textual sink pairs
            assert not S.any()
        first[rec.id] = (A, S, meta)

    # a kill after shard 0: drop shard 1 and its manifest entry
    lost = manifest["shards"].pop()
    (out / lost["file"]).unlink()
    (out / MANIFEST).write_text(json.dumps(manifest))
    res = make_stage1_labels(cfg, show_progress=False)
    assert (res["labelled"], res["total"]) == (len(lost["ids"]), 16) == (8, 16)
    again = json.loads((out / MANIFEST).read_text())
    assert again["shards"][0]["ids"] == manifest["shards"][0]["ids"]
    assert [s["ids"] for s in again["shards"][1:]] == [lost["ids"]]
    store2 = LabelStore(out)
    for rec in records:
        A, S = store2.maps(rec.id)
        assert torch.equal(A, first[rec.id][0]) and torch.equal(S, first[rec.id][1]), rec.id
        assert store2.meta[rec.id] == first[rec.id][2]

    # nothing left to do: a rerun labels nothing and writes no shard
    assert make_stage1_labels(cfg, show_progress=False)["labelled"] == 0
    assert len(json.loads((out / MANIFEST).read_text())["shards"]) == 2

    # other settings on the same folder: refused, naming the setting; the folder is untouched
    before = (out / MANIFEST).read_text()
    with pytest.raises(QZoomError, match=r"\['max_new_tokens'\]"):
        make_stage1_labels(_cfg(root, "labels_stage1.max_new_tokens=3"), show_progress=False)
    with pytest.raises(QZoomError, match=r"\['natural_pairs'\]"):
        make_stage1_labels(_cfg(root, "labels_stage1.natural_pairs={4: [1]}"), show_progress=False)
    assert (out / MANIFEST).read_text() == before
    # batch and shard sizes are not label settings: another batch size resumes the same folder
    assert make_stage1_labels(_cfg(root, "labels_stage1.batch_size=3"), show_progress=False)["labelled"] == 0


# --- 3. training overfits; backbone untouched; saved twig == trained twig ------------------------
def test_twig_overfits_backbone_bit_identical_and_saved_twig_loads(tmp_path, monkeypatch):
    root = _tiny(tmp_path)
    cfg0 = _cfg(root)
    store, records, _ = _handmade_store(root, cfg0, n=4)
    out = root / "runs" / "overfit"
    cfg = _cfg(root, *_train_overrides(store, out, steps=30, warmup=0.03, save_every=10))
    cap = _Capture(monkeypatch)
    summary = train_stage1(cfg)
    assert summary["finished"] and summary["step"] == 30
    (model,), (twig,) = cap.models, cap.twigs

    log = _log(out)
    assert [r["step"] for r in log] == list(range(1, 31))
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in log)
    start, end = log[0]["loss"], sum(r["loss"] for r in log[-3:]) / 3
    assert end < 0.1 * start, (start, end)
    assert summary["final_loss"] == log[-1]["loss"]
    assert log[0]["lr"] == pytest.approx(1e-3)  # one warm-up step (ceil(3% of 30)), then the cosine
    assert log[-1]["lr"] == 0.0

    fresh, processor, _ = load_backbone(cfg.model)
    # the backbone used for training is bit-identical to a fresh load, and frozen
    _assert_states_equal(_state(model), _state(fresh))
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    # the twig changed from its initial copy of layers[K:K+T]
    init = _state(TwigRPN.from_backbone(fresh, K=cfg.K, T=cfg.T))
    trained = _state(twig)
    assert init.keys() == trained.keys()
    changed = {k for k in init if not torch.equal(init[k], trained[k])}
    T = cfg.T
    for i in range(T - 1):  # body layers run in full: their attention and MLP weights move
        assert f"layers.{i}.self_attn.q_proj.weight" in changed and f"layers.{i}.mlp.down_proj.weight" in changed
    assert f"layers.{T - 1}.self_attn.q_proj.weight" in changed
    # the last layer contributes only q/k: its value/output/MLP weights get no gradient and stay as copied
    assert not any(k.startswith(f"layers.{T - 1}.") and ("v_proj" in k or "o_proj" in k or ".mlp." in k)
                   for k in changed)

    # the adapters written to `out` load into a fresh model and hold exactly the trained twig
    assert (out / DONE_NAME).is_file() and (out / ADAPTERS).is_file()
    zoom = QZoom.from_pretrained(out, model=fresh, processor=processor)
    assert zoom.twig is not None and zoom.gate is None and zoom.K == cfg.K and zoom.twig.T == cfg.T
    _assert_states_equal(_state(zoom.twig), trained)


# --- 4. only layers < K and the twig run ---------------------------------------------------------
def test_training_step_runs_only_layers_below_K_and_the_twig(tmp_path):
    root = _tiny(tmp_path)
    cfg = _cfg(root)
    store, records, _ = _handmade_store(root, cfg, n=4)
    model, processor, spec = load_backbone(cfg.model)
    stage1.freeze(model)
    twig = build_twig(model, cfg, None)  # copied before any hook is registered
    objective = TwigObjective(model, twig)
    dataset = Stage1Dataset(records, LabelStore(store), spec, cfg.stage1.rules)
    batch = Stage1Collate(spec, processor)([dataset[i] for i in range(4)])
    assert len(batch) == 1  # one pixel budget: one group
    labels = torch.stack(batch[0]["labels"])
    assert labels.shape == (4, cfg.labels_stage1.grid, cfg.labels_stage1.grid)
    assert (labels == 1).any() and (labels == 0).any()
    spec = get_spec(model)
    K = cfg.K
    fired = []
    handles = []
    try:
        for i, layer in enumerate(spec.layers):
            handles.append(layer.register_forward_hook(lambda m, a, o, i=i: fired.append(("layer", i))))
        handles.append(spec.lm_head.register_forward_hook(lambda m, a, o: fired.append(("lm_head", None))))
        handles.append(spec.norm.register_forward_hook(lambda m, a, o: fired.append(("norm", None))))
        for j, layer in enumerate(twig.layers):
            handles.append(layer.register_forward_hook(lambda m, a, o, j=j: fired.append(("twig", j))))
        loss = objective(batch)
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    assert fired == [("layer", i) for i in range(K)] + [("twig", j) for j in range(cfg.T - 1)]
    value = loss.detach().item()
    assert loss.ndim == 0 and math.isfinite(value) and value > 0
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in twig.layers[0].parameters())
    assert all(not h for layer in spec.layers for h in (layer._forward_hooks, layer._forward_pre_hooks))


# --- 5. stop and resume == one go ------------------------------------------------------------------
def test_stopped_and_resumed_run_equals_one_go(tmp_path):
    root = _tiny(tmp_path)
    cfg0 = _cfg(root)
    store, _, _ = _handmade_store(root, cfg0, n=8)  # 2 steps per epoch: 6 steps cross two epoch boundaries
    out_a, out_b = root / "runs" / "a", root / "runs" / "b"
    cfg_a = _cfg(root, *_train_overrides(store, out_a, steps=6, warmup=0.2))
    cfg_b = _cfg(root, *_train_overrides(store, out_b, steps=6, warmup=0.2))
    assert train_stage1(cfg_a)["finished"]

    stopped = train_stage1(cfg_b, stop_after=3)
    assert stopped == {"step": 3, "finished": False}
    assert not (out_b / ADAPTERS).exists() and not (out_b / DONE_NAME).exists()
    assert (out_b / "checkpoints" / "step-3" / "trainer_state.json").is_file()
    assert _csv_steps(out_b) == [1, 2, 3]
    resumed = train_stage1(cfg_b)
    assert resumed["finished"] and resumed["step"] == 6

    a, b = load_file(str(out_a / ADAPTERS)), load_file(str(out_b / ADAPTERS))
    _assert_states_equal(a, b)
    assert _csv_steps(out_b) == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in _log(out_b)] == [1, 2, 3, 4, 5, 6]
    assert [(r["loss"], r["lr"], r["epoch"]) for r in _log(out_a)] == [(r["loss"], r["lr"], r["epoch"])
                                                                      for r in _log(out_b)]
    assert [r["epoch"] for r in _log(out_a)] == [0, 0, 1, 1, 2, 2]
    with pytest.raises(QZoomError, match="already holds a finished run"):
        train_stage1(cfg_b)
    assert load_file(str(out_b / ADAPTERS)).keys() == b.keys()

    # killed after logging step 3 but before its checkpoint: resumes from step 2, step 3 is redone and logged once
    out_c = root / "runs" / "c"
    cfg_c = _cfg(root, *_train_overrides(store, out_c, steps=6, warmup=0.2))
    train_stage1(cfg_c, stop_after=3)
    assert sorted(p.name for p in (out_c / "checkpoints").iterdir()) == ["step-2", "step-3"]
    shutil.rmtree(out_c / "checkpoints" / "step-3")
    assert train_stage1(cfg_c)["finished"]
    _assert_states_equal(load_file(str(out_c / ADAPTERS)), a)
    assert _csv_steps(out_c) == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in _log(out_c)] == [r["loss"] for r in _log(out_a)]


# --- LR schedule counts optimizer steps, whatever the number of processes -------------------------
def test_lr_schedule_follows_optimizer_steps_even_with_several_processes(tmp_path, monkeypatch):
    """accelerate's prepared scheduler steps once per process per optimizer step unless told otherwise;
    the trainer's `total` counts optimizer steps, so the schedule must advance exactly once per step.
    (Several processes are simulated: accelerate.scheduler reads the process count from AcceleratorState.)"""
    import accelerate.scheduler

    monkeypatch.setattr(accelerate.scheduler, "AcceleratorState", lambda *a, **k: SimpleNamespace(num_processes=2))
    root = _tiny(tmp_path)
    store, _, _ = _handmade_store(root, _cfg(root), n=4)
    out = root / "runs" / "lr"
    total, warm, lr = 8, 2, 1e-3
    train_stage1(_cfg(root, *_train_overrides(store, out, steps=total, lr=lr, warmup=0.25, save_every=100)))

    def expected(t):  # transformers' cosine schedule with linear warm-up, after t optimizer steps
        if t < warm:
            return lr * t / warm
        return lr * max(0.0, 0.5 * (1 + math.cos(math.pi * (t - warm) / (total - warm))))

    got = [r["lr"] for r in _log(out)]
    assert got == pytest.approx([expected(t) for t in range(1, total + 1)], rel=1e-9, abs=1e-15)


# --- 6. stage 2.5: continue from given adapters ----------------------------------------------------
def test_init_adapters_continue_from_saved_twig(tmp_path):
    root = _tiny(tmp_path)
    store, _, _ = _handmade_store(root, _cfg(root), n=4)
    out_a, out_c, out_d = (root / "runs" / n for n in ("a", "c", "d"))
    train_stage1(_cfg(root, *_train_overrides(store, out_a, steps=3)))
    saved = load_file(str(out_a / ADAPTERS))

    # lr 0: the run's output is exactly its starting twig, i.e. the given adapters
    train_stage1(_cfg(root, *_train_overrides(store, out_c, steps=2, lr=0.0), f"stage1.init_adapters={out_a}"))
    _assert_states_equal(load_file(str(out_c / ADAPTERS)), saved)
    # ... while without init_adapters it starts from a copy of layers[K:K+T], which the trained twig is not
    train_stage1(_cfg(root, *_train_overrides(store, out_d, steps=2, lr=0.0)))
    start = load_file(str(out_d / ADAPTERS))
    cfg = _cfg(root)
    model, _, _ = load_backbone(cfg.model)
    copied = {f"twig.{k}": v for k, v in TwigRPN.from_backbone(model, cfg.K, cfg.T).state_dict().items()}
    _assert_states_equal(start, copied)
    assert any(not torch.equal(saved[k], start[k]) for k in saved)

    # a folder without a twig cannot be continued from
    with pytest.raises(QZoomError):
        train_stage1(_cfg(root, *_train_overrides(store, root / "runs" / "e", steps=1),
                          f"stage1.init_adapters={root / 'nowhere'}"))


# --- 7. every family: labels (== eager attention) and training ------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_labels_and_training_per_family(tmp_path, family, monkeypatch):
    root = _tiny(tmp_path, family, samples=8)
    cfg = _cfg(root)
    sec = cfg.labels_stage1
    records = read_records(sec.records)
    assert len(records) == 8
    assert make_stage1_labels(cfg, show_progress=False)["labelled"] == 8
    store = LabelStore(sec.out)
    assert store.settings["family"] == family and len(store) == 8
    for rec in records:
        A, S = store.maps(rec.id)
        assert A.shape == S.shape == (sec.grid, sec.grid)
        assert (A >= 0).all() and float(A.sum()) <= 1.0 + 1e-2

    # the stored maps are the model's own attention: eager output_attentions on prompt + greedy response
    model, processor, spec = load_backbone(cfg.model)
    _eager(model)
    textual = next(r for r in records if r.mode == "textual")
    natural = next(r for r in records if r.mode == "natural")
    for rec in (textual, natural):
        A_ref, S_ref, steps = _eager_reference_maps(model, processor, spec, rec, sec)
        A, S = store.maps(rec.id)
        assert store.meta[rec.id]["steps"] == steps
        torch.testing.assert_close(A, A_ref.half().float(), atol=2e-5, rtol=2e-3)
        torch.testing.assert_close(S, S_ref.half().float(), atol=2e-5, rtol=2e-3)

    # one step on the teacher's own labels (whatever their validity: the loss is finite)
    out1 = root / "runs" / "stage1"
    assert train_stage1(_cfg(root, "stage1.train.max_steps=1"))["finished"]
    assert all(math.isfinite(r["loss"]) for r in _log(out1))
    # two steps on hand-made peaked labels: a positive loss and a twig that moved
    hstore, _, _ = _handmade_store(root, cfg, n=4)
    out2 = root / "runs" / "handmade"
    cap = _Capture(monkeypatch)
    assert train_stage1(_cfg(root, *_train_overrides(hstore, out2, steps=2)))["finished"]
    assert all(r["loss"] > 0 and math.isfinite(r["loss"]) for r in _log(out2))
    fresh, processor, _ = load_backbone(cfg.model)
    _assert_states_equal(_state(cap.models[0]), _state(fresh))
    zoom = QZoom.from_pretrained(out2, model=fresh, processor=processor)
    _assert_states_equal(_state(zoom.twig), _state(cap.twigs[0]))
    init = _state(TwigRPN.from_backbone(fresh, cfg.K, cfg.T))
    assert any(not torch.equal(init[k], v) for k, v in _state(zoom.twig).items())


def test_accumulation_gives_the_mean_over_every_valid_cell(tmp_path):
    """2 micro-batches of 2 == 1 batch of 4 (SPEC §4.2: mean over every valid cell of the effective batch),
    with samples of very different valid-cell counts (some all-ignore) in the batch."""
    root = _tiny(tmp_path, samples=8)
    cfg = _cfg(root)
    records = read_records(cfg.labels_stage1.records)
    grid = cfg.labels_stage1.grid
    maps = _peaked_maps(records, grid)
    folder = root / "mixed_labels"
    writer = LabelWriter(folder, {"grid": grid, "source": "hand-made"}, 4)
    for i, rec in enumerate(records):
        A = maps[rec.id] if i % 3 else torch.full((grid, grid), 1.0 / grid**2)  # uniform: invalid, no valid cell
        writer.add(rec.id, A, torch.zeros(grid, grid), {"mode": rec.mode})
    writer.flush()
    outs = {}
    for batch, eff in ((4, 4), (2, 4)):
        out = tmp_path / f"b{batch}"
        train_stage1(_cfg(root, *_train_overrides(folder, out, 3, batch=batch),
                          f"stage1.train.effective_batch={eff}"))
        outs[batch] = (load_file(str(out / "adapter_model.safetensors")), [r["loss"] for r in _log(out)])
    (one, loss_one), (two, loss_two) = outs[4], outs[2]
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=5e-5, rtol=1e-4)  # Adam amplifies float32 noise
    assert loss_two == pytest.approx(loss_one, rel=1e-5)


def test_teacher_bans_image_placeholders(tmp_path):
    """Responses never contain image placeholders, even when the model prefers them."""
    root = _tiny(tmp_path, samples=4)
    cfg = _cfg(root)
    model, processor, spec = load_backbone(cfg.model)
    with torch.no_grad():  # make the image token the model's favourite next token at many steps
        model.lm_head.weight[spec.image_token_id] += 100.0
    teacher = stage1.Teacher(model, processor, spec, cfg.labels_stage1.grid, 5)
    recs = read_records(cfg.labels_stage1.records)[:2]
    images, prompts = [load_image(r) for r in recs], [r.question for r in recs]
    banned = {t for t in (spec.image_token_id, spec.video_token_id, spec.vision_start_id, spec.vision_end_id)
              if t is not None}
    inputs = teacher.prepare(images, prompts)
    S = inputs["input_ids"].shape[1]
    with torch.no_grad():  # without the ban, greedy decoding writes the placeholder: the test can fail
        free = model.generate(**inputs, do_sample=False, max_new_tokens=5, eos_token_id=sorted(teacher.eos),
                              pad_token_id=teacher.pad_id)[:, S:]
    assert (free == spec.image_token_id).any(dim=1).all(), free  # in every sample's unbanned response

    sequences = []
    generate = model.generate

    def recorded(*args, **kwargs):
        sequences.append(generate(*args, **kwargs))
        return sequences[-1]

    model.generate = recorded  # the teacher's own generate call, kept to read its response ids
    try:
        out = teacher.run(images, prompts, [4])
    finally:
        del model.generate
    assert len(sequences) == 1 and sequences[0].shape[1] > S
    resp, resp_mask, _, _ = response_rows(S, sequences[0].cpu(), teacher.eos, teacher.pad_id)
    valid = resp[resp_mask.bool()].tolist()
    assert valid and not banned & set(valid), f"placeholders {banned & set(valid)} in the responses"
    assert not out.image_mask[:, S:].any()  # what the probe re-read holds no image tokens after the prompt
    assert int(out.image_mask[:, :S].sum()) == 2 * cfg.labels_stage1.grid ** 2
    assert out.row_mask.any()  # responses were generated (and re-read by the probe without error)


def test_require_correct_keeps_only_samples_the_teacher_answered_right(tmp_path):
    """rules.require_correct: a sample counts only when its stored teacher response matches a ground truth
    (normalised exact match, not ANLS: a code one character off is wrong); none right is a clear error."""
    root = _tiny(tmp_path)
    cfg = _cfg(root)
    records = read_records(cfg.labels_stage1.records)[:4]
    maps = _peaked_maps(records, cfg.labels_stage1.grid)
    folder = root / "labels_with_responses"
    writer = LabelWriter(folder, {"grid": cfg.labels_stage1.grid}, 8)
    replies = [records[0].answers[0].upper() + ".", "x" + records[1].answers[0], "", records[3].answers[0]]
    for rec, reply in zip(records, replies):
        writer.add(rec.id, maps[rec.id], torch.zeros_like(maps[rec.id]), {"mode": rec.mode, "response": reply})
    writer.flush()
    model, _, spec = load_backbone(cfg.model)
    rules = cfg.stage1.rules
    assert len(Stage1Dataset(records, LabelStore(folder), spec, rules)) == 4
    strict = rules.model_copy(update={"require_correct": True})
    kept = Stage1Dataset(records, LabelStore(folder), spec, strict)
    assert [r.id for r in kept.records] == [records[0].id, records[3].id]
    assert kept[0]["valid"] and "require_correct" not in kept.thresholds
    with pytest.raises(QZoomError, match="answered none"):
        Stage1Dataset(records[1:3], LabelStore(folder), spec, strict)
