"""Whether a benchmark's dataset is in the user's Hugging Face cache (read from the environment at call time, as
huggingface_hub and datasets resolve it), and the one-line error that says what to download."""
from __future__ import annotations

import os
from pathlib import Path

from qzoom_adapters.errors import QZoomError


def _hf_home() -> Path:
    return Path(os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                / "huggingface").expanduser()


def hub_cache() -> Path:
    """The hub cache (`HF_HUB_CACHE`, `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`)."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    return Path(env).expanduser() if env else _hf_home() / "hub"


def datasets_cache() -> Path:
    """The datasets cache (`HF_DATASETS_CACHE`, else `$HF_HOME/datasets`)."""
    env = os.environ.get("HF_DATASETS_CACHE")
    return Path(env).expanduser() if env else _hf_home() / "datasets"


def is_cached(dataset: str) -> bool:
    """`dataset` ("org/name") has a snapshot in the hub cache or prepared data in the datasets cache."""
    org, _, name = dataset.partition("/")
    snapshots = hub_cache() / f"datasets--{org}--{name}" / "snapshots"
    if snapshots.is_dir() and any(snapshots.iterdir()):
        return True
    prepared = datasets_cache()
    wanted = f"{org}___{name}".lower()
    return prepared.is_dir() and any(p.name.lower() == wanted for p in prepared.iterdir())


def check_cached(needs: dict[str, str]) -> None:
    """`needs`: task -> dataset id. A `QZoomError` naming every missing dataset and how to fetch it."""
    missing = {task: ds for task, ds in needs.items() if not is_cached(ds)}
    if not missing:
        return
    ids = sorted(set(missing.values()))
    listing = ", ".join(f"{task} needs {ds}" for task, ds in missing.items())
    fetch = " && ".join(f"hf download --repo-type dataset {ds}" for ds in ids)
    raise QZoomError(f"datasets not in your Hugging Face cache ({hub_cache()}): {listing}. Download them once "
                     f"({fetch}), or pass --allow-download to let lmms-eval fetch them")
