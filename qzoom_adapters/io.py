"""Adapter files (`adapter_config.json` + `adapter_model.safetensors`) and released Q-Zoom checkpoints.

Model-folder / checkpoint-file checks and `load_model` live in `model_files`; the model card in `model_card`."""
from __future__ import annotations

import json
import math
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .atomic import atomic_write
from .config import AdapterConfig, ZoomConfig, validation_message
from .devices import loading_dtype, placement
from .errors import QZoomError
from .gate import DynamicGate
from .images import check_regular_file
from .model_card import _write_model_card
from .model_files import _check_folder, _probe_safetensors, _read_model_config, checkpoint_files
from .spec import get_spec, spec_class_for
from .twig import TwigRPN
from .version import __version__

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def base_model_record(model) -> dict:
    """What names the base model: `base_model_name_or_path` (as peft records it) and `revision` (the hub commit
    the weights were loaded at), each None where the model does not say."""
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    revision = getattr(config, "_commit_hash", None)
    return {"base_model_name_or_path": str(name) if name else None, "revision": str(revision) if revision else None}


def save_adapters(path, model, twig: TwigRPN | None, gate: DynamicGate | None, zoom: ZoomConfig) -> Path:
    """Write the adapters only (never backbone weights) with what is needed to load them again, and a model card
    `README.md` (unless the folder holds a README.md that `save_adapters` did not write)."""
    spec = get_spec(model)
    branch = twig or gate
    if branch is None:
        raise QZoomError("nothing to save: QZoom has neither a twig nor a gate")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    depths = {f"{name}_T": module.T for name, module in (("twig", twig), ("gate", gate)) if module is not None}
    cfg = AdapterConfig(
        library_version=__version__, backbone_family=spec.family, model_type=model.config.model_type,
        K=branch.K, T=branch.T, **depths, has_twig=twig is not None, has_gate=gate is not None,
        hidden_size=spec.hidden_size, num_hidden_layers=len(spec.layers), **base_model_record(model), zoom=zoom,
    )
    tensors = {}
    for name, module in (("twig", twig), ("gate", gate)):
        if module is not None:
            tensors.update({f"{name}.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()})
    meta = {"format": "pt", "library_version": __version__, "backbone_family": spec.family,
            "K": str(branch.K), "T": str(branch.T),
            **{k: str(v) for k, v in depths.items()}}  # what the tensors were cut at: checked on load
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=meta))
    atomic_write(path / CONFIG_NAME, lambda tmp: Path(tmp).write_text(cfg.model_dump_json(indent=2)))
    _write_model_card(path, cfg, type(model).__name__)
    return path


def _read_safetensors(file: Path, what: str = "adapter weights", probed: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; its header is probed first unless the caller has just done so
    (`probed=True`)."""
    if not probed:
        _probe_safetensors(file, what)
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise QZoomError(f"cannot read {what} {file}: {err}. The file is corrupt or not safetensors; "
                         "re-save the adapters") from err


def _check_finite(tensors: dict, file: Path) -> None:
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise QZoomError(f"{file}: tensor {key!r} holds NaN or inf values; the adapters are damaged "
                             "(re-save or re-train them)")


def _checkpoint_name(name_or_path: str) -> str:
    """The last component of a hub id or folder path: "Qwen/Qwen2.5-VL-7B-Instruct" and
    "/models/Qwen2.5-VL-7B-Instruct" name the same checkpoint, and so do a folder and its moved copy."""
    return name_or_path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def _warn_other_base_model(path: Path, cfg: AdapterConfig, model) -> None:
    """Another base-model name is only a warning (compared by `_checkpoint_name`, so a local snapshot or a moved
    folder is not "another"); another model_type or depth is an error, checked in `load_adapters`."""
    saved, now = cfg.base_model_name_or_path, base_model_record(model)["base_model_name_or_path"]
    if saved and now and _checkpoint_name(saved) != _checkpoint_name(now):
        warnings.warn(f"adapters in {path} were saved for base model {saved!r} but are loaded into "
                      f"{now!r}; outputs may differ if the weights are not the same",
                      stacklevel=3)


def load_adapters(path, model) -> tuple[TwigRPN | None, DynamicGate | None, ZoomConfig]:
    """Rebuild twig/gate for `model` from an adapter folder written by `save_adapters`.

    The model must have the saved `model_type`, family, depth and hidden size (else `QZoomError`); a different
    base-model name only warns.
    """
    path = _check_folder(path, "adapter folder", missing_hint=f" (no {CONFIG_NAME} to read); pass the folder "
                         "written by save_pretrained")
    if not (path / CONFIG_NAME).exists():
        raise QZoomError(f"{path} has no {CONFIG_NAME}; is it an adapter folder written by save_pretrained?")
    check_regular_file(path / CONFIG_NAME, "adapter config")
    try:
        cfg = AdapterConfig.model_validate(json.loads((path / CONFIG_NAME).read_text()))
    except ValidationError as err:
        raise QZoomError(f"{path / CONFIG_NAME} is not a valid adapter config: {validation_message(err)}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as err:
        raise QZoomError(f"{path / CONFIG_NAME} is not a valid adapter config: {err}") from err
    spec = get_spec(model)
    model_type = getattr(model.config, "model_type", None)
    if cfg.model_type != model_type:
        raise QZoomError(f"adapters in {path} were saved for model_type {cfg.model_type!r} but the model is "
                         f"{model_type!r}; load them into the model they were trained with")
    if cfg.num_hidden_layers != len(spec.layers):
        raise QZoomError(f"adapters in {path} were saved for a model with {cfg.num_hidden_layers} decoder layers but "
                         f"this one has {len(spec.layers)}; load them into the model they were trained with")
    if cfg.backbone_family != spec.family:
        raise QZoomError(
            f"adapters in {path} were saved for backbone family {cfg.backbone_family!r} but the model is "
            f"{spec.family!r}; load them into a {cfg.backbone_family} model"
        )
    if not (cfg.has_twig or cfg.has_gate):
        raise QZoomError(f"{path / CONFIG_NAME} records neither a twig nor a gate (has_twig, has_gate); "
                         "re-save the adapters")
    T = max(cfg.depth(name) for name, on in (("twig", cfg.has_twig), ("gate", cfg.has_gate)) if on)
    if cfg.K + T > len(spec.layers):
        raise QZoomError(
            f"adapters in {path} branch at K={cfg.K} with T={T} layers but the model has only "
            f"{len(spec.layers)} decoder layers; use the model they were trained with"
        )
    if cfg.hidden_size != spec.hidden_size:
        raise QZoomError(f"adapters have hidden size {cfg.hidden_size} but the model has {spec.hidden_size}")
    _warn_other_base_model(path, cfg, model)
    meta = _probe_safetensors(path / WEIGHTS_NAME, "adapter weights")
    for key, value in (("K", cfg.K), ("T", cfg.T), ("twig_T", cfg.twig_T), ("gate_T", cfg.gate_T)):
        if key in meta and value is not None and meta[key] != str(value):
            raise QZoomError(f"{path / CONFIG_NAME} says {key}={value} but {WEIGHTS_NAME} was saved with "
                             f"{key}={meta[key]}; restore {key}={meta[key]} in {CONFIG_NAME}")
    tensors = _read_safetensors(path / WEIGHTS_NAME, probed=True)  # probed just above
    _check_finite(tensors, path / WEIGHTS_NAME)
    twig = gate = None
    if cfg.has_twig:
        twig = _load_state(TwigRPN.from_backbone(model, cfg.K, cfg.depth("twig")), _prefixed(tensors, "twig"), path, "twig")
    if cfg.has_gate:
        gate = _load_state(DynamicGate.from_backbone(model, cfg.K, cfg.depth("gate")), _prefixed(tensors, "gate"), path,
                           "gate")
    return twig, gate, cfg.zoom


# --- released Q-Zoom checkpoints (SPEC §6) -------------------------------------------------
_REF_PATTERNS = {
    "twig": re.compile(r"(?:^|\.)twig_layers\.(.+)$"),
    "gate_layers": re.compile(r"(?:^|\.)high_res_layers\.(.+)$"),
    "gate_head": re.compile(r"(?:^|\.)high_res_head\.(.+)$"),
}


def _file_keys(files: list[Path]) -> dict[str, Path]:
    """key -> file of every tensor in `files` (headers only: no tensor is read)."""
    where = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            where.update(dict.fromkeys(f.keys(), file))
    return where


def _read_keys(where: dict[str, Path], keys) -> dict[str, torch.Tensor]:
    """The tensors `keys` only, each read from its file with `safe_open` (one file opened at a time)."""
    by_file: dict[Path, list[str]] = {}
    for key in keys:
        by_file.setdefault(where[key], []).append(key)
    out = {}
    for file, names in by_file.items():
        try:
            with safe_open(str(file), "pt") as f:
                out.update({name: f.get_tensor(name) for name in names})
        except (SafetensorError, OSError, ValueError) as err:
            raise QZoomError(f"cannot read checkpoint weights {file}: {err}. The file is corrupt or not "
                             "safetensors") from None
    return out


def reference_adapter_keys(keys) -> dict[str, dict[str, str]]:
    """The Q-Zoom extra keys of a released checkpoint as {"twig" | "gate": {adapter state-dict key: file key}}."""
    out: dict[str, dict[str, str]] = {"twig": {}, "gate": {}}
    for key in keys:
        if m := _REF_PATTERNS["twig"].search(key):
            out["twig"][f"layers.{m.group(1)}"] = key
        elif m := _REF_PATTERNS["gate_layers"].search(key):
            out["gate"][f"layers.{m.group(1)}"] = key
        elif m := _REF_PATTERNS["gate_head"].search(key):
            out["gate"][f"head.{m.group(1)}"] = key
    return out


def reference_adapter_tensors(tensors: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Split the Q-Zoom extra tensors of a released checkpoint into twig / gate state dicts."""
    return {part: {k: tensors[key] for k, key in names.items()}
            for part, names in reference_adapter_keys(tensors).items()}


@contextmanager
def _quiet_transformers():
    """Loading a released checkpoint reports its Q-Zoom tensors as unexpected keys; that is expected."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def map_checkpoint_keys(spec_cls, file_keys, model_keys) -> dict[str, str]:
    """file key -> model state-dict key, for the file keys the model has as they are or after one of the family's
    `checkpoint_key_renames` (regex, replacement) pairs (an older transformers layout, e.g. `model.layers.*`)."""
    own = set(model_keys)
    renames = [(re.compile(pattern), repl) for pattern, repl in getattr(spec_cls, "checkpoint_key_renames", ())]
    mapping = {}
    for key in file_keys:
        if key in own:
            mapping[key] = key
            continue
        for pattern, repl in renames:
            new = pattern.sub(repl, key, count=1)
            if new != key and new in own:
                mapping[key] = new
                break
    return mapping


def _reference_folder(path) -> tuple[Path, dict, type, dict[str, Path], dict]:
    """A released checkpoint folder checked before anything slow loads: (path, config, spec class, key -> file,
    config fields)."""
    path = _check_folder(path, "checkpoint folder")
    config_file = path / "config.json"
    if not config_file.exists():
        raise QZoomError(f"{path} has no config.json; pass the folder of a released Q-Zoom checkpoint")
    check_regular_file(config_file, "checkpoint config")
    raw = _read_model_config(path)
    spec_cls = spec_class_for(raw.get("model_type", ""))
    files = checkpoint_files(path)
    for file in files:
        _probe_safetensors(file, "checkpoint weights")
    fields = _reference_fields(raw, config_file)  # bad values fail before the model loads
    where = _file_keys(files)
    names = reference_adapter_keys(where)
    if not names["twig"] and not names["gate"]:
        raise QZoomError(f"{path} holds no Q-Zoom tensors (twig_layers / high_res_layers / high_res_head)")
    if fields["K"] <= 0 or fields["T"] <= 0:
        raise QZoomError(f"{config_file} lacks twig_K/twig_T (or high_res_K/high_res_T)")
    return path, raw, spec_cls, where, fields


def load_reference_checkpoint(path, torch_dtype="auto", device=None, attn_implementation=None, device_map=None,
                              dtype=None):
    """(model, twig, gate, zoom-config fields) from a released Q-Zoom checkpoint folder.

    The base model is loaded by its HF class straight into `torch_dtype` (or `dtype`, its transformers-5 name;
    "auto": the checkpoint's own) and onto `device` (e.g. "cuda:0") or `device_map` ("auto", "cuda:0", a dict), so
    its weights are held once; the adapter tensors are read with `safe_open` for their keys only, into twig and gate
    layers that sit on the device (and in the dtype) of the trunk layers they copy. Dtype and placement are checked
    before anything loads (`qzoom_adapters.devices`).
    """
    load_dtype = loading_dtype(torch_dtype, dtype)
    where_to = placement(device, device_map)
    path, raw, spec_cls, where, fields = _reference_folder(path)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if where_to is not None:
        extra["device_map"] = where_to
    with _quiet_transformers(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model, info = spec_cls.model_class().from_pretrained(
                str(path), dtype=load_dtype, output_loading_info=True, **extra
            )
        except SafetensorError as err:
            raise QZoomError(f"cannot read the checkpoint weights in {path}: {err}") from None
    if info.get("missing_keys"):
        _load_missing(model, spec_cls, where, set(info["missing_keys"]), path)
    twig, gate = _reference_branches(path, raw, where, fields, model.eval())
    return model, twig, gate, {k: v for k, v in fields.items() if k not in ("K", "T")}


def load_reference_adapters(path, model) -> tuple[TwigRPN | None, DynamicGate | None, dict]:
    """(twig, gate, zoom-config fields) of a released Q-Zoom checkpoint, for `model` already loaded from it (e.g.
    by a transformers pipeline); only the adapter tensors are read."""
    path, raw, spec_cls, where, fields = _reference_folder(path)
    if spec_cls.family != get_spec(model).family:
        raise QZoomError(f"{path} is a {spec_cls.family} checkpoint but the model is {get_spec(model).family}; "
                         "load the model from that checkpoint")
    twig, gate = _reference_branches(path, raw, where, fields, model)
    return twig, gate, {k: v for k, v in fields.items() if k not in ("K", "T")}


def _reference_branches(path: Path, raw: dict, where: dict[str, Path], fields: dict, model):
    """The twig and gate of a released checkpoint, built on `model` and filled from its tensors."""
    raw = {**(raw.get("text_config") or {}), **raw}
    names = reference_adapter_keys(where)
    K, T = fields["K"], fields["T"]
    twig = gate = None
    for part, key, on in (("twig", "enable_twig", "twig_layers"), ("gate", "enable_high_res", "high_res_*")):
        if not names[part] or not raw.get(key, True):
            continue
        branch = (TwigRPN if part == "twig" else DynamicGate).from_backbone(model, K, T)
        loaded = _load_streamed(branch, names[part], where, path, on)
        twig, gate = (loaded, gate) if part == "twig" else (twig, loaded)
    return twig, gate


def _load_streamed(module, names: dict[str, str], where: dict[str, Path], path: Path, what: str):
    """Copy the checkpoint tensors `names` ({module state-dict key: file key}) into `module`, one tensor at a time
    (at most one adapter tensor is held besides the module); the key sets must match exactly."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(names)), sorted(set(names) - set(own))
    if missing or unexpected:
        raise QZoomError(f"{path}: {what} tensors do not fit the model (missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}); were they saved for another backbone size?")
    for key, file_key in names.items():
        tensor = _read_keys(where, [file_key])[file_key]
        if tensor.shape != own[key].shape:
            raise QZoomError(f"{path}: {what} tensor {file_key} has shape {tuple(tensor.shape)} but the model's "
                             f"{key} is {tuple(own[key].shape)}; were they saved for another backbone size?")
        _check_finite({file_key: tensor}, path / f"{what} tensors")
        with torch.no_grad():
            own[key].copy_(tensor.to(own[key].dtype))
    return module


def _load_missing(model, spec_cls, where: dict[str, Path], missing: set, path: Path) -> None:
    """Weights transformers left unloaded (a layout it did not convert): map the file keys with the family's
    renames and copy just those tensors, one file at a time."""
    mapping = {k: v for k, v in map_checkpoint_keys(spec_cls, where, model.state_dict()).items() if v in missing}
    still = missing - set(mapping.values())
    if still:
        raise QZoomError(f"{path}: backbone weights missing after key mapping: {sorted(still)[:5]}")
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for file_key, tensor in _read_keys(where, mapping).items():
            target = params[mapping[file_key]]
            target.copy_(tensor.to(target.dtype))


def _config_number(raw: dict, key: str, kind, file: Path):
    value = raw.get(key)
    if value is None:
        return None
    try:
        number = float(value) if not isinstance(value, bool) else None  # numeric strings are accepted
    except (TypeError, ValueError):
        number = None
    if number is None or (kind is int and not (math.isfinite(number) and number == int(number))):
        raise QZoomError(f"{file}: {key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return int(number) if kind is int else number


def _reference_fields(raw: dict, file: Path) -> dict:
    """K, T and the ZoomConfig fields a released config holds, each value checked (named on error)."""
    # Q-Zoom fields sit at the top level; a Qwen3-style nested config may carry them in text_config
    raw = {**(raw.get("text_config") or {}), **raw}
    num = {key: _config_number(raw, key, kind, file) for key, kind in (
        ("high_res_K", int), ("twig_K", int), ("high_res_T", int), ("twig_T", int),
        ("high_res_thresh", float), ("roi_conf_thresh", float))}
    fields = {"K": num["high_res_K"] or num["twig_K"] or 0, "T": num["high_res_T"] or num["twig_T"] or 0,
              "position_mode": "aligned" if raw.get("reuse_src_pos", False) else "sequential"}
    for key, field in (("high_res_thresh", "gate_threshold"), ("roi_conf_thresh", "roi_threshold")):
        if num[key] is not None:
            fields[field] = num[key]
            try:
                ZoomConfig.model_validate({field: num[key]})
            except ValidationError as err:
                raise QZoomError(f"{file}: {key}={num[key]!r} is not a valid {field}: "
                                 f"{validation_message(err)}") from None
    return fields


def _prefixed(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def _load_state(module, state: dict, path: Path, what: str):
    """Load `state` into an adapter module (cast to its dtype); any missing or extra key is an error."""
    ref = next(module.parameters())
    result = module.load_state_dict({k: v.to(ref.dtype) for k, v in state.items()}, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise QZoomError(
            f"{path}: {what} tensors do not fit the model (missing {result.missing_keys[:4]}, "
            f"unexpected {result.unexpected_keys[:4]}); were they saved for another backbone size?"
        )
    return module
