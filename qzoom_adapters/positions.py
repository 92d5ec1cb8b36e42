"""The RoI sequence and its position ids (SPEC §3.1-§3.2)."""
from __future__ import annotations

import torch

from .errors import QZoomError


def roi_input_ids(ids: torch.Tensor, P: int, n_roi: int, vision_start: int, vision_end: int, image_token: int):
    """Insert `<vs> ROI*n <ve>` right after the global `<vision_end>` at index P of 1-D `ids`."""
    block = torch.tensor([vision_start] + [image_token] * n_roi + [vision_end], dtype=ids.dtype, device=ids.device)
    return torch.cat([ids[: P + 1], block, ids[P + 1 :]])


def roi_position_ids(
    pos: torch.Tensor, P: int, s0_index: int, roi_grid: tuple[int, int], box_tok, mode: str
) -> torch.Tensor:
    """Position ids (axes, S + n + 2), float32, of the RoI sequence of one unpadded sample.

    Args:
        pos: the sample's original position ids (axes, S).
        P: index of the global `<vision_end>`; `s0_index`: index of the first global image token.
        roi_grid: the crop's merged grid (h_r, w_r); box_tok: (x1, y1, x2, y2) in global token units.
        mode: "aligned" (the crop in the global image's frame, one time step later) or "sequential"
            (an ordinary second image).
    """
    axes = pos.shape[0]
    h_r, w_r = roi_grid
    n = h_r * w_r
    pos = pos.to("cpu", torch.float32)  # small bookkeeping tensor; the pipeline moves it to the device
    p_e = pos[0, P]
    shift = max(h_r, w_r) + 2
    if axes != 3:
        raise QZoomError(f"RoI positions are defined for 3-axis M-RoPE here; got {axes} axes")
    rows = torch.arange(h_r, dtype=torch.float32).repeat_interleave(w_r)
    cols = torch.arange(w_r, dtype=torch.float32).repeat(h_r)
    if mode == "sequential":
        h, w = p_e + 2 + rows, p_e + 2 + cols
    elif mode == "aligned":
        s0 = pos[0, s0_index]
        x1, y1, x2, y2 = box_tok
        hs = torch.linspace(float(s0 + y1), float(s0 + y2 - 1), h_r, dtype=torch.float32)
        ws = torch.linspace(float(s0 + x1), float(s0 + x2 - 1), w_r, dtype=torch.float32)
        h, w = hs[rows.long()], ws[cols.long()]
    else:
        raise QZoomError(f"position_mode must be 'aligned' or 'sequential', got {mode!r}")
    t = torch.full((n,), float(p_e + 2))
    tokens = torch.stack([t, h, w])
    start = torch.full((3, 1), float(p_e + 1))
    end = torch.full((3, 1), float(p_e + shift))
    return torch.cat([pos[:, : P + 1], start, tokens, end, pos[:, P + 1 :] + shift], dim=1)
