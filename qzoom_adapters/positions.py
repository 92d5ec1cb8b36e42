"""The RoI sequence and its position ids (SPEC §3.1-§3.2), and the batched layout of pass B (SPEC §3.3)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import QZoomError
from .spec import ImageSpan, VisualFeatures


def roi_input_ids(ids: torch.Tensor, at: int, n_roi: int, image_token: int,
                  vision_start: int | None = None, vision_end: int | None = None) -> torch.Tensor:
    """Insert the RoI block (`<vs> ROI*n <ve>`, markers where the backbone has them) at index `at`."""
    block = [vision_start] * (vision_start is not None) + [image_token] * n_roi + [vision_end] * (vision_end is not None)
    return torch.cat([ids[:at], torch.tensor(block, dtype=ids.dtype, device=ids.device), ids[at:]])


def roi_position_ids(pos: torch.Tensor, at: int, s0_index: int, roi_grid: tuple[int, int], box_tok, mode: str,
                     markers: bool = True) -> torch.Tensor:
    """Position ids (axes, S + block), float32, of the RoI sequence of one unpadded sample.

    Args:
        pos: the sample's original position ids (axes, S); `at`: where the RoI block is inserted
            (right after the global image); `s0_index`: index of the first global image token.
        roi_grid: the crop's merged grid (h_r, w_r); box_tok: (x1, y1, x2, y2) in global token units.
        mode: "aligned" (the crop in the global image's frame, one time step later; M-RoPE only)
            or "sequential" (an ordinary second image).
        markers: whether the block has `<vision_start>`/`<vision_end>` tokens.
    """
    axes = pos.shape[0]
    h_r, w_r = roi_grid
    pos = pos.to("cpu", torch.float32)  # small bookkeeping tensor; the pipeline moves it to the device
    p_e = pos[0, at - 1]  # the token before the block (the global <vision_end>, or the last image token)
    if mode not in ("aligned", "sequential"):
        raise QZoomError(f"position_mode must be 'aligned' or 'sequential', got {mode!r}")
    if axes == 1:
        if mode == "aligned":
            raise QZoomError("aligned positions are defined for M-RoPE backbones; use position_mode='sequential' "
                             "for a 1-D RoPE backbone (the crop continues the positions, as in SD-RPN)")
        n = h_r * w_r + 2 * markers
        block = p_e + 1 + torch.arange(n, dtype=torch.float32)[None]
        return torch.cat([pos[:, :at], block, pos[:, at:] + n], dim=1)
    if axes != 3 or not markers:
        raise QZoomError(f"RoI positions need 3-axis M-RoPE with vision markers or 1-D RoPE; got {axes} axes")
    n = h_r * w_r
    shift = max(h_r, w_r) + 2
    rows = torch.arange(h_r, dtype=torch.float32).repeat_interleave(w_r)
    cols = torch.arange(w_r, dtype=torch.float32).repeat(h_r)
    if mode == "sequential":
        h, w = p_e + 2 + rows, p_e + 2 + cols
    else:
        s0 = pos[0, s0_index]
        x1, y1, x2, y2 = box_tok
        hs = torch.linspace(float(s0 + y1), float(s0 + y2 - 1), h_r, dtype=torch.float32)
        ws = torch.linspace(float(s0 + x1), float(s0 + x2 - 1), w_r, dtype=torch.float32)
        h, w = hs[rows.long()], ws[cols.long()]
    t = torch.full((n,), float(p_e + 2))
    tokens = torch.stack([t, h, w])
    start = torch.full((3, 1), float(p_e + 1))
    end = torch.full((3, 1), float(p_e + shift))
    return torch.cat([pos[:, :at], start, tokens, end, pos[:, at:] + shift], dim=1)


def roi_sequence(spec, ids: torch.Tensor, pos: torch.Tensor, roi_grid: tuple[int, int], box_tok, mode: str,
                 image: tuple[int, int | None] | None = None):
    """One unpadded sample's RoI sequence: (input ids, float positions (axes, S'), index `at` of the RoI block).

    The block goes right after the crop's image (`spec.roi_insert_index` of the ids up to the next image), with the
    image's own start/end markers where the backbone has them; aligned positions use that image's frame.
    `image`: (index of its first token, index of the next image's first token or None); None: the first image
    token and no later image (one image per sample).
    """
    start, upto = image if image is not None else (int((ids == spec.image_token_id).nonzero()[0]), None)
    at = spec.roi_insert_index(ids if upto is None else ids[:upto])
    h_r, w_r = roi_grid
    new_ids = roi_input_ids(ids, at, h_r * w_r, spec.image_token_id, spec.vision_start_id, spec.vision_end_id)
    new_pos = roi_position_ids(pos, at, start, roi_grid, box_tok, mode, markers=spec.vision_start_id is not None)
    return new_ids, new_pos, at


@dataclass
class RoiSequence:
    """One zoomed sample's RoI sequence (unpadded) and where its pass-A prefix sits."""

    pad: int  # left padding in pass A
    P: int  # where the RoI block starts in the unpadded sequence: the cached prefix is [:P]
    ids: torch.Tensor  # (S',) input ids with the RoI block
    pos: torch.Tensor  # (axes, S') float positions
    grid: torch.Tensor  # the crop's image_grid_thw row


@dataclass
class RoiBatch:
    """The zoomed samples of a batch laid out for pass B, one row each:
    `[left pad | prefix (cached, at its pass-A columns) | middle pad | suffix]`. Every prefix ends by column `C`
    and every suffix ends at the last column, so the suffix block `[:, C:]` is shared and pass B runs on it alone.
    """

    seqs: list[RoiSequence]
    C: int
    ids: torch.Tensor  # (n, C + L)
    mask: torch.Tensor  # (n, C + L)
    pos: torch.Tensor  # (axes, n, C + L): float32 for aligned positions, the backbone's integers for sequential


def roi_batch(spec, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, rows: list[int], grids, box_toks,
              mode: str, images: list | None = None) -> RoiBatch:
    """Pass B's inputs for batch `rows` of pass A (`ids`, `mask` (B, S), `pos` (axes, B, S), left-padded), each
    with its crop's `grids[j]` (image_grid_thw row) and global-token box `box_toks[j]`.

    `images[j]`: where the crop's image is in pass A's row, as (column of its first token, column of the next
    image's first token or None), padded columns; None: one image per sample."""
    seqs = []
    for j, i in enumerate(rows):
        valid = mask[i].bool()
        pad, grid = int((~valid).sum()), grids[j]
        image = None
        if images is not None:
            start, upto = images[j]
            image = (start - pad, None if upto is None else upto - pad)
        new_ids, new_pos, at = roi_sequence(spec, ids[i][valid], pos[:, i][:, valid], spec.token_grid(grid),
                                            box_toks[j], mode, image)
        seqs.append(RoiSequence(pad=pad, P=at, grid=grid, ids=new_ids, pos=new_pos))
    C = max(q.pad + q.P for q in seqs)  # every cached prefix ends by column C
    L = max(q.ids.shape[0] - q.P for q in seqs)  # longest suffix [P:]
    n, dev = len(rows), ids.device
    out_ids = torch.zeros(n, C + L, dtype=ids.dtype, device=dev)
    out_mask = torch.zeros(n, C + L, dtype=mask.dtype, device=dev)
    out_pos = torch.zeros(pos.shape[0], n, C + L, dtype=torch.float32, device=dev)
    sel = torch.tensor(rows, device=dev)
    out_ids[:, :C] = ids[sel, :C]
    out_pos[:, :, :C] = pos[:, sel, :C].float()
    for j, q in enumerate(seqs):
        start = C + L - (q.ids.shape[0] - q.P)
        out_mask[j, q.pad : q.pad + q.P] = 1
        out_mask[j, start:] = 1
        out_ids[j, start:] = q.ids[q.P :]
        out_pos[:, j, start:] = q.pos[:, q.P :].to(dev)
    if mode == "sequential":
        out_pos = out_pos.round().long()  # integral in this mode; keep the backbone's own dtype
    return RoiBatch(seqs, C, out_ids, out_mask, out_pos)


def roi_place(spans: list[ImageSpan], target: int) -> tuple[int, int | None]:
    """Where the RoI image `target` of a sample is, as `roi_batch` takes it: (column of its first token, column of
    the next image's first token or None)."""
    return spans[target].start, spans[target + 1].start if target + 1 < len(spans) else None


def _feature_rows(spec, grids) -> tuple[list[int], list[int]]:
    """(first feature row, feature rows) of each image of `grids`: features are the images' tokens, image by image."""
    sizes = [h * w for h, w in map(spec.token_grid, grids.cpu())]
    return [sum(sizes[:k]) for k in range(len(sizes))], sizes


def suffix_features(spec, roi_feats: VisualFeatures, roi_grids, a, rows: list[int],
                    targets: list[int]) -> VisualFeatures:
    """Visual features of pass B's suffix in image-token order: per zoomed row (batch `rows` of pass A `a`) its
    crop's (the rows of `roi_feats`, crop after crop), then those of its images after the RoI image (from pass A)."""
    later = [[s.row for s in a.spans[i][targets[i] + 1 :]] for i in rows]
    if not any(later):
        return roi_feats  # every RoI image is its sample's last: the suffix holds only the crops
    (roi_at, roi_n), (at, n) = _feature_rows(spec, roi_grids), _feature_rows(spec, a.grid)
    dev = roi_feats.embeds.device
    parts = []
    for j, rows_after in enumerate(later):
        parts.append(roi_feats.take(torch.arange(roi_at[j], roi_at[j] + roi_n[j], device=dev)))
        for r in rows_after:
            parts.append(a.feats.take(torch.arange(at[r], at[r] + n[r], device=a.feats.embeds.device)))
    return VisualFeatures.cat(parts)
