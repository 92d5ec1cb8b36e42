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
tokenizer class names, how rope settings are saved in configs, the layer kwargs a decode
step needs, which attention name makes a Qwen-VL vision tower take its packed (`cu_seqlens`) branch and how it
is selected, and how the torchvision-backed image processor of a family is named.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import threading
from contextlib import contextmanager

import torch
import transformers
from transformers.cache_utils import DynamicCache

__all__ = [
    "IS_V5", "TRANSFORMERS_MAJOR", "apply_rope", "attn_implementation", "budget_kwargs", "cache_from_kv", "cache_keyword",
    "cache_kv", "cache_num_layers", "char_tokenizer_class", "decode_layer_kwargs", "image_features", "layer_output",
    "load_config", "mm_token_type_ids", "modeling_module", "mrope_text_kwargs", "new_cache", "pil_image_processor",
    "query_rows_kwargs", "ROPE_KEYS", "rope_index", "strip_cache", "text_model_kwargs", "unsupported_decode_kwargs", "with_cache",
    "VISION_ATTENTION_NAME", "attn_settings", "fast_image_processor", "fast_image_processor_class_name",
    "torchvision_backed", "vision_attention", "vision_attention_route",
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


# --- the vision tower's attention (Qwen-VL towers that take `cu_seqlens`) ------------------------------------------
# A Qwen-VL vision attention makes ONE attention call per layer over the packed images (with `cu_seq_lens_q/k`) only
# when its config names a flash implementation; for any other name it splits the sequence per window in a Python loop
# and calls the function once per window. How a line decides "flash":
# * 5.x (`is_flash_attention_requested` exists): any name containing "flash". A function registered under such a name
#   through `AttentionInterface.register` and written to the vision config's setting takes the packed branch; the
#   setting is restored on exit. (`set_attn_implementation` accepted such a name up to 5.24; 5.25 preloads every
#   "flash" name as a hub kernel and refuses it, so the setting is written the way that call writes sub-configs.)
# * 4.57: only the exact name "flash_attention_2", which `set_attn_implementation` refuses without the flash_attn
#   package. Nothing public selects the packed branch for another function there, so the equivalent used is: while a
#   selection is active, "flash_attention_2" is registered (public `AttentionInterface.register`) to a dispatcher
#   that sends the selected vision configs' modules to the function and every other module to the previous entry
#   unchanged, and the vision config's implementation is set to "flash_attention_2" (as `set_attn_implementation`
#   itself writes sub-configs). Both are restored when the last selection ends.

VISION_ATTENTION_NAME = "qzoom_vision_varlen_flash"  # contains "flash" and no hub-kernel or `flash_attention_N` form
_NAMED_FLASH_BRANCH = hasattr(importlib.import_module("transformers.utils.generic"), "is_flash_attention_requested")
_FA2 = "flash_attention_2"
_ROUTE_LOCK = threading.RLock()
_ROUTES: dict[int, list] = {}  # id(vision config) -> [function, nesting depth] while a 4.57-style selection is active
_SAVED_FA2: list = []  # the "flash_attention_2" entry replaced by the dispatcher (one element while routes exist)


def vision_attention_route() -> str:
    """How `vision_attention` selects the packed branch on this line: "registered_name" (5.x) or
    "flash_attention_2_dispatch" (4.57)."""
    return "registered_name" if _NAMED_FLASH_BRANCH else "flash_attention_2_dispatch"


def _config_tree(config) -> list:
    out, todo = [], [config]
    while todo:
        cfg = todo.pop(0)
        out.append(cfg)
        todo += [sub for key in getattr(cfg, "sub_configs", {}) if (sub := getattr(cfg, key, None)) is not None]
    return out


def attn_settings(model: torch.nn.Module) -> list[tuple[object, object]]:
    """(config, its own attention implementation setting) for the model's config and every sub-config."""
    return [(cfg, cfg.__dict__.get("_attn_implementation_internal")) for cfg in _config_tree(model.config)]


def _restore_attn_settings(settings) -> None:
    for cfg, value in settings:
        if cfg.__dict__.get("_attn_implementation_internal") != value:
            cfg._attn_implementation_internal = value  # the field both lines store the setting in


def _dispatch_fa2(module, *args, **kwargs):
    route = _ROUTES.get(id(getattr(module, "config", None)))
    fn = route[0] if route is not None else _SAVED_FA2[0]
    return fn(module, *args, **kwargs)


def _route_fa2(sub_config, fn) -> None:
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    with _ROUTE_LOCK:
        if not _ROUTES:
            previous = AttentionInterface().get(_FA2)  # a fresh interface reads the library-wide entry
            if previous is None:
                raise RuntimeError(f"this transformers has no {_FA2!r} attention entry to route the vision tower through")
            _SAVED_FA2[:] = [previous]
            AttentionInterface.register(_FA2, _dispatch_fa2)
        route = _ROUTES.setdefault(id(sub_config), [fn, 0])
        route[0], route[1] = fn, route[1] + 1
        if ALL_ATTENTION_FUNCTIONS[_FA2] is not _dispatch_fa2:
            _unroute_fa2(sub_config)
            raise RuntimeError(f"ALL_ATTENTION_FUNCTIONS holds a local {_FA2!r} override; the vision tower's packed "
                               "attention cannot be routed past it")
    sub_config._attn_implementation_internal = _FA2


def _unroute_fa2(sub_config) -> None:
    from transformers import AttentionInterface

    with _ROUTE_LOCK:
        route = _ROUTES.get(id(sub_config))
        if route is not None:
            route[1] -= 1
            if route[1] <= 0:
                del _ROUTES[id(sub_config)]
        if not _ROUTES and _SAVED_FA2:
            AttentionInterface.register(_FA2, _SAVED_FA2.pop())


@contextmanager
def vision_attention(model: torch.nn.Module, config_key: str, fn):
    """Inside the block, the vision tower configured by `model.config.<config_key>` runs its attention through `fn`
    on its packed (`cu_seqlens`) branch: one call per layer. On exit every config's attention setting is exactly what
    it was (and, on 4.57, the "flash_attention_2" entry too), also when the block raises.

    `fn` has the `AttentionInterface` signature `(module, query, key, value, attention_mask, **kwargs)`.
    """
    sub = getattr(model.config, config_key, None)
    if sub is None:
        raise ValueError(f"{type(model).__name__}.config has no {config_key!r} sub-config")
    before = attn_settings(model)
    try:
        if _NAMED_FLASH_BRANCH:
            from transformers import AttentionInterface

            if AttentionInterface().get(VISION_ATTENTION_NAME) is not fn:
                AttentionInterface.register(VISION_ATTENTION_NAME, fn)
            # written as `set_attn_implementation` writes sub-configs; the public call itself cannot be used from 5.25
            # on, where it preloads any "flash" name as a hub kernel and fails for a registered function
            sub._attn_implementation_internal = VISION_ATTENTION_NAME
        else:
            _route_fa2(sub, fn)
        yield
    finally:
        try:
            if not _NAMED_FLASH_BRANCH:
                _unroute_fa2(sub)
        finally:
            _restore_attn_settings(before)  # exact, whatever the public call normalised


# --- image processors: the torchvision-backed form of a family's processor -------------------------------------------
def torchvision_backed(image_processor) -> bool:
    """Whether an image processor resizes and normalises torch tensors (5.x: backend "torchvision"; 4.57: `is_fast`)."""
    return getattr(image_processor, "backend", None) == "torchvision" or getattr(image_processor, "is_fast", False) is True


def fast_image_processor_class_name(image_processor) -> str:
    """The transformers class name of `image_processor`'s torchvision-backed form on this line: 5.x names the PIL form
    `<Name>Pil` and the torchvision one `<Name>`; 4.57 names them `<Name>` and `<Name>Fast`."""
    name = type(image_processor).__name__
    if torchvision_backed(image_processor):
        return name
    if IS_V5:
        return name[: -len("Pil")] if name.endswith("Pil") else name
    return name + "Fast"


def fast_image_processor(image_processor, device):
    """A torchvision-backed image processor with `image_processor`'s settings that works on `device` (moves each image
    there before resizing; its outputs stay there), or None where this environment has none (no torchvision, or no
    such class in this transformers)."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    name = type(image_processor).__name__
    settings = {k: v for k, v in image_processor.to_dict().items() if k not in ("image_processor_type", "processor_class")}
    # this line's name first; the other naming too, for a 5.x release between the two conventions
    for candidate in dict.fromkeys([fast_image_processor_class_name(image_processor), name.removesuffix("Pil"),
                                    name.removesuffix("Pil") + "Fast"]):
        cls = getattr(transformers, candidate, None)
        if cls is None:
            continue
        try:
            fast = cls.from_dict(settings, device=str(device))
        except (ImportError, TypeError, ValueError):  # a placeholder of a missing backend, or settings it refuses
            continue
        if torchvision_backed(fast):
            fast.device = str(device)
            return fast
    return None
