"""Adapter files (`adapter_config.json` + `adapter_model.safetensors`) and released Q-Zoom checkpoints."""
from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import AdapterConfig, ZoomConfig
from .errors import QZoomError
from .gate import DynamicGate
from .spec import get_spec, spec_class_for
from .twig import TwigRPN
from .version import __version__

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: a crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_adapters(path, model, twig: TwigRPN | None, gate: DynamicGate | None, zoom: ZoomConfig) -> Path:
    """Write the adapters only (never backbone weights) with what is needed to load them again."""
    spec = get_spec(model)
    branch = twig or gate
    if branch is None:
        raise QZoomError("nothing to save: QZoom has neither a twig nor a gate")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = AdapterConfig(
        library_version=__version__, backbone_family=spec.family, model_type=model.config.model_type,
        K=branch.K, T=branch.T, has_twig=twig is not None, has_gate=gate is not None,
        hidden_size=spec.hidden_size, num_hidden_layers=len(spec.layers), zoom=zoom,
    )
    tensors = {}
    for name, module in (("twig", twig), ("gate", gate)):
        if module is not None:
            tensors.update({f"{name}.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()})
    meta = {"format": "pt", "library_version": __version__, "backbone_family": spec.family}
    _atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=meta))
    _atomic_write(path / CONFIG_NAME, lambda tmp: Path(tmp).write_text(cfg.model_dump_json(indent=2)))
    return path


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise QZoomError(f"cannot read adapter weights {file}: {err}. The file is corrupt or not safetensors; "
                         "re-save the adapters") from err


def load_adapters(path, model) -> tuple[TwigRPN | None, DynamicGate | None, ZoomConfig]:
    """Rebuild twig/gate for `model` from an adapter folder written by `save_adapters`."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise QZoomError(f"{path} has no {CONFIG_NAME}; is it an adapter folder written by save_pretrained?")
    try:
        cfg = AdapterConfig.model_validate(json.loads((path / CONFIG_NAME).read_text()))
    except (json.JSONDecodeError, ValueError) as err:
        raise QZoomError(f"{path / CONFIG_NAME} is not a valid adapter config: {err}") from err
    spec = get_spec(model)
    if cfg.backbone_family != spec.family:
        raise QZoomError(
            f"adapters in {path} were saved for backbone family {cfg.backbone_family!r} but the model is "
            f"{spec.family!r}; load them into a {cfg.backbone_family} model"
        )
    if cfg.K + cfg.T > len(spec.layers):
        raise QZoomError(
            f"adapters in {path} branch at K={cfg.K} with T={cfg.T} layers but the model has only "
            f"{len(spec.layers)} decoder layers; use the model they were trained with"
        )
    if cfg.hidden_size != spec.hidden_size:
        raise QZoomError(f"adapters have hidden size {cfg.hidden_size} but the model has {spec.hidden_size}")
    tensors = _read_safetensors(path / WEIGHTS_NAME)
    twig = _load_state(TwigRPN.from_backbone(model, cfg.K, cfg.T), _prefixed(tensors, "twig"), path, "twig") if cfg.has_twig else None
    gate = _load_state(DynamicGate.from_backbone(model, cfg.K, cfg.T), _prefixed(tensors, "gate"), path, "gate") if cfg.has_gate else None
    return twig, gate, cfg.zoom


# --- released Q-Zoom checkpoints (SPEC §6) -------------------------------------------------
_REF_PATTERNS = {
    "twig": re.compile(r"(?:^|\.)twig_layers\.(.+)$"),
    "gate_layers": re.compile(r"(?:^|\.)high_res_layers\.(.+)$"),
    "gate_head": re.compile(r"(?:^|\.)high_res_head\.(.+)$"),
}


def _checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise QZoomError(f"{path} holds no *.safetensors files; is it a released Q-Zoom checkpoint folder?")
    tensors = {}
    for file in files:
        tensors.update(_read_safetensors(file))
    return tensors


def reference_adapter_tensors(tensors: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Split the Q-Zoom extra tensors of a released checkpoint into twig / gate state dicts."""
    out = {"twig": {}, "gate": {}}
    for key, value in tensors.items():
        if m := _REF_PATTERNS["twig"].search(key):
            out["twig"][f"layers.{m.group(1)}"] = value
        elif m := _REF_PATTERNS["gate_layers"].search(key):
            out["gate"][f"layers.{m.group(1)}"] = value
        elif m := _REF_PATTERNS["gate_head"].search(key):
            out["gate"][f"head.{m.group(1)}"] = value
    return out


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


def _backbone_key_map(model, file_keys) -> dict[str, str]:
    """Map checkpoint keys of an older layout (e.g. `model.layers.*`) to the model's state-dict keys."""
    own = set(model.state_dict())
    renames = [("model.", "model.language_model."), ("visual.", "model.visual."), ("lm_head.", "lm_head.")]
    mapping = {}
    for key in file_keys:
        if key in own:
            mapping[key] = key
            continue
        for old, new in renames:
            if key.startswith(old) and new + key[len(old) :] in own:
                mapping[key] = new + key[len(old) :]
                break
    return mapping


def load_reference_checkpoint(path, torch_dtype=torch.float32, device=None, attn_implementation=None):
    """(model, twig, gate, zoom-config fields) from a released Q-Zoom checkpoint folder."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise QZoomError(f"{path} has no config.json; pass the folder of a released Q-Zoom checkpoint")
    raw = json.loads(config_file.read_text())
    spec_cls = spec_class_for(raw.get("model_type", ""))
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with _quiet_transformers(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = spec_cls.model_class().from_pretrained(
            str(path), torch_dtype=torch_dtype, output_loading_info=True, **extra
        )
    tensors = _checkpoint_tensors(path)
    if info.get("missing_keys"):
        # transformers did not convert this layout: map the decoder keys ourselves
        mapping = _backbone_key_map(model, tensors)
        model.load_state_dict({mapping[k]: v for k, v in tensors.items() if k in mapping}, strict=False)
        still = set(info["missing_keys"]) - set(mapping.values())
        if still:
            raise QZoomError(f"{path}: backbone weights missing after key mapping: {sorted(still)[:5]}")
    model = model.to(device).eval() if device else model.eval()
    # Q-Zoom fields sit at the top level; a Qwen3-style nested config may carry them in text_config
    raw = {**(raw.get("text_config") or {}), **raw}
    K = int(raw.get("high_res_K") or raw.get("twig_K") or 0)
    T = int(raw.get("high_res_T") or raw.get("twig_T") or 0)
    parts = reference_adapter_tensors(tensors)
    if not parts["twig"] and not parts["gate"]:
        raise QZoomError(f"{path} holds no Q-Zoom tensors (twig_layers / high_res_layers / high_res_head)")
    if K <= 0 or T <= 0:
        raise QZoomError(f"{config_file} lacks twig_K/twig_T (or high_res_K/high_res_T)")
    twig = gate = None
    if parts["twig"] and raw.get("enable_twig", True):
        twig = _load_state(TwigRPN.from_backbone(model, K, T), parts["twig"], path, "twig_layers")
    if parts["gate"] and raw.get("enable_high_res", True):
        gate = _load_state(DynamicGate.from_backbone(model, K, T), parts["gate"], path, "high_res_*")
    fields = {"position_mode": "aligned" if raw.get("reuse_src_pos", False) else "sequential"}
    if raw.get("high_res_thresh") is not None:
        fields["gate_threshold"] = float(raw["high_res_thresh"])
    if raw.get("roi_conf_thresh") is not None:
        fields["roi_threshold"] = float(raw["roi_conf_thresh"])
    return model, twig, gate, fields


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
