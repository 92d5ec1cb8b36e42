"""Sharded stage-1 attention maps on disk: safetensors shards + a manifest, resumable, read lazily.

Layout of a label folder:
  manifest.json            settings the maps were made with, and the finished shards with their ids
  shard-00000.safetensors  `grounding` and `sink` (N, h, w) float16 + per-sample metadata (JSON)
A shard is written to a temporary file and renamed, then the manifest is rewritten the same way,
so an interrupted job loses at most the shard in progress and resumes after the last finished one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qzoom_adapters.errors import QZoomError

MANIFEST = "manifest.json"


class LabelWriter:
    """Collects per-sample maps and writes them in shards of `shard_size`."""

    def __init__(self, out, settings: dict, shard_size: int):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.settings = json.loads(json.dumps(settings))  # normalised (e.g. int keys -> str) like a reload
        self.manifest = {"settings": self.settings, "shards": []}
        path = self.out / MANIFEST
        if path.exists():
            old = json.loads(path.read_text())
            if old["settings"] != self.settings:
                changed = sorted(k for k in set(old["settings"]) | set(self.settings)
                                 if old["settings"].get(k) != self.settings.get(k))
                raise QZoomError(f"{self.out} holds labels made with other settings ({changed}); use a new `out` "
                                 "folder to keep both")
            self.manifest = old
        self.done = {i for shard in self.manifest["shards"] for i in shard["ids"]}
        self.pending: list[tuple[str, torch.Tensor, torch.Tensor, dict]] = []

    def add(self, sample_id: str, grounding: torch.Tensor, sink: torch.Tensor, meta: dict) -> None:
        self.pending.append((sample_id, grounding, sink, meta))
        if len(self.pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"shard-{len(self.manifest['shards']):05d}.safetensors"
        ids = [p[0] for p in self.pending]
        tensors = {"grounding": torch.stack([p[1] for p in self.pending]).half().contiguous(),
                   "sink": torch.stack([p[2] for p in self.pending]).half().contiguous()}
        meta = {"samples": json.dumps([{"id": p[0], **p[3]} for p in self.pending])}
        tmp = self.out / f".{name}.tmp"
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, self.out / name)
        self.manifest["shards"].append({"file": name, "ids": ids})
        tmp = self.out / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(self.manifest, indent=1))
        os.replace(tmp, self.out / MANIFEST)
        self.done.update(ids)
        self.pending = []


class LabelStore:
    """Read access by sample id; tensors are sliced from their shard on demand."""

    def __init__(self, folder):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise QZoomError(f"{self.folder} has no {MANIFEST}; run `qzoom labels stage1` first")
        self.manifest = json.loads(path.read_text())
        self.settings = self.manifest["settings"]
        self.index: dict[str, tuple[str, int]] = {}
        self.meta: dict[str, dict] = {}
        for shard in self.manifest["shards"]:
            with safe_open(str(self.folder / shard["file"]), "pt") as f:
                samples = json.loads(f.metadata()["samples"])
            for row, sample in enumerate(samples):
                self.index[sample["id"]] = (shard["file"], row)
                self.meta[sample["id"]] = sample

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self.index

    def __len__(self) -> int:
        return len(self.index)

    def maps(self, sample_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(grounding, sink) float32 (h, w) maps of one sample."""
        file, row = self.index[sample_id]
        with safe_open(str(self.folder / file), "pt") as f:
            return f.get_slice("grounding")[row].float(), f.get_slice("sink")[row].float()
