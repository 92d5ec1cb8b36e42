"""`roi_refine`: factor 1 is SPEC §2's box exactly; a factor f > 1 draws the pixel box around the fine cells of the
bilinearly upsampled map, so it lies inside SPEC's box, and its token box is the grid cells it touches."""
from __future__ import annotations

import pydantic
import pytest
import torch
from PIL import Image

from qzoom_adapters import roi
from qzoom_adapters.config import ZoomConfig


def _peak(h: int = 3, w: int = 3, centre: float = 0.8, rest: float = 0.1) -> torch.Tensor:
    m = torch.full((h, w), rest)
    m[h // 2, w // 2] = centre
    return m


def test_refine_box_by_hand():
    # 3x3, centre 0.8, rest 0.1, factor 4: the centre cell's fine cells sit 0.375 or 0.125 cells from its centre
    # along each axis, so bilinear weights on the centre are 0.625 or 0.875 per axis: 0.8 w + 0.1 (1 - w) with
    # w = 0.875^2 gives 0.636 (the middle 2x2), 0.875 * 0.625 gives 0.483, 0.625^2 gives 0.373 (the corners)
    blurred = _peak()
    coarse = blurred > 0.6
    assert roi.refine_box(blurred, coarse, 0.6, 4) == (5, 5, 7, 7)
    assert roi.refine_box(blurred, coarse, 0.35, 4) == (4, 4, 8, 8)  # all pass: the coarse box, in fine units
    assert roi.refine_box(blurred, coarse, 0.6, 1) == roi.token_box(coarse) == (1, 1, 2, 2)
    assert roi._fine_to_cells((5, 5, 7, 7), 4) == (1, 1, 2, 2)
    assert roi._fine_to_cells((3, 5, 9, 7), 4) == (0, 1, 3, 2)


def test_fine_cells_outside_the_chosen_region_never_count():
    blurred = _peak(1, 5, 0.9, 0.0)
    blurred[0, 0] = 0.9  # a second cell far away, outside the coarse mask handed in
    coarse = torch.zeros(1, 5, dtype=torch.bool)
    coarse[0, 2] = True
    x1, _, x2, _ = roi.refine_box(blurred, coarse, 0.3, 4)
    assert 8 <= x1 < x2 <= 12


class _Spec:
    """The two spec methods the crop step calls: no sink (as LLaVA), the grid spans the whole image."""

    def sink_mask(self, h_t, w_t, **ctx):
        return torch.ones(h_t, w_t)

    def source_window(self, image_processor, image_size):
        return 0.0, 0.0, float(image_size[0]), float(image_size[1])


def _crop(cfg: ZoomConfig, logits: torch.Tensor, size=(600, 400)):
    image = Image.new("RGB", size, (20, 40, 60))
    return roi.crop_from_heatmap(_Spec(), logits, None, image, None, cfg)


@pytest.mark.parametrize("region", ["union", "largest"])
def test_factor_one_is_spec_and_larger_factors_shrink_inside_it(region):
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(8, 12, generator=g) * 2
        spec_blur, spec_crop = _crop(ZoomConfig(roi_threshold=0.5, roi_region=region), logits)
        blur, crop = _crop(ZoomConfig(roi_threshold=0.5, roi_region=region, roi_refine=1), logits)
        assert torch.equal(blur, spec_blur)
        if spec_crop is None:
            assert crop is None
            continue
        assert (crop.box_tok, crop.box_px) == (spec_crop.box_tok, spec_crop.box_px)
        for f in (2, 4, 8):
            fine = _crop(ZoomConfig(roi_threshold=0.5, roi_region=region, roi_refine=f), logits)[1]
            X1, Y1, X2, Y2 = spec_crop.box_px
            x1, y1, x2, y2 = fine.box_px
            assert X1 <= x1 < x2 <= X2 and Y1 <= y1 < y2 <= Y2
            tx1, ty1, tx2, ty2 = fine.box_tok  # the cells the pixel box touches, inside SPEC's token box
            sx1, sy1, sx2, sy2 = spec_crop.box_tok
            assert sx1 <= tx1 < tx2 <= sx2 and sy1 <= ty1 < ty2 <= sy2
            assert tx1 * 50 <= x1 and x2 <= tx2 * 50 and ty1 * 50 <= y1 and y2 <= ty2 * 50  # 50 px per cell
            assert fine.image.size == (x2 - x1, y2 - y1)


def test_a_peaked_map_gets_a_sub_cell_box():
    logits = torch.logit(_peak(8, 12, 0.9, 0.01))  # 50 px cells; the blur spreads the peak to its neighbours
    spec_crop = _crop(ZoomConfig(roi_threshold=0.1), logits)[1]
    fine = _crop(ZoomConfig(roi_threshold=0.1, roi_refine=4), logits)[1]
    area = lambda b: (b[2] - b[0]) * (b[3] - b[1])
    assert area(fine.box_px) < area(spec_crop.box_px)


@pytest.mark.parametrize("bad", [0, -1, 17, 1.5, "4x"])
def test_bad_refine_is_refused(bad):
    with pytest.raises(pydantic.ValidationError):
        ZoomConfig(roi_refine=bad)
