"""`stage1.budgets`: the twig trained on the views it runs on (beyond SPEC §4.2).

The teacher's maps live on the square-padded label grid; `map_to_view` moves them onto the grid of the image's
own view at a budget (area shares, mass kept, padding dropped). The dataset draws a budget per (epoch, index), the
collate groups a micro-batch by budget, and the loss is the mean BCE over every valid cell of every group.
"""
from __future__ import annotations

import math

import pytest
import torch

from qzoom_adapters import QZoom, QZoomError
from qzoom_adapters.labels import IGNORE, map_to_view, padding_cells, tristate_labels
from qzoom_adapters.losses import selective_bce
from qzoom_adapters.recipes.config import load_config
from qzoom_adapters.recipes.data import load_image, read_records
from qzoom_adapters.recipes.label_store import LabelStore, LabelWriter
from qzoom_adapters.recipes.models import load_backbone
from qzoom_adapters.recipes.stage1 import (Stage1Collate, Stage1Dataset, TwigObjective, build_twig, label_thresholds,
                                           train_stage1)
from qzoom_adapters.recipes.tiny import write_tiny_setup

pytestmark = pytest.mark.usefixtures("one_thread")
BUDGETS = [36, 64, 100]


# --- map_to_view -----------------------------------------------------------------------------------
def test_map_to_view_keeps_the_image_mass_and_drops_the_padding():
    g = 12
    A = torch.rand(g, g, generator=torch.Generator().manual_seed(0))
    W, H = 300, 200  # square side 300: rows 2..9 of the 12 hold the image (offset 50 px = 2 cells of 25 px)
    view = map_to_view(A, (W, H), (5, 7))
    assert view.shape == (5, 7)
    assert torch.allclose(view.sum(), A[2:10].sum(), rtol=1e-5)
    assert torch.allclose(map_to_view(A, (300, 300), (g, g)), A, atol=1e-6)  # square, same grid: unchanged


def test_map_to_view_puts_a_peak_in_the_view_cell_that_holds_it():
    g = 16
    W, H = 320, 160  # side 320, 20 px cells; image rows start at 80 px = cell 4
    A = torch.zeros(g, g)
    A[6, 13] = 1.0  # square px x 260..280, y 120..140 -> image px y 40..60
    view = map_to_view(A, (W, H), (4, 8))  # view cells 40 x 40 image px
    assert int(view.argmax()) == 1 * 8 + 6 and math.isclose(float(view.max()), 1.0, rel_tol=1e-6)
    split = map_to_view(A, (W, H), (4, 6))  # x 260..280 over cells of 53.3 px: cell 4 ends at 266.7, cell 5 after
    assert torch.allclose(split[1, 4:6], torch.tensor([1 / 3, 2 / 3]), atol=1e-6)
    assert math.isclose(float(split.sum()), 1.0, rel_tol=1e-6)


def test_map_to_view_refuses_bad_input():
    with pytest.raises(QZoomError, match="non-negative"):
        map_to_view(-torch.ones(4, 4), (10, 10), (2, 2))
    with pytest.raises(QZoomError, match="positive sizes"):
        map_to_view(torch.ones(4, 4), (10, 10), (0, 2))


# --- the dataset, the collate and the loss -----------------------------------------------------------
def _setup(tmp_path, family="qwen2_5_vl", n=8, extra=()):
    root = write_tiny_setup(tmp_path / "t", family, samples=n)
    cfg0 = load_config(root / "recipe.yaml")
    grid = cfg0.labels_stage1.grid
    records = read_records(cfg0.labels_stage1.records)[:n]
    folder = root / "labels"
    writer = LabelWriter(folder, {"grid": grid, "source": "hand-made"}, 4)
    for i, rec in enumerate(records):  # one peak per record on a real (non-padding) cell
        pad = padding_cells(load_image(rec).size, (grid, grid))
        cells = [(y, x) for y in range(grid) for x in range(grid) if not pad[y, x]]
        y, x = cells[(7 * i + 3) % len(cells)]
        A = torch.full((grid, grid), 1e-3)
        A[y, x] = 0.5
        writer.add(rec.id, A, torch.zeros_like(A), {"mode": rec.mode})
    writer.flush()
    over = [*_overrides(folder, BUDGETS), f"stage1.out={root / 'out'}", *extra]
    return root, load_config(root / "recipe.yaml", over), records, LabelStore(folder)


def test_budget_items_are_drawn_per_epoch_and_labelled_on_their_own_grid(tmp_path):
    _, cfg, records, store = _setup(tmp_path)
    model, processor, spec = load_backbone(cfg.model)
    ds = Stage1Dataset(records, store, spec, cfg.stage1.rules, cfg.stage1.budgets, seed=3)
    draws = [[ds.get(i, e)["pixels"] for i in range(len(ds))] for e in range(3)]
    assert draws == [[ds.get(i, e)["pixels"] for i in range(len(ds))] for e in range(3)]  # fixed by (epoch, index)
    assert draws[0] != draws[1] or draws[1] != draws[2]
    assert {p for d in draws for p in d} <= {spec.budget_pixels(b) for b in BUDGETS}

    items = [ds.get(i, 0) for i in range(len(ds))]
    groups = Stage1Collate(spec, processor, label_thresholds(cfg.stage1.rules))(items)
    pixels = sorted({it["pixels"] for it in items})
    assert len(groups) == len(pixels)
    seen = 0
    for g, px in zip(groups, pixels):
        mine = [it for it in items if it["pixels"] == px]
        grids = [spec.token_grid(r) for r in spec.image_grids(g["inputs"])]
        assert [tuple(lab.shape) for lab in g["labels"]] == grids
        for it, lab, grid in zip(mine, g["labels"], grids):
            A, S = (map_to_view(m, it["image_size"], grid) for m in it["maps"])
            assert torch.equal(lab, tristate_labels(A, S, None, **label_thresholds(cfg.stage1.rules)).labels)
        seen += len(mine)
    assert seen == len(items)
    assert any((lab != IGNORE).any() for g in groups for lab in g["labels"])  # a box of >= 50% is invalid

    # the loss is the mean BCE over every valid cell of all groups, and loss_terms counts those cells
    twig = build_twig(model, cfg, None)
    objective = TwigObjective(model, twig)
    loss = objective(groups)
    logits, labels = [], []
    for g in groups:
        a = objective.trunk.prefill(g["inputs"], twig.K)
        scores, _ = twig.query_scores(spec, a.hK, a.kwargs, objective.trunk, a.mask.argmax(dim=1))
        logits += [m.flatten() for m in a.image_logits(scores, spec)]
        labels += [lab.flatten() for lab in g["labels"]]
    expected = selective_bce(torch.cat(logits), torch.cat(labels))
    assert torch.allclose(loss, expected, atol=1e-6)
    assert objective.loss_terms(groups) == int((torch.cat(labels) != IGNORE).sum())


def test_training_at_budgets_resumes_to_the_same_twig_and_loads(tmp_path):
    steps = ("stage1.train.max_steps=4", "stage1.train.save_every=1")
    root, cfg, _, _ = _setup(tmp_path, extra=steps)
    summary = train_stage1(cfg)
    assert summary["step"] == 4 and summary["finished"] and math.isfinite(summary["final_loss"])
    cfg_b = load_config(root / "recipe.yaml", [*_overrides(cfg.stage1.labels, cfg.stage1.budgets),
                                               f"stage1.out={root / 'out_b'}", *steps])
    assert not train_stage1(cfg_b, stop_after=2)["finished"]  # stopped, then the same command again
    assert train_stage1(cfg_b)["finished"]
    model, processor, _ = load_backbone(cfg.model)
    one, two = (QZoom.from_pretrained(root / d, model=model, processor=processor).twig for d in ("out", "out_b"))
    copied = build_twig(model, cfg, None)
    a, b, c = (m.state_dict() for m in (one, two, copied))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k].to(a[k].dtype)) for k in a)  # it trained


def _overrides(labels, budgets) -> list[str]:
    return [f"stage1.labels={labels}", "stage1.train.batch_size=4", "stage1.train.effective_batch=4",
            "stage1.train.lr=1e-3", "stage1.train.warmup_ratio=0", f"stage1.budgets=[{','.join(map(str, budgets))}]"]


def test_budgets_are_refused_where_they_cannot_work(tmp_path):
    _, cfg, records, store = _setup(tmp_path, family="llava", n=2)
    _, _, spec = load_backbone(cfg.model)
    with pytest.raises(QZoomError, match="fixed"):
        Stage1Dataset(records, store, spec, cfg.stage1.rules, cfg.stage1.budgets)
    root = tmp_path / "t"
    with pytest.raises(QZoomError, match="distinct"):
        load_config(root / "recipe.yaml", ["stage1.labels=x", "stage1.out=y", "stage1.budgets=[64,64]"])
