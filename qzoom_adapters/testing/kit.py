"""`Kit`: a tiny random model of one family, its processor, synthetic images and shared helpers."""
from __future__ import annotations

import inspect
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..config import ZoomConfig
from ..gate import DynamicGate
from ..pipeline import QZoom
from ..spec import get_spec
from ..trunk import Trunk
from ..twig import TwigRPN

IMAGE_SIZES = ((300, 200), (220, 260), (180, 120))
QUESTIONS = ("What is written on the red plate?", "How many?", "Where is the red box?")


def synthetic_image(w: int, h: int, seed: int = 0) -> Image.Image:
    """Random noise with a red rectangle (something for a heatmap to find)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    arr[h // 3 : h // 2, w // 2 : 3 * w // 4] = (255, 0, 0)
    return Image.fromarray(arr)


def default_model_factory(spec_cls) -> Callable[[int], nn.Module]:
    def make(seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return spec_cls.model_class()._from_config(spec_cls.tiny_config()).eval()

    return make


def split_pixels(pixel_values: torch.Tensor, grids: torch.Tensor) -> list[torch.Tensor]:
    """`pixel_values` of several images split per image: one row per patch (`t*h*w` rows per grid row, Qwen-VL) or
    one row per image (fixed-size towers, LLaVA)."""
    patches = [int(g.prod()) for g in grids]
    if pixel_values.shape[0] == sum(patches):
        return list(pixel_values.split(patches))
    if pixel_values.shape[0] == len(patches):
        return list(pixel_values.split(1))
    raise NotApplicable(f"pixel_values of shape {tuple(pixel_values.shape)} hold neither one row per patch nor one "
                        f"per image of grids {grids.tolist()}: the kit cannot split them per image")


class NotApplicable(Exception):
    """Raised by a check that does not apply to the spec under test: its result is "not applicable", not a pass."""


@contextmanager
def raises(exc: type[BaseException], match: str):
    """Like `pytest.raises` (the kit must not need pytest): the block must raise `exc` matching `match`."""
    try:
        yield
    except exc as err:
        if not re.search(match, str(err)):
            raise AssertionError(f"{exc.__name__} raised, but {str(err)!r} does not match {match!r}") from err
        return
    raise AssertionError(f"expected {exc.__name__} matching {match!r}; nothing was raised")


@dataclass
class Kit:
    """Everything a conformance check needs for one backbone family.

    Args:
        spec_cls: the registered `BackboneSpec` class.
        make_model: seed -> a tiny randomly initialised HF model of that family (eval mode).
        make_processor: () -> an offline processor (tokenizer with chat template + image processor).
        K, T: branch point and depth used by the checks (K >= the spec's `min_branch_layer`).
    """

    spec_cls: type
    make_model: Callable[[int], nn.Module]
    make_processor: Callable[[], object]
    K: int = 3
    T: int = 3
    _cache: dict = field(default_factory=dict, repr=False)

    # --- shared objects (built once per kit) ---------------------------------------------
    def _once(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    @property
    def processor(self):
        return self._once("processor", self.make_processor)

    @property
    def image_processor(self):
        return self.processor.image_processor

    @property
    def model(self) -> nn.Module:
        return self._once("model", lambda: self.fresh_model(0))

    @property
    def images(self) -> list[Image.Image]:
        return self._once("images", lambda: [synthetic_image(w, h, i + 1) for i, (w, h) in enumerate(IMAGE_SIZES)])

    @property
    def questions(self) -> list[str]:
        return list(QUESTIONS)

    def fresh_model(self, seed: int) -> nn.Module:
        model = self.make_model(seed).eval()
        tok = self.processor.tokenizer
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        return model

    # --- helpers ----------------------------------------------------------------------------
    def inputs(self, images, questions) -> dict:
        return get_spec(self.model).chat_inputs(self.processor, list(images), list(questions))

    def zoom(self, model=None, **cfg) -> QZoom:
        model = model or self.model
        twig = TwigRPN.from_backbone(model, K=self.K, T=self.T)
        gate = DynamicGate.from_backbone(model, K=self.K, T=self.T)
        return QZoom(model, self.processor, twig=twig, gate=gate, config=ZoomConfig(**cfg))

    def position_modes(self) -> list[str]:
        return ["aligned", "sequential"] if self.spec_cls.rope_axes == 3 else ["sequential"]

    def model_forward_logits(self, input_ids, pixel_values, grids, position_ids) -> torch.Tensor:
        """Logits of the unmodified HF model's own forward (its vision path), with given positions.

        An explicit all-ones mask: without one, transformers may read position jumps as packed sequences.
        """
        kw = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixel_values,
                  position_ids=Trunk.model_positions(position_ids), use_cache=False)
        params = inspect.signature(self.model.forward).parameters
        if "image_grid_thw" in params:
            kw["image_grid_thw"] = grids
        if "mm_token_type_ids" in params:
            kw["mm_token_type_ids"] = (input_ids == get_spec(self.model).image_token_id).int()
        return self.model(**kw).logits

    def text_forward_inputs(self, model, input_ids, attention_mask, pixel_values, grids, position_ids):
        """Everything the text model needs for a from-scratch forward of `input_ids`."""
        embeds, pos, _, extra = Trunk(get_spec(model)).encode(input_ids, attention_mask, pixel_values, grids,
                                                              position_ids)
        return dict(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=Trunk.model_positions(pos),
                    **extra)
