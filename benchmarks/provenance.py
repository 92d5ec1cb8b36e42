"""Where benchmark numbers come from: the commit and the machine."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch


def git_commit() -> str | None:
    """This checkout's commit (`git rev-parse HEAD`), or None without git or outside a repository.

    `QZOOM_GIT_COMMIT` overrides it, for copies of a working tree that carry no (or an older) `.git`.
    """
    if os.environ.get("QZOOM_GIT_COMMIT"):
        return os.environ["QZOOM_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine(device: torch.device) -> dict:
    """Platform, CPU count and the device's name."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "device": str(device), "device_name": name}
