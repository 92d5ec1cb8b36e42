"""`roi_region`: "union" is SPEC §2 step 5 exactly; "largest" keeps the 8-connected component with the largest
blurred mass, a subset of the union; the chain searches region x threshold on validation."""
from __future__ import annotations

import pydantic
import pytest
import torch

from qzoom_adapters import roi
from qzoom_adapters.config import ZoomConfig
from qzoom_adapters.errors import QZoomError


def _mask(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "#" for c in r] for r in rows])


def test_components_are_eight_connected_and_labelled_by_their_first_cell():
    m = _mask(["#..#",
               ".#..",
               "...#",
               "##.#"])
    lab = roi.components(m)
    assert (lab[~m] == 0).all()
    # (0,0) and (1,1) touch diagonally: one component, labelled 1 (flat index 0, plus one)
    assert lab[0, 0] == lab[1, 1] == 1
    # (0,3) stands alone; (2,3) and (3,3) are one; (3,0) and (3,1) are one
    assert lab[0, 3] == 4
    assert lab[2, 3] == lab[3, 3] == 12
    assert lab[3, 0] == lab[3, 1] == 13
    assert len(torch.unique(lab[m])) == 4


def test_components_of_a_snake_reach_its_far_end():
    m = _mask(["#####",
               "....#",
               "#####",
               "#....",
               "#####"])
    lab = roi.components(m)
    assert len(torch.unique(lab[m])) == 1


def test_union_is_spec_threshold_and_largest_is_the_heaviest_component():
    blurred = torch.zeros(6, 6)
    blurred[0, 0] = 0.9  # one bright stray cell
    blurred[3:5, 3:6] = 0.5  # a wider, heavier blob (mass 3.0 > 0.9)
    union = roi.region_mask(blurred, 0.2, "union")
    assert torch.equal(union, blurred > 0.2)
    largest = roi.region_mask(blurred, 0.2, "largest")
    assert (largest <= union).all()
    assert torch.equal(largest, (blurred > 0.2) & (torch.arange(6)[:, None] >= 3))
    assert roi.token_box(union) == (0, 0, 6, 5)
    assert roi.token_box(largest) == (3, 3, 6, 5)


def test_one_component_gives_the_same_box_either_way_and_an_empty_mask_none():
    blurred = torch.zeros(5, 7)
    blurred[1:3, 2:5] = torch.tensor([[0.3, 0.6, 0.3], [0.2, 0.8, 0.4]])
    logits = torch.logit(blurred.clamp(1e-4, 1 - 1e-4))
    sink = torch.ones(5, 7)
    for region in ("union", "largest"):
        assert torch.equal(roi.region_mask(blurred, 0.1, region), blurred > 0.1)
        _, box = roi.roi_from_heatmap(logits, sink, 0.95, 3, 1.0, region)
        assert box is None
    _, b_union = roi.roi_from_heatmap(logits, sink, 0.05, 3, 1.0, "union")
    _, b_largest = roi.roi_from_heatmap(logits, sink, 0.05, 3, 1.0, "largest")
    assert b_union == b_largest is not None


def test_largest_box_lies_inside_the_union_box_on_random_maps():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(9, 11, generator=g) * 3
        sink = torch.ones(9, 11)
        _, bu = roi.roi_from_heatmap(logits, sink, 0.5, 3, 1.0, "union")
        _, bl = roi.roi_from_heatmap(logits, sink, 0.5, 3, 1.0, "largest")
        assert (bu is None) == (bl is None)
        if bu is not None:
            assert bu[0] <= bl[0] and bu[1] <= bl[1] and bl[2] <= bu[2] and bl[3] <= bu[3]


def test_a_bad_region_is_refused_by_the_config_and_by_the_function():
    assert ZoomConfig().roi_region == "union"
    assert ZoomConfig(roi_region="largest").roi_region == "largest"
    with pytest.raises(pydantic.ValidationError, match="roi_region"):
        ZoomConfig(roi_region="biggest")
    blurred = torch.zeros(3, 3)
    blurred[1, 1] = 1.0
    with pytest.raises(QZoomError, match="roi_region"):
        roi.region_mask(blurred, 0.5, "biggest")


def test_the_chain_picks_region_and_threshold_by_validation_accuracy_and_leaves_the_zoom_alone():
    from qzoom_adapters.benchmarks.zoomworld.chain import choose_roi_threshold, validation_samples
    from qzoom_adapters.benchmarks.zoomworld.shipped import load_default

    zoom, spec, processor = load_default()
    before = zoom.config.model_dump()
    samples = [s for s in validation_samples(6) if s.family == "detail"]
    got = choose_roi_threshold(zoom, spec, processor, samples, budgets=(64,), candidates=(0.1, 0.6), batch_size=3)
    assert zoom.config.model_dump() == before
    assert set(got["candidates"]) == {"union@0.1", "union@0.6", "largest@0.1", "largest@0.6"}
    assert got["n"] == 3 and got["budgets"] == [64]
    rows = got["candidates"]
    best = max(round(r["detail_accuracy"], 6) for r in rows.values())
    chosen = rows[f"{got['roi_region']}@{got['roi_threshold']}"]
    assert round(chosen["detail_accuracy"], 6) == best
    assert all(0.0 <= r["mean_iou"] <= 1.0 and 0.0 <= r["box_hit"] <= 1.0 for r in rows.values())
