"""Running the backbone's own text model in pieces: up to layer K, from layer K, one decode step.

Masks and rotary embeddings always come from the backbone's own forward (captured at a
layer's input), so every attention implementation and transformers version is handled
by the model itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qzoom_adapters import compat as _compat
from .errors import QZoomError
from .hooks import run_until
from .spec import ImageSpan, VisualFeatures
from .timing import stage


def inputs_on(inputs, device) -> dict:
    """The processor's `inputs` with every tensor on `device` (a new dict; the caller's is left as it is)."""
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


@dataclass
class Prefill:
    """Pass A of a left-padded batch: its inputs, the input of layer K (`hK`), that layer's kwargs, the cache, and
    where each sample's images are (`spans`: per sample, its images in order)."""

    ids: torch.Tensor
    mask: torch.Tensor
    pos: torch.Tensor
    embeds: torch.Tensor
    hK: torch.Tensor
    kwargs: dict
    cache: object
    grid: torch.Tensor
    feats: VisualFeatures
    spans: list[list[ImageSpan]]

    def rows_kwargs(self, trunk, sel: torch.Tensor) -> dict:
        """Layer kwargs (mask, rotary) for a subset of the batch."""
        if sel.numel() == self.ids.shape[0]:
            return self.kwargs
        return trunk.layer_kwargs(self.embeds[sel], self.mask[sel], self.pos[:, sel])

    def rows_cache(self, sel: torch.Tensor, n_layers: int, upto: int | None = None):
        """A new cache holding rows `sel` (first `upto` columns) of layers `0..n_layers-1`."""
        kvs = [_compat.cache_kv(self.cache, layer) for layer in range(n_layers)]
        return _compat.cache_from_kv([tuple(t[sel, :, :upto] for t in kv) for kv in kvs])

    def image_logits(self, scores: torch.Tensor, spec, rows=None, on_host: bool = False,
                     targets: list[int] | None = None) -> list[torch.Tensor]:
        """Per-sample (h_t, w_t) maps over one image's tokens from (R, S) per-token scores of batch rows `rows`
        (default: all).

        `targets`: per row of `rows`, the index of the image among its sample's images (None: samples must have one
        image; a step that reads one image per sample refuses several rather than guess). `on_host`: the maps on
        the host, from one copy of the scores (not one per sample).
        """
        rows = list(range(self.ids.shape[0]) if rows is None else rows)
        if targets is None:
            several = [i for i in rows if len(self.spans[i]) != 1]
            if several:
                raise QZoomError(f"this step reads one image per sample, but sample(s) {several} have "
                                 f"{[len(self.spans[i]) for i in several]} images")
            targets = [0] * len(rows)
        grid = self.grid
        if on_host:
            scores, grid = scores.cpu(), grid.cpu()
        maps = []
        for j, (i, t) in enumerate(zip(rows, targets)):
            span = self.spans[i][t]
            maps.append(scores[j][span.start : span.end].reshape(spec.token_grid(grid[span.row])))
        return maps


class Trunk:
    """Piecewise execution of a backbone's decoder through its `BackboneSpec`."""

    def __init__(self, spec):
        self.spec = spec

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the image placeholder rows replaced by `image_embeds` (N, D)."""
        embeds = self.spec.embed_tokens(input_ids)
        if image_embeds is not None:
            mask = (input_ids == self.spec.image_token_id).unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(mask, image_embeds.to(embeds.dtype))
        return embeds

    @staticmethod
    def model_positions(position_ids: torch.Tensor) -> torch.Tensor:
        """Our (axes, B, S) positions in the shape the text model takes ((B, S) for 1-D RoPE)."""
        return position_ids[0] if position_ids.shape[0] == 1 else position_ids

    def prefill(self, inputs: dict, stop: int, cache=None) -> Prefill:
        """Validate processed, left-padded `inputs`, encode the images and run layers `0..stop-1`."""
        spec = self.spec
        spec.validate_inputs(inputs)
        pixel_values = inputs["pixel_values"]
        if pixel_values.is_floating_point() and not bool(torch.isfinite(pixel_values).all()):
            raise QZoomError("pixel_values hold NaN or inf values; re-run the processor on the images "
                             "(an upstream normalisation or dtype overflow?)")
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        if not bool(mask[:, -1].all()):
            raise QZoomError("inputs are right-padded; tokenize with padding_side='left'")
        grid = spec.image_grids(inputs)
        spans = spec.image_spans(ids, grid)
        with stage("vision"):
            embeds, pos, feats, extra = self.encode(ids, mask, inputs["pixel_values"], grid)
        with stage("pass_a"):
            hK, kwargs = self.forward_to(stop, embeds, mask, pos, cache, extra)
        return Prefill(ids, mask, pos, embeds, hK, kwargs, cache, grid, feats, spans)

    def encode(self, ids, mask, pixel_values, grids, pos=None):
        """(input embeddings, positions (axes, B, S), visual features, extra text-model kwargs) of a sequence.

        `pos` None: the backbone's own positions for `ids` (any mix of left and right padding).
        """
        spec = self.spec
        feats = spec.encode_images(pixel_values, grids)
        embeds = self.embed(ids, feats.embeds)
        pos = spec.position_ids(ids, mask, grids) if pos is None else pos
        return embeds, pos, feats, spec.decoder_inputs(ids == spec.image_token_id, feats)

    def forward_to(self, stop: int, embeds, attention_mask, position_ids, cache, extra: dict | None = None):
        """Run layers `0..stop-1` (filling `cache`); return (input of layer `stop`, its kwargs).

        `extra`: further text-model kwargs from `spec.decoder_inputs` (e.g. deepstack features).
        """
        cap = run_until(
            self.spec.text_model,
            self.spec.layers[stop],
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=self.model_positions(position_ids),
            use_cache=cache is not None,
            **_compat.text_model_kwargs(self.spec.text_model, cache),
            **(extra or {}),
        )
        if cache is not None and stop > 0 and _compat.cache_num_layers(cache) < stop:
            raise RuntimeError(
                f"{type(self.spec.text_model).__name__} did not fill the KV cache it was given; this "
                "transformers version passes the cache differently (see qzoom_adapters/compat.py)"
            )
        return cap.hidden, cap.kwargs

    def layer_kwargs(self, embeds, attention_mask, position_ids) -> dict:
        """Layer kwargs (mask, rotary) for the whole sequence with no past, from the model itself."""
        return self.forward_to(0, embeds, attention_mask, position_ids, _compat.new_cache())[1]

    def run_layers(self, layers, hidden, kwargs, cache=None) -> torch.Tensor:
        kw = _compat.with_cache(kwargs, cache) if cache is not None else _compat.strip_cache(kwargs)
        for layer in layers:
            hidden = self.spec.call_layer(layer, hidden, kw)
        return hidden

    def logits(self, hidden_last: torch.Tensor) -> torch.Tensor:
        """Next-token logits from the last decoder layer's output rows (B, D) or (B, S, D)."""
        return self.spec.lm_head(self.spec.norm(hidden_last)).float()

    def step(self, token_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        """One decode step over all layers: (B,) tokens -> (B, V) logits."""
        out = self.spec.text_model(
            inputs_embeds=self.spec.embed_tokens(token_ids[:, None]),
            attention_mask=attention_mask,
            position_ids=self.model_positions(position_ids),
            use_cache=True,
            **_compat.text_model_kwargs(self.spec.text_model, cache),
        )
        return self.spec.lm_head(out.last_hidden_state[:, -1]).float()
