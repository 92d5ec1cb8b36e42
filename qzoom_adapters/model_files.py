"""Model folders and checkpoint files on disk: the folder / file checks (before anything slow loads) and
`load_model`. Imports nothing from `io` (io imports from here)."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

from .errors import QZoomError
from .images import check_regular_file
from .spec import spec_class_for

INDEX_NAME = "model.safetensors.index.json"
MODEL_WEIGHTS = ("model.safetensors", INDEX_NAME, "pytorch_model.bin", "pytorch_model.bin.index.json")


def _check_folder(path, what: str, missing_hint: str = "") -> Path:
    """`path` as a Path if it is an existing folder; else a QZoomError naming it (`missing_hint` is appended to
    the "does not exist" message)."""
    path = Path(path)
    if not path.exists():
        raise QZoomError(f"{what} {path} does not exist{missing_hint}")
    if not path.is_dir():
        raise QZoomError(f"{what} {path} is not a folder")
    return path


def _probe_safetensors(file: Path, what: str) -> dict:
    """Check a safetensors file's header (truncation shows there) before anything loads it; its metadata."""
    check_regular_file(file, what)
    try:
        with safe_open(str(file), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise QZoomError(f"cannot read {what} {file}: {err}. The file is truncated, corrupt or not "
                         "safetensors") from None


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files a checkpoint folder consists of: those its `model.safetensors.index.json`
    names, else its one `model.safetensors` (or its only *.safetensors file); other files are never read."""
    index = path / INDEX_NAME
    if index.exists():
        check_regular_file(index, "checkpoint index")
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
            raise QZoomError(f"{index} is not a valid safetensors index (needs a `weight_map`): {err}") from None
        return [path / name for name in names]
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise QZoomError(f"{path} holds no *.safetensors files; is it a released Q-Zoom checkpoint folder?")
    if len(files) > 1:
        raise QZoomError(f"{path} holds several *.safetensors files ({', '.join(f.name for f in files[:4])}) but no "
                         f"{INDEX_NAME} or model.safetensors saying which make up the checkpoint; remove the others "
                         "or add the index")
    return files


def check_model_folder(path, what: str = "model folder") -> Path:
    """A Hugging Face model folder on disk: config.json and readable weights (headers checked, regular files)."""
    path = _check_folder(path, what)
    if not (path / "config.json").exists():
        raise QZoomError(f"{path} has no config.json; is it a Hugging Face model folder (save_pretrained)?")
    check_regular_file(path / "config.json", "model config")
    if not any((path / name).exists() for name in MODEL_WEIGHTS):
        raise QZoomError(f"{path} holds no model weights ({' / '.join(MODEL_WEIGHTS)}); point at the folder the "
                         "model was saved to")
    if (path / INDEX_NAME).exists() or (path / "model.safetensors").exists():
        for file in checkpoint_files(path):
            _probe_safetensors(file, "model weights")
    else:
        for name in MODEL_WEIGHTS[2:]:
            if (path / name).exists():
                check_regular_file(path / name, "model weights")
    return path


def _read_model_config(path: Path) -> dict:
    try:
        raw = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise QZoomError(f"{path / 'config.json'} is not valid JSON: {err}") from None
    if not isinstance(raw, dict) or not raw.get("model_type"):
        raise QZoomError(f"{path / 'config.json'} has no model_type; is it a Hugging Face model config?")
    return raw


def load_model(path, **kwargs):
    """The HF model saved in folder `path` (its family's class, eval mode), with clear errors for bad folders."""
    from qzoom_adapters import compat as _compat

    path = check_model_folder(path)
    spec_cls = spec_class_for(_read_model_config(path)["model_type"])
    config = _compat.load_config(str(path))
    try:
        return spec_cls.model_class().from_pretrained(str(path), config=config, **kwargs).eval()
    except SafetensorError as err:
        raise QZoomError(f"cannot read the model weights in {path}: {err}") from None
