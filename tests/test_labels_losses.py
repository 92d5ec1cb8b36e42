"""Stage-1 tri-state pseudo-labels and selective BCE on hand-built maps with known answers (SPEC §4.1, §4.2)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qzoom_adapters.errors import QZoomError
from qzoom_adapters.labels import padding_cells, tristate_labels
from qzoom_adapters.losses import selective_bce

IGN = -100.0  # ignore label


def peak_map(value=0.1, rows=(3, 5), cols=(2, 4), base=0.001, size=8):
    """size x size map of `base` with a block of `value` on rows [r0, r1) and cols [c0, c1)."""
    A = torch.full((size, size), base)
    A[rows[0]:rows[1], cols[0]:cols[1]] = value
    return A


def expected(fg, box, bg, size=8):
    """Label map from FG cells, the ignore-filled box and extra BG cells; everything else outside the box is BG."""
    lab = torch.zeros(size, size)
    x1, y1, x2, y2 = box
    lab[y1:y2, x1:x2] = IGN
    for y, x in bg:
        lab[y, x] = 0.0
    for y, x in fg:
        lab[y, x] = 1.0
    return lab


# ---- tristate_labels -------------------------------------------------------------------------------------------

def test_two_by_two_peak_exact_fg_box_bg():
    A = peak_map()
    A[0, 7] = 0.01  # above 0.05*m = 0.005 and below 0.25*m: neither FG nor BG
    t = tristate_labels(A)
    assert t.valid and t.peak == pytest.approx(0.1)
    assert t.box == (1, 2, 5, 6)  # FG box (2, 3, 4, 5) grown by one cell
    want = expected(fg=[(3, 2), (3, 3), (4, 2), (4, 3)], box=(1, 2, 5, 6), bg=[])
    want[0, 7] = IGN
    assert torch.equal(t.labels, want)
    assert t.labels.dtype == torch.float32


def test_box_growth_clipped_at_corner_and_wider_kernel():
    t = tristate_labels(peak_map(rows=(0, 2), cols=(0, 2)))
    assert t.box == (0, 0, 3, 3)
    t5 = tristate_labels(peak_map(), blur_kernel=5, blur_sigma=1.0)
    assert t5.box == (0, 1, 6, 7)  # a 5-wide kernel reaches two cells out


@pytest.mark.parametrize("value", [1e-30, 4e-45])
def test_box_does_not_underflow_for_tiny_peaks(value):
    # At 4e-45 (3 float32 denormal steps) a plain blur rounds every neighbour to exactly 0.
    t = tristate_labels(peak_map(value=value, base=0.0))
    assert t.box == (1, 2, 5, 6) and not t.valid  # the box is still the grown FG box; the peak rule rejects it
    assert torch.equal(t.labels, torch.full((8, 8), IGN))


def test_fg_and_bg_thresholds_are_strict():
    A = torch.zeros(8, 8)
    A[2, 2] = 1.0
    A[2, 3] = 0.25  # exactly 0.25*m: not FG
    A[7, 7] = 0.05  # exactly 0.05*m: not BG
    A[7, 6] = 0.0499
    t = tristate_labels(A)
    assert t.box == (1, 1, 4, 4)
    assert t.labels[2, 2] == 1.0 and t.labels[2, 3] == IGN
    assert t.labels[7, 7] == IGN and t.labels[7, 6] == 0.0


def test_sink_cell_excluded_from_fg_and_peak():
    A = peak_map()
    S = torch.zeros(8, 8)
    A[0, 7], S[0, 7] = 0.9, 0.02  # huge attention on a sink outside the box
    A[3, 1], S[3, 1] = 0.9, 0.01  # a sink inside the box (S exactly at the threshold counts as sink)
    t = tristate_labels(A, S)
    assert t.peak == pytest.approx(0.1)
    assert t.box == (1, 2, 5, 6)
    # A·(S < 0.01) is 0 on a sink, so a sink outside the box is BG; inside the box it stays ignored.
    assert t.labels[0, 7] == 0.0 and t.labels[3, 1] == IGN
    assert torch.equal(t.labels, expected(fg=[(3, 2), (3, 3), (4, 2), (4, 3)], box=(1, 2, 5, 6), bg=[]))


def test_sink_just_below_threshold_is_not_a_sink():
    A = peak_map()
    S = torch.zeros(8, 8)
    A[0, 7], S[0, 7] = 0.9, 0.0099
    t = tristate_labels(A, S)
    assert t.peak == pytest.approx(0.9) and t.box == (6, 0, 8, 2)
    assert t.labels[0, 7] == 1.0 and t.labels[3, 2] == IGN  # the old peak is now below 0.25*m but above 0.05*m


def test_padding_cells_are_bg_even_inside_box_and_never_fg():
    A = peak_map(rows=(1, 3), cols=(3, 5))
    A[0, :] = 0.5  # strong attention on the grey padding row
    pad = torch.zeros(8, 8, dtype=torch.bool)
    pad[0, :] = True
    t = tristate_labels(A, padding=pad)
    assert t.peak == pytest.approx(0.1)
    assert t.box == (2, 0, 6, 4)  # grown upward into the padding row
    want = expected(fg=[(1, 3), (1, 4), (2, 3), (2, 4)], box=(2, 0, 6, 4), bg=[(0, x) for x in range(8)])
    assert torch.equal(t.labels, want)


def test_half_grid_box_rule():
    # FG cols 1..5, rows 1..2 -> grown box 7 x 4 = 28 < 32 cells: valid.
    assert tristate_labels(peak_map(rows=(1, 3), cols=(1, 6))).valid
    # FG cols 1..6 -> grown box 8 x 4 = 32, not < 50% of 64: invalid, all ignore.
    t = tristate_labels(peak_map(rows=(1, 3), cols=(1, 7)))
    assert t.box == (0, 0, 8, 4) and not t.valid
    assert torch.equal(t.labels, torch.full((8, 8), IGN))
    assert not tristate_labels(peak_map(rows=(0, 4), cols=(0, 8))).valid


@pytest.mark.parametrize("peak, valid", [(4e-3, False), (5e-3, True), (6e-3, True)])
def test_min_peak_rule(peak, valid):
    t = tristate_labels(peak_map(value=peak, base=0.0))
    assert t.valid is valid
    assert (t.labels == 1.0).sum() == (4 if valid else 0)
    assert bool((t.labels == IGN).all()) is (not valid)


def test_empty_map_is_invalid():
    t = tristate_labels(torch.zeros(8, 8))
    assert t.box is None and not t.valid and t.peak == 0.0
    assert torch.equal(t.labels, torch.full((8, 8), IGN))


def test_labels_are_tristate_and_fg_inside_box():
    torch.manual_seed(0)
    A = torch.rand(12, 12) ** 8  # a few dominant cells
    t = tristate_labels(A)
    assert set(t.labels.unique().tolist()) <= {IGN, 0.0, 1.0}
    x1, y1, x2, y2 = t.box
    inside = torch.zeros(12, 12, dtype=torch.bool)
    inside[y1:y2, x1:x2] = True
    assert not ((t.labels == 0.0) & inside).any()
    assert not ((t.labels == 1.0) & ~inside).any()


@pytest.mark.parametrize("kwargs, match", [
    (dict(grounding=torch.zeros(8, 8), sink=torch.zeros(8, 7)), "shape"),
    (dict(grounding=torch.zeros(8, 8), padding=torch.zeros(7, 8, dtype=torch.bool)), "shape"),
    (dict(grounding=torch.zeros(8, 8), padding=torch.zeros(8, 8)), "bool"),
    (dict(grounding=torch.zeros(1, 8, 8)), "2-D"),
    (dict(grounding=torch.full((8, 8), float("nan"))), "NaN"),
    (dict(grounding=torch.zeros(8, 8), sink=torch.full((8, 8), float("nan"))), "NaN"),
    (dict(grounding=-torch.ones(8, 8)), "non-negative"),
    (dict(grounding=[[0.0]]), "torch.Tensor"),
])
def test_bad_maps_raise(kwargs, match):
    with pytest.raises(QZoomError, match=match):
        tristate_labels(**kwargs)


# ---- padding_cells ---------------------------------------------------------------------------------------------

def test_padding_cells_wide_tall_square_and_odd():
    wide = padding_cells((64, 32), (4, 4))
    assert torch.equal(wide, torch.tensor([[True] * 4, [False] * 4, [False] * 4, [True] * 4]))
    assert torch.equal(padding_cells((32, 64), (4, 4)), wide.T)
    assert not padding_cells((50, 50), (24, 24)).any()
    odd = padding_cells((30, 10), (3, 3))  # image rows [10, 20) of a 30-px square; centres at 5, 15, 25
    assert torch.equal(odd, torch.tensor([[True] * 3, [False] * 3, [True] * 3]))
    assert padding_cells((640, 480), (24, 24)).shape == (24, 24)


def test_padding_cells_feed_tristate_labels():
    pad = padding_cells((64, 32), (8, 8))  # rows 0-1 and 6-7 are padding
    t = tristate_labels(peak_map(), padding=pad)
    assert torch.equal(t.labels[pad], torch.zeros(int(pad.sum())))


def test_padding_cells_bad_sizes():
    with pytest.raises(QZoomError, match="positive"):
        padding_cells((0, 10), (4, 4))


# ---- selective_bce ---------------------------------------------------------------------------------------------

def test_selective_bce_matches_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, requires_grad=True)
    labels = torch.tensor([[[1, 0, IGN, IGN], [IGN, IGN, IGN, 1], [0, 0, IGN, IGN]],
                           [[IGN, IGN, IGN, IGN], [1, IGN, IGN, IGN], [IGN, IGN, IGN, 0]]])
    valid = labels != IGN
    x, y = logits[valid], labels[valid]
    p = torch.sigmoid(x)
    by_hand = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    loss = selective_bce(logits, labels)
    assert torch.allclose(loss, by_hand, atol=1e-6)
    assert torch.allclose(loss, F.binary_cross_entropy_with_logits(x, y), atol=1e-6)
    loss.backward()
    assert (logits.grad[~valid] == 0).all() and (logits.grad[valid] != 0).all()


def test_selective_bce_means_over_cells_of_whole_batch_not_per_sample():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    labels = torch.tensor([[1.0, IGN, IGN, IGN], [0.0, 0.0, 0.0, IGN]])
    a, b = F.softplus(torch.tensor(0.0)) * 1, F.softplus(torch.tensor(2.0)) * 3  # BCE(0, 1) and 3 x BCE(2, 0)
    assert torch.allclose(selective_bce(logits, labels), (a + b) / 4)


def test_selective_bce_all_ignored_is_zero_in_graph():
    logits = torch.tensor([[5.0, -3.0], [float("inf"), 0.0]], requires_grad=True)
    loss = selective_bce(logits, torch.full((2, 2), IGN))
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(2, 2))


def test_selective_bce_bf16_logits_and_int_labels():
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 6).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(-1, 2, (4, 6, 6))
    labels[labels == -1] = -100
    loss = selective_bce(logits, labels)
    assert loss.dtype == torch.float32
    valid = labels != -100
    ref = F.binary_cross_entropy_with_logits(logits.detach().float()[valid], labels[valid].float())
    assert torch.allclose(loss, ref, atol=1e-6)
    loss.backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()


def test_selective_bce_custom_ignore_index_and_shape_mismatch():
    logits = torch.zeros(3)
    loss = selective_bce(logits, torch.tensor([1.0, -1.0, -1.0]), ignore_index=-1)
    assert torch.allclose(loss, F.softplus(-logits[0]))  # BCE(x, 1) = softplus(-x)
    with pytest.raises(QZoomError, match="does not match"):
        selective_bce(torch.zeros(2, 3), torch.zeros(3, 2))


def test_cells_inside_maps_a_source_box_into_the_padded_grid():
    from qzoom_adapters.labels import cells_inside

    got = cells_inside((0, 0, 200, 200), (400, 200), (4, 4))  # square side 400, image pasted 100 px down
    want = torch.zeros(4, 4, dtype=torch.bool)
    want[1:3, 0:2] = True
    assert torch.equal(got, want)
