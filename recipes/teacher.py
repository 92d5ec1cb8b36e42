"""The stage-1 teacher: greedy responses at the fixed grid and their attention at chosen layers (SPEC §4.1)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from qzoom_adapters.decode import eos_ids
from qzoom_adapters.errors import QZoomError
from qzoom_adapters.probe import average_map, probe_attention
from qzoom_adapters.trunk import Trunk

from .data import fixed_grid_view
from .models import batch_to, placeholder_ids


def response_rows(prompt_len: int, sequences: torch.Tensor, eos: set[int], pad_id: int):
    """Responses cut after their first EOS, and the decode-step query rows of the full sequence.

    A decode step's query is a generated token fed back in: responses[:, :-1] (the prefill row,
    which produced the first token, is not one).
    Returns (response ids (B, N) padded with `pad_id`, response mask (B, N), rows (B, R), row mask (B, R)).
    """
    gen = sequences[:, prompt_len:]
    B, N = gen.shape
    lengths = torch.tensor([next((i + 1 for i, t in enumerate(row) if t in eos), len(row)) for row in gen.tolist()])
    keep = torch.arange(N)[None] < lengths[:, None]
    resp = gen.masked_fill(~keep.to(gen.device), pad_id)
    R = max(1, int(lengths.max()) - 1)
    rows = prompt_len + torch.arange(R)[None].expand(B, R)
    row_mask = torch.arange(R)[None] < (lengths - 1)[:, None]
    return resp, keep.long(), rows, row_mask


@dataclass
class TeacherOutput:
    attn: dict  # {layer: (B, H, R, S)} attention of the decode-step rows
    row_mask: torch.Tensor  # (B, R) real decode-step rows
    image_mask: torch.Tensor  # (B, S) image-token keys
    responses: list[str]

    def map(self, b: int, pairs: dict, grid: int) -> torch.Tensor:
        """(grid, grid) mean attention of sample `b` over its decode steps and the (layer, head) `pairs`."""
        one = {layer: a[b : b + 1] for layer, a in self.attn.items()}
        dev = self.image_mask.device
        flat = average_map(one, pairs, self.row_mask[b : b + 1].to(dev), self.image_mask[b : b + 1])[0]
        return flat.reshape(grid, grid).cpu()


class Teacher:
    """The frozen backbone answering at a fixed `grid` x `grid` view (grey square padding)."""

    def __init__(self, model, processor, spec, grid: int, max_new_tokens: int):
        self.model, self.processor, self.spec = model, processor, spec
        self.grid, self.max_new_tokens = grid, max_new_tokens
        self.trunk = Trunk(spec)
        self.eos = eos_ids(model)
        if not self.eos:
            raise QZoomError("the model's generation_config has no eos_token_id; set one so responses can end")
        self.pad_id = processor.tokenizer.pad_token_id or 0

    def prepare(self, images: list[Image.Image], prompts: list[str]) -> dict:
        """Processor inputs of the fixed views (CPU work: runs in data-loader workers)."""
        views = [fixed_grid_view(self.spec, im, self.grid) for im in images]
        return self.spec.chat_inputs(self.processor, [v[0] for v in views], prompts, pixels=views[0][1])

    def run(self, images: list[Image.Image], prompts: list[str], layers: list[int]) -> TeacherOutput:
        return self.answer_and_probe(self.prepare(images, prompts), layers)

    @torch.no_grad()
    def answer_and_probe(self, inputs: dict, layers: list[int]) -> TeacherOutput:
        """Greedy responses, then the attention of their decode steps at `layers`."""
        spec, model = self.spec, self.model
        inputs = batch_to(inputs, model.device)
        grids = spec.image_grids(inputs)
        if grids.shape[0] != inputs["input_ids"].shape[0]:  # labels are maps over one image per sample
            raise QZoomError(f"the stage-1 teacher reads one image per sample; got {grids.shape[0]} images for "
                             f"{inputs['input_ids'].shape[0]} samples")
        if any(spec.token_grid(g) != (self.grid, self.grid) for g in grids):
            raise QZoomError(f"the fixed view gave grids {[spec.token_grid(g) for g in grids]}, not "
                             f"{self.grid}x{self.grid}; check the processor's patch/merge sizes")
        S = inputs["input_ids"].shape[1]
        # a response must not contain image placeholders: re-reading it would expect image features there
        seq = model.generate(**inputs, do_sample=False, max_new_tokens=self.max_new_tokens,
                             eos_token_id=sorted(self.eos), pad_token_id=self.pad_id,
                             suppress_tokens=placeholder_ids(spec))
        resp, resp_mask, rows, row_mask = response_rows(S, seq.cpu(), self.eos, self.pad_id)
        dev = model.device
        ids = torch.cat([inputs["input_ids"], resp.to(dev)], dim=1)
        mask = torch.cat([inputs["attention_mask"], resp_mask.to(dev)], dim=1)
        attn = probe_attention(self.trunk, ids, mask, inputs["pixel_values"], grids, rows.to(dev), layers)
        texts = [self.processor.tokenizer.decode(resp[b][resp_mask[b].bool()], skip_special_tokens=True)
                 for b in range(ids.shape[0])]
        return TeacherOutput(attn, row_mask, ids == spec.image_token_id, texts)
