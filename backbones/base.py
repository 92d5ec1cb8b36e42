"""`VisionLanguageSpec`: the parts of `BackboneSpec` that follow plain Hugging Face conventions.

A family file subclasses it and fills in what is really its own (how images become tokens,
positions, crops). Everything here reads the model through public HF attributes only.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from qzoom_adapters import compat
from qzoom_adapters.errors import QZoomError
from qzoom_adapters.spec import ImageSpan, VisualFeatures


def take_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` (B, R) of the sequence dim of `t` (..., B, S, D) -> (..., B, R, D)."""
    idx = rows[..., None].expand(*rows.shape, t.shape[-1])
    return torch.gather(t, -2, idx.expand(*t.shape[:-3], *idx.shape))


def image_runs(ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Number of contiguous image-token blocks per row of (B, S) `ids`."""
    is_img = (ids == image_token_id).int()
    starts = is_img[:, 1:] > is_img[:, :-1]
    return starts.sum(dim=1) + is_img[:, 0]


def _heads(x: torch.Tensor, attn, norm: str | None) -> torch.Tensor:
    """(B, S, n*D) projections -> (B, n, S, D), through the per-head norm `norm` where the attention has one."""
    B, S, _ = x.shape
    x = x.view(B, S, -1, attn.head_dim)
    if norm is not None and getattr(attn, norm, None) is not None:
        x = getattr(attn, norm)(x)
    return x.transpose(1, 2)


class VisionLanguageSpec(ABC):
    """Defaults for an HF `*ForConditionalGeneration` VLM with a Llama-style decoder.

    A family implements the abstract methods (image -> tokens, grid, positions, crops, and its HF class);
    instantiating a spec that misses one fails with a TypeError naming it.

    Structure: `model.model.language_model` is the text decoder (embed_tokens, layers, norm,
    rotary), `model.lm_head` the head. Layers take keyword arguments and attention exposes
    `q_proj`/`k_proj` (+ optional per-head `q_norm`/`k_norm`) and `head_dim`.
    """

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    rope_axes: ClassVar[int] = 3
    default_position_mode: ClassVar[str] = "aligned"
    default_K: ClassVar[dict[str, int]] = {}
    multi_image: ClassVar[bool] = True  # False: one image per sample (`validate_inputs` refuses more)

    def __init__(self, model: nn.Module):
        self.model = model
        self.core = model.model
        self.config = model.config
        self.text_config = getattr(model.config, "text_config", model.config)

    @staticmethod
    @abstractmethod
    def model_class() -> type:
        """The HF `*ForConditionalGeneration` class; the loaders and the conformance kit build models with it."""

    # --- structure -------------------------------------------------------------------
    @property
    def text_model(self):
        return self.core.language_model

    @property
    def layers(self):
        return self.text_model.layers

    @property
    def norm(self):
        return self.text_model.norm

    @property
    def lm_head(self):
        return self.model.lm_head

    @property
    def embed_tokens(self):
        return self.text_model.embed_tokens

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    @property
    def video_token_id(self) -> int | None:
        return getattr(self.config, "video_token_id", None)

    @property
    def vision_start_id(self) -> int | None:
        return getattr(self.config, "vision_start_token_id", None)

    @property
    def vision_end_id(self) -> int | None:
        return getattr(self.config, "vision_end_token_id", None)

    @property
    def min_branch_layer(self) -> int:
        """Smallest K at which a branch sees the finished image tokens (deepstack backbones: > 0)."""
        return 1

    # --- inputs ----------------------------------------------------------------------
    def image_grids(self, inputs: dict) -> torch.Tensor:
        """(B, 3) per-image grid rows the other methods understand; default: `image_grid_thw`."""
        grid = inputs.get("image_grid_thw")
        if grid is None:
            raise QZoomError("inputs need `image_grid_thw` (the processor's output)")
        return grid

    @abstractmethod
    def encode_images(self, pixel_values: torch.Tensor, grids: torch.Tensor) -> VisualFeatures:
        """Vision-tower features of all images, one row per image token, in order."""

    @abstractmethod
    def token_grid(self, grid_row) -> tuple[int, int]:
        """(h_t, w_t) merged token grid of one image, raster order."""

    @abstractmethod
    def position_ids(self, input_ids, attention_mask, grids) -> torch.Tensor:
        """(rope_axes, B, S) positions of left-padded inputs, as the model's own generate uses them."""

    def validate_inputs(self, inputs: dict) -> None:
        """Still images, at least one per sample (one where `multi_image` is False), each with as many image tokens
        as its grid says."""
        ids = inputs["input_ids"]
        if ids.dim() != 2 or ids.shape[0] == 0:
            raise QZoomError(f"input_ids must be a non-empty (batch, seq) tensor, got shape {tuple(ids.shape)}")
        video = self.video_token_id
        if inputs.get("pixel_values_videos") is not None:
            raise QZoomError("video input is not supported by Q-Zoom; pass still images")
        if video is not None and (ids == video).any():
            raise QZoomError(f"input_ids hold this model's video token (id {video}) but no video was given: the "
                             "inputs were probably made by another model's processor; use this model's processor")
        if inputs.get("pixel_values") is None:
            raise QZoomError("inputs need `pixel_values` (the processor's output)")
        runs = image_runs(ids, self.image_token_id)
        if (runs == 0).any():
            empty = (runs == 0).nonzero()[:, 0].tolist()
            raise QZoomError(f"every sample needs an image, but sample(s) {empty} have no image tokens")
        if not self.multi_image and (runs > 1).any():
            raise QZoomError(f"the {self.family} spec takes one image per sample (images per sample: {runs.tolist()})")
        grid = self.image_grids(inputs)
        if grid.dim() != 2 or grid.shape[1] != 3:
            raise QZoomError(f"image grids must be (images, 3) rows of (t, h, w), got shape {tuple(grid.shape)}")
        if (grid[:, 0] != 1).any():
            raise QZoomError(f"image grid t values {grid[:, 0].tolist()}: a still image has t=1 (t > 1 is a video "
                             "clip); pass still images")
        self.image_spans(ids, grid)

    def image_spans(self, input_ids: torch.Tensor, grids: torch.Tensor) -> list[list[ImageSpan]]:
        """Per sample, its images in order: grid rows are taken in order, each image being the next `h_t * w_t`
        image tokens of its sample, which must be one contiguous run."""
        sizes = [h * w for h, w in map(self.token_grid, grids.cpu())]
        is_image = (input_ids == self.image_token_id).cpu()  # one copy to the host, not one per sample
        per_sample = is_image.sum(dim=1).tolist()
        mismatch = QZoomError(f"image tokens per sample {per_sample} do not match the image grids ({sizes} tokens "
                              f"for {len(sizes)} images)")
        cols = [row.nonzero()[:, 0].tolist() for row in is_image]
        spans, row = [], 0
        for sample in cols:
            mine, used = [], 0
            while used < len(sample):
                if row >= len(sizes):
                    raise mismatch
                n = sizes[row]
                run = sample[used : used + n]
                if len(run) < n or run[-1] - run[0] != n - 1:
                    raise mismatch
                mine.append(ImageSpan(row, run[0], run[-1] + 1))
                used, row = used + n, row + 1
            spans.append(mine)
        if row != len(sizes):
            raise mismatch
        return spans

    def roi_insert_index(self, ids: torch.Tensor) -> int:
        """Where the RoI block goes in one unpadded sample: right after its last image (SPEC §3.1)."""
        end = self.vision_end_id
        if end is not None:
            return int((ids == end).nonzero()[-1]) + 1
        return int((ids == self.image_token_id).nonzero()[-1]) + 1

    def decoder_inputs(self, image_mask: torch.Tensor, features: VisualFeatures) -> dict:
        """Extra text-model forward kwargs carrying visual features beyond the input embeddings."""
        return {}

    def source_window(self, image_processor, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
        """The source-pixel region (x0, y0, x1, y1) the token grid spans; default the whole image."""
        W, H = image_size
        return 0.0, 0.0, float(W), float(H)

    def budget_pixels(self, tokens: int) -> int | None:
        """Pixel budget (min = max) that gives `tokens` merged visual tokens; None: the processor's fixed size."""
        raise QZoomError(f"the {self.family} spec does not define visual-token budgets (budget_pixels)")

    def view_kwargs(self, pixels: int | None) -> dict:
        """Processor keywords that encode images at exactly `pixels` (None: the processor's own setting)."""
        if pixels is not None:
            raise QZoomError(f"the {self.family} spec cannot set a pixel budget")
        return {}

    def chat_inputs(self, processor, images: list, questions: list[str], pixels: int | None = None) -> dict:
        """Processor inputs, left-padded, for one user turn per sample (an entry of `images` may be a list).

        `pixels`: encode every image at this pixel budget (min = max; see `budget_pixels`).
        """
        texts, flat = [], []
        for image, q in zip(images, questions):
            group = list(image) if isinstance(image, (list, tuple)) else [image]
            content = [{"type": "image"} for _ in group] + [{"type": "text", "text": q}]
            texts.append(processor.apply_chat_template([{"role": "user", "content": content}],
                                                       add_generation_prompt=True, tokenize=False))
            flat += group
        return dict(processor(text=texts, images=flat, padding=True, padding_side="left", return_tensors="pt",
                              **self.view_kwargs(pixels)))

    # --- layers ----------------------------------------------------------------------
    def call_layer(self, layer, hidden, kwargs) -> torch.Tensor:
        return compat.layer_output(layer(hidden_states=hidden, **kwargs))

    def rotary_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        """(cos, sin) the text model hands its layers for `position_ids` in the text model's own shape."""
        return self.text_model.rotary_emb(hidden, position_ids)

    def query_key(self, layer, hidden, kwargs, rows: torch.Tensor):
        """Post-RoPE queries at `rows` (B, R) -> (B, H, R, D), and keys of all positions (B, KV, S, D)."""
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        cos, sin = kwargs["position_embeddings"]
        q = _heads(attn.q_proj(take_rows(x, rows)), attn, "q_norm")
        q, _ = compat.apply_rope(q, q, take_rows(cos, rows), take_rows(sin, rows), attn)
        return q, self._keys(attn, x, cos, sin)

    def key_value(self, layer, hidden, kwargs):
        """Post-RoPE keys and the values of all positions, (B, KV, S, D) each, as the layer caches them."""
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        return self._keys(attn, x, *kwargs["position_embeddings"]), _heads(attn.v_proj(x), attn, None)

    @staticmethod
    def _keys(attn, x, cos, sin) -> torch.Tensor:
        k = _heads(attn.k_proj(x), attn, "k_norm")
        k, _ = compat.apply_rope(k, k, cos, sin, attn)
        return k

    def sink_mask(self, h_t: int, w_t: int, **ctx) -> torch.Tensor:
        """Cells to keep (1) in the heatmap; default: all."""
        return torch.ones(h_t, w_t)

    # --- crops -------------------------------------------------------------------------
    @abstractmethod
    def process_crops(self, image_processor, crops: list, min_pixels: int | None, max_pixels: int | None) -> dict:
        """`pixel_values` and `image_grid_thw` of PIL crops (None budgets: the family's default)."""
