"""Every transformers-version difference the project depends on, in one place (the compat layer).

A public, leaf module of the core: it imports only torch and transformers, and the core,
the backbone specs, the recipes and the benchmarks all call it instead of testing versions
themselves. A new difference between transformers lines gets a function here, never an
`if version` elsewhere.

The 4.57 line and the 5.x line differ in: the cache keyword of decoder layers
(`past_key_values` vs `cache`), decoder layers returning a tuple vs a tensor, the
shape of M-RoPE cos/sin handed to layers (3 axes vs already merged), the
signature of `get_rope_index` (5.x needs `mm_token_type_ids`), the return type of
`get_image_features`, the image processor's budget keywords, the PIL image processor and
tokenizer class names, how rope settings are saved in configs, and the layer kwargs a decode
step needs.
"""
from __future__ import annotations

import importlib
import inspect
import sys

import torch
import transformers
from transformers.cache_utils import DynamicCache

__all__ = [
    "IS_V5", "TRANSFORMERS_MAJOR", "apply_rope", "attn_implementation", "budget_kwargs", "cache_from_kv", "cache_keyword",
    "cache_kv", "cache_num_layers", "char_tokenizer_class", "decode_layer_kwargs", "image_features", "layer_output",
    "load_config", "mm_token_type_ids", "modeling_module", "mrope_text_kwargs", "new_cache", "pil_image_processor",
    "query_rows_kwargs", "ROPE_KEYS", "rope_index", "strip_cache", "text_model_kwargs", "unsupported_decode_kwargs", "with_cache",
]

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
IS_V5 = TRANSFORMERS_MAJOR >= 5


def cache_keyword(module: torch.nn.Module) -> str:
    """Keyword under which `module.forward` takes the KV cache.

    Read from the signature, not the version: 5.x renamed `past_key_values` to `cache` mid-line
    (5.17 still has `past_key_values`; 5.24 has `cache`).
    """
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _kwargs_cache_key(kwargs: dict) -> str:
    return "cache" if "cache" in kwargs else "past_key_values"


def new_cache() -> DynamicCache:
    """An empty, lazily growing dynamic cache (no per-layer types)."""
    return DynamicCache()


def cache_kv(cache: DynamicCache, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    layer = cache.layers[layer_idx]
    return layer.keys, layer.values


def cache_num_layers(cache: DynamicCache) -> int:
    return sum(1 for layer in cache.layers if getattr(layer, "keys", None) is not None and layer.keys.numel())


def cache_from_kv(kvs: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A cache whose first len(kvs) layers hold the given (keys, values)."""
    cache = new_cache()
    for i, (k, v) in enumerate(kvs):
        cache.update(k, v, i)
    return cache


def layer_output(out) -> torch.Tensor:
    """Decoder layers return a tuple on 4.57 and a tensor on 5.x."""
    return out[0] if isinstance(out, (tuple, list)) else out


def text_model_kwargs(text_model: torch.nn.Module, cache) -> dict:
    return {cache_keyword(text_model): cache}


def strip_cache(kwargs: dict) -> dict:
    """Captured layer kwargs for running without a cache."""
    out = dict(kwargs)
    out[_kwargs_cache_key(kwargs)] = None
    out["use_cache"] = False
    out.pop("cache_position", None)
    return out


def with_cache(kwargs: dict, cache) -> dict:
    out = dict(kwargs)
    out[_kwargs_cache_key(kwargs)] = cache
    out["use_cache"] = True
    return out


def modeling_module(module: torch.nn.Module):
    """The transformers modeling module that defines `module`'s class."""
    return sys.modules.get(type(module).__module__) or importlib.import_module(type(module).__module__)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: torch.nn.Module):
    """Apply the backbone's own rotary function to (B, H, S, D) q and k.

    On 4.57 M-RoPE cos/sin arrive per axis (3, B, S, D) and the attention merges
    them with `mrope_section`; on 5.x the rotary module already merged them.
    """
    mod = modeling_module(attn)
    if cos.dim() == 4:
        section = attn.rope_scaling["mrope_section"]
        return mod.apply_multimodal_rotary_pos_emb(q, k, cos, sin, section)
    return mod.apply_rotary_pos_emb(q, k, cos, sin)


def rope_index(model_core, input_ids, image_grid_thw, attention_mask, image_token_id, video_token_id):
    """`get_rope_index` of a Qwen-VL model core, called the way this version wants."""
    if IS_V5:
        mm = mm_token_type_ids(input_ids, image_token_id, video_token_id)
        return model_core.get_rope_index(
            input_ids, mm_token_type_ids=mm, image_grid_thw=image_grid_thw, attention_mask=attention_mask
        )
    return model_core.get_rope_index(input_ids, image_grid_thw, None, attention_mask=attention_mask)


def image_features(model_core, pixel_values, grid_thw=None):
    """(per-image embeddings, per-layer deepstack features or ()) from `get_image_features`.

    4.57 returns a list, or for Qwen3-VL a tuple (embeddings, deepstack concatenated over
    images); 5.x returns an output object with `pooler_output` and `deepstack_features`
    (split per image).
    """
    args = (pixel_values,) if grid_thw is None else (pixel_values, grid_thw)
    out = model_core.get_image_features(*args)
    if hasattr(out, "pooler_output"):
        deep = getattr(out, "deepstack_features", None) or ()
        return list(out.pooler_output), tuple(torch.cat(list(d)) if isinstance(d, (list, tuple)) else d for d in deep)
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], list):
        return list(out[0]), tuple(out[1])
    return list(out), ()


def budget_kwargs(min_pixels: int, max_pixels: int) -> dict:
    """Pixel-budget keywords for a Qwen-VL image processor call (5.x deprecates min/max_pixels)."""
    if IS_V5:
        return {"size": {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}}
    return {"min_pixels": int(min_pixels), "max_pixels": int(max_pixels)}


def mm_token_type_ids(input_ids, image_token_id, video_token_id):
    """`mm_token_type_ids` for 5.x processor outputs; None where the version has no such input."""
    if not IS_V5:
        return None
    mm = torch.zeros_like(input_ids, dtype=torch.int)
    mm[input_ids == image_token_id] = 1
    mm[input_ids == video_token_id] = 2
    return mm


def pil_image_processor(name: str, **kwargs):
    """The image processor class `name` (e.g. "CLIPImageProcessor") in its PIL form, which needs no
    torchvision: 5.x names it `<name>Pil`, 4.57's plain class is the PIL one."""
    cls = getattr(transformers, name + "Pil", None) or getattr(transformers, name)
    return cls(**kwargs)


def char_tokenizer_class():
    """Tokenizer class for a local character-level `tokenizers` object that a Qwen-VL processor accepts.

    4.57 type-checks for Qwen2Tokenizer(Fast), and the fast one reloads tokenizer.json verbatim; on 5.x
    Qwen2Tokenizer would rebuild a byte-level BPE on reload, and only the generic base is checked.
    """
    return transformers.PreTrainedTokenizerFast if IS_V5 else transformers.Qwen2TokenizerFast


def load_config(path):
    """AutoConfig of a saved model folder, readable by this transformers line whichever line saved it.

    5.x saves rope settings only as `rope_parameters`; 4.57 reads `rope_scaling` and would build an
    M-RoPE model without its `mrope_section`. Here 4.57 gets them back from `rope_parameters`.
    """
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    if IS_V5:
        return cfg
    for sub in (cfg, getattr(cfg, "text_config", None)):
        params = getattr(sub, "rope_parameters", None) if sub is not None else None
        if isinstance(params, dict) and getattr(sub, "rope_scaling", None) is None:
            sub.rope_scaling = {k: v for k, v in params.items() if k != "rope_theta"}
            if "rope_theta" in params:
                sub.rope_theta = params["rope_theta"]
    return cfg


ROPE_KEYS = ("rope_parameters", "rope_scaling", "rope_theta")  # text-config fields that hold rope settings


def mrope_text_kwargs(mrope_section, rope_theta: float, **extra) -> dict:
    """Text-config keywords of a default-type M-RoPE, in the form this line builds configs from.

    5.x takes one `rope_parameters` dict (theta inside; its Qwen-VL text configs accept `mrope_section`);
    4.57 takes `rope_scaling` and `rope_theta`. Keep these keys in the text config only: a composite
    config given them as top-level keywords warns on 5.x (and validates them without the M-RoPE keys).
    """
    params = {"rope_type": "default", "mrope_section": list(mrope_section), **extra}
    if IS_V5:
        return {"rope_parameters": {**params, "rope_theta": float(rope_theta)}}
    return {"rope_scaling": params, "rope_theta": float(rope_theta)}


def attn_implementation(module: torch.nn.Module) -> str | None:
    """The attention implementation a model (or its text model) was built with."""
    config = getattr(module, "config", None)
    return getattr(config, "_attn_implementation", None)


_CACHE_KEYS = ("past_key_values", "cache", "past_key_value")


def unsupported_decode_kwargs(template: dict) -> list[str]:
    """Tensor-valued layer kwargs that `decode_layer_kwargs` cannot rebuild for a static decode step."""
    known = {"attention_mask", "position_embeddings", "cache_position", "position_ids", *_CACHE_KEYS}
    return sorted(k for k, v in template.items() if k not in known
                  and (isinstance(v, torch.Tensor) or (isinstance(v, (tuple, list)) and any(isinstance(t, torch.Tensor) for t in v))))


def decode_layer_kwargs(template: dict, cache, mask, position_embeddings, position_ids, cache_position) -> dict:
    """Layer kwargs of one decode step, in the form a prefill's captured `template` shows for this version.

    `position_ids` (axes, B, 1): layers that receive text positions get axis 0.
    """
    out = {}
    for key, value in template.items():
        if key == "attention_mask":
            out[key] = mask
        elif key == "position_embeddings":
            out[key] = position_embeddings
        elif key in _CACHE_KEYS:
            out[key] = cache
        elif key == "cache_position":
            out[key] = cache_position
        elif key == "position_ids":
            out[key] = None if value is None else position_ids[0].to(value.dtype)
        elif key == "use_cache":
            out[key] = True
        else:
            out[key] = value
    return out


def query_rows_kwargs(kwargs: dict, rows: slice) -> dict:
    """Full-sequence layer kwargs restricted to query rows `rows` (keys keep every column).

    A 4-D mask keeps its key columns up to the last selected row; rotary tables, positions and cache
    positions are sliced along the sequence. A 2-D padding mask (flash attention) or None stays as is.
    """
    out = dict(kwargs)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        S = mask.shape[-2]
        stop = rows.indices(S)[1]
        out["attention_mask"] = mask[:, :, rows, :stop]
    if kwargs.get("position_embeddings") is not None:
        out["position_embeddings"] = tuple(t[..., rows, :] for t in kwargs["position_embeddings"])
    if isinstance(kwargs.get("position_ids"), torch.Tensor):
        out["position_ids"] = kwargs["position_ids"][..., rows]
    if isinstance(kwargs.get("cache_position"), torch.Tensor):
        out["cache_position"] = kwargs["cache_position"][rows]
    return out
