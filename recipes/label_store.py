"""Sharded stage-1 attention maps on disk: safetensors shards + a manifest, resumable, read lazily.

Layout of a label folder:
  manifest.json            settings the maps were made with (the teacher's weights fingerprint among them),
                           and the finished shards: file, size in bytes, sample ids and a digest per record
  shard-00000.safetensors  `grounding` and `sink` (N, h, w) float16 + per-sample metadata (JSON)
A shard is written to a temporary file and renamed, then the manifest is rewritten the same way,
so an interrupted job loses at most the shard in progress and resumes after the last finished one.
A shard that went missing or was cut short is dropped from the manifest when labelling resumes (its
samples are labelled again); reading such a folder names the shard.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from qzoom_adapters.atomic import atomic_write, atomic_write_text
from qzoom_adapters.errors import QZoomError

MANIFEST = "manifest.json"
INFO_KEYS = ("model",)  # settings recorded but not compared when both sides have a weights fingerprint
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


# --- what labels depend on -------------------------------------------------------------------
def _file_sample(path: Path, h, blocks: int = 16, block: int = 4096) -> None:
    """Feed `h` the size, the safetensors header (tensor names, shapes, offsets) and `blocks` evenly spread
    `block`-byte samples of a file: cheap on a 15 GB checkpoint, yet any retraining changes the samples."""
    size = path.stat().st_size
    h.update(f"{path.name}:{size}:".encode())
    with open(path, "rb") as f:
        if path.suffix == ".safetensors" and size >= 8:
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(n, 100_000_000)))
        for i in range(blocks):
            f.seek(max(0, (size - block) * i // max(1, blocks - 1)))
            h.update(f.read(block))


def weights_fingerprint(path: str) -> str:
    """A fingerprint of a model folder's weights and config (sizes, headers, sampled bytes; see `_file_sample`).

    `hf:org/name` is fingerprinted from its local snapshot when there is one, else by its id only.
    """
    folder = None
    if path.startswith("hf:"):
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(path[3:], local_files_only=True))
        except Exception:  # not in the local cache: only the id can be recorded
            return f"id:{path}"
    else:
        folder = Path(path)
    files = sorted(p for p in folder.iterdir() if p.is_file() and (p.name == "config.json" or
                                                                   p.name.endswith(_WEIGHT_SUFFIXES)))
    if not files:
        return f"id:{path}"
    h = hashlib.sha256()
    for p in files:
        _file_sample(p, h)
    return "sha256:" + h.hexdigest()[:32]


def record_digest(record) -> str:
    """Digest of what a record's stage-1 maps depend on: its question, its mode and its image's bytes."""
    h = hashlib.sha256(json.dumps([record.question, record.mode]).encode())
    try:
        with open(record.image, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as err:
        raise QZoomError(f"sample {record.id!r}: cannot read image {record.image} ({err})") from err
    return h.hexdigest()[:24]


def changed_records(manifest: dict, digests: dict[str, str]) -> list[str]:
    """Ids of labelled samples whose record digest differs from the one stored with their maps."""
    changed = []
    for shard in manifest["shards"]:
        for i, d in zip(shard["ids"], shard.get("hashes") or [None] * len(shard["ids"])):
            if d is not None and i in digests and digests[i] != d:
                changed.append(i)
    return changed


def refuse_changed(folder, changed: list[str]) -> None:
    if changed:
        raise QZoomError(f"{len(changed)} record(s) changed (question, mode or image) since {folder} labelled them: "
                         f"{changed[:5]}{' ...' if len(changed) > 5 else ''}; label into a new `out` folder, or "
                         "give changed samples new ids")


# --- the manifest and its shards ----------------------------------------------------------------
def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest.get("settings"), dict) or not isinstance(manifest.get("shards"), list):
            raise ValueError("no `settings` mapping and `shards` list")
        for shard in manifest["shards"]:
            if not isinstance(shard.get("file"), str) or not isinstance(shard.get("ids"), list):
                raise ValueError("a shard entry without `file` and `ids`")
    except (ValueError, AttributeError, UnicodeDecodeError) as err:
        raise QZoomError(f"{path} is corrupt ({err}); label into a new `out` folder (the shards cannot be "
                         "trusted without their manifest)") from err
    return manifest


def shard_problem(folder: Path, shard: dict) -> str | None:
    """Why a finished shard cannot be read ("missing", "truncated", "unreadable: ..."), or None."""
    path = folder / shard["file"]
    if not path.is_file():
        return "missing"
    if "bytes" in shard and path.stat().st_size != shard["bytes"]:
        return f"truncated ({path.stat().st_size} of {shard['bytes']} bytes)"
    try:
        with safe_open(str(path), "pt") as f:
            n = len(json.loads(f.metadata()["samples"]))
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as err:
        return f"unreadable: {err}"
    if n != len(shard["ids"]):
        return f"holds {n} samples, the manifest says {len(shard['ids'])}"
    return None


class LabelWriter:
    """Collects per-sample maps and writes them in shards of `shard_size`."""

    def __init__(self, out, settings: dict, shard_size: int):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.settings = json.loads(json.dumps(settings))  # normalised (e.g. int keys -> str) like a reload
        self.manifest = {"settings": self.settings, "shards": []}
        if (self.out / MANIFEST).exists():
            old = read_manifest(self.out)
            # with a weights fingerprint on both sides, the teacher's path is information, not identity (a moved
            # or copied folder still holds the same teacher)
            info = set(INFO_KEYS) if "weights" in old["settings"] and "weights" in self.settings else set()
            changed = sorted(k for k in set(old["settings"]) | set(self.settings)
                             if k not in info and old["settings"].get(k) != self.settings.get(k))
            if changed:
                why = ""
                if "weights" in changed:
                    why = (f"; the teacher's weights at {self.settings.get('model')} changed since these labels were "
                           "made" if "weights" in old["settings"] else "; they were made without a weights fingerprint")
                raise QZoomError(f"{self.out} holds labels made with other settings ({changed}){why}; use a new "
                                 "`out` folder to keep both")
            self.manifest = old
            self._drop_broken_shards()
        self.done = {i for shard in self.manifest["shards"] for i in shard["ids"]}
        self.pending: list[tuple[str, torch.Tensor, torch.Tensor, dict, str | None]] = []

    def _drop_broken_shards(self) -> None:
        """Forget shards that are missing or cut short (their samples get labelled again); delete the broken files."""
        broken = [(s, why) for s in self.manifest["shards"] if (why := shard_problem(self.out, s)) is not None]
        if not broken:
            return
        listed = ", ".join(f"{s['file']} ({why})" for s, why in broken)
        warnings.warn(f"{self.out}: label shard(s) {listed} "
                      f"dropped; their {sum(len(s['ids']) for s, _ in broken)} samples are labelled again",
                      stacklevel=3)
        bad = {id(s) for s, _ in broken}
        self.manifest["shards"] = [s for s in self.manifest["shards"] if id(s) not in bad]
        self._write_manifest()
        for s, _ in broken:  # files this manifest wrote: unusable, and a new shard gets a new name
            (self.out / s["file"]).unlink(missing_ok=True)

    def check_records(self, digests: dict[str, str]) -> None:
        """Refuse to add to labels of records that changed since (same id, other question/mode/image)."""
        refuse_changed(self.out, changed_records(self.manifest, digests))

    def add(self, sample_id: str, grounding: torch.Tensor, sink: torch.Tensor, meta: dict,
            digest: str | None = None) -> None:
        self.pending.append((sample_id, grounding, sink, meta, digest))
        if len(self.pending) >= self.shard_size:
            self.flush()

    def _next_name(self) -> str:
        used = [int(s["file"][6:11]) for s in self.manifest["shards"] if s["file"][6:11].isdigit()]
        return f"shard-{max(used, default=-1) + 1:05d}.safetensors"

    def _write_manifest(self) -> None:
        atomic_write_text(self.out / MANIFEST, json.dumps(self.manifest, indent=1))

    def flush(self) -> None:
        if not self.pending:
            return
        name = self._next_name()
        ids = [p[0] for p in self.pending]
        tensors = {"grounding": torch.stack([p[1] for p in self.pending]).half().contiguous(),
                   "sink": torch.stack([p[2] for p in self.pending]).half().contiguous()}
        meta = {"samples": json.dumps([{"id": p[0], **p[3]} for p in self.pending])}
        atomic_write(self.out / name, lambda tmp: save_file(tensors, tmp, metadata=meta))
        entry = {"file": name, "ids": ids, "bytes": (self.out / name).stat().st_size}
        if any(p[4] is not None for p in self.pending):
            entry["hashes"] = [p[4] for p in self.pending]
        self.manifest["shards"].append(entry)
        self._write_manifest()
        self.done.update(ids)
        self.pending = []


class LabelStore:
    """Read access by sample id; tensors are sliced from their shard on demand."""

    def __init__(self, folder):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise QZoomError(f"{self.folder} has no {MANIFEST}; run `qzoom labels stage1` first")
        self.manifest = read_manifest(self.folder)
        self.settings = self.manifest["settings"]
        broken = [f"{s['file']} ({why})" for s in self.manifest["shards"]
                  if (why := shard_problem(self.folder, s)) is not None]
        if broken:
            raise QZoomError(f"{self.folder}: label shard(s) {', '.join(broken)}; run `qzoom labels stage1` with the "
                             "same config again to rebuild them")
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
        try:
            with safe_open(str(self.folder / file), "pt") as f:
                return f.get_slice("grounding")[row].float(), f.get_slice("sink")[row].float()
        except (SafetensorError, OSError) as err:
            raise QZoomError(f"{self.folder / file}: cannot read label shard ({err}); run `qzoom labels stage1` "
                             "with the same config again to rebuild it") from err
