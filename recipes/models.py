"""Loading a backbone (model + processor + spec) for a recipe, on this process's device."""
from __future__ import annotations

from pathlib import Path

import torch

import qzoom_adapters.backbones.tiny_processor  # noqa: F401  (lets AutoProcessor load the offline tiny processors)
from qzoom_adapters.errors import QZoomError
from qzoom_adapters.spec import get_spec, spec_class_for

from .config import ModelSection

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> torch.device:
    """This process's device: its GPU under `accelerate launch`, else the first GPU, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    from accelerate import PartialState

    return PartialState().device


def load_backbone(section: ModelSection | str, device=None, eval_mode: bool = True):
    """(model, processor, spec) of an HF model folder, family chosen by its `model_type`."""
    from transformers import AutoProcessor

    from qzoom_adapters import compat as _compat

    section = ModelSection(path=section) if isinstance(section, str) else section
    path = section.path.removeprefix("hf:")  # "hf:org/name" is a Hub id (kept as is by the config loader)
    if not section.path.startswith("hf:") and not (Path(path) / "config.json").is_file():
        raise QZoomError(f"{path} is not a Hugging Face model folder (no config.json); write hf:org/name for a Hub id")
    config = _compat.load_config(path)
    device = torch.device(device) if device is not None else default_device()
    dtype = _DTYPES.get(section.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    kw = {"dtype": dtype, "config": config}
    if section.attn_implementation:
        kw["attn_implementation"] = section.attn_implementation
    model = spec_class_for(config.model_type).model_class().from_pretrained(path, **kw).to(device)
    if eval_mode:
        model.eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor, get_spec(model)


def freeze(module: torch.nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def batch_to(inputs: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def placeholder_ids(spec) -> list[int]:
    """Tokens a generated answer must never contain (re-reading it would expect image features there)."""
    return [t for t in (spec.image_token_id, spec.video_token_id, spec.vision_start_id, spec.vision_end_id)
            if t is not None]
