"""The universal sample record (JSONL), its loaders, and the image views the recipes feed a backbone."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Iterable, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qzoom_adapters.atomic import atomic_write_text
from qzoom_adapters.errors import QZoomError

GREY = (127, 127, 127)


class SampleRecord(BaseModel):
    """One question about one image. `image` is a path, relative to the JSONL file's folder or absolute.

    `mode`: "textual" (OCR/documents: the question as is) or "natural" (scenes: stage-1 labels ask
    for a grounding box). `box`: an optional ground-truth region in source pixels (x1, y1, x2, y2).
    """

    model_config = ConfigDict(extra="allow")

    id: str
    image: str
    question: str
    answers: list[str] = Field(default_factory=list)
    mode: Literal["natural", "textual"] = "textual"
    dataset: str = ""
    box: tuple[int, int, int, int] | None = None


def _jsonl_lines(path):
    """(line number, row) of a JSONL file's non-blank lines; a broken line is an error naming the file and line."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = list(f)
    except UnicodeDecodeError as err:
        raise QZoomError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8 JSONL, "
                         "one JSON object per line") from err
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                out.append((n, json.loads(line)))
            except json.JSONDecodeError as err:
                raise QZoomError(f"{path}:{n}: not valid JSON ({err.msg}); one JSON object per line") from err
    return out


def read_jsonl(path) -> list[dict]:
    """Rows of a JSONL file; a broken line is an error naming the file and line."""
    return [row for _, row in _jsonl_lines(path)]


def read_records(path) -> list[SampleRecord]:
    """Sample records of a JSONL file, with image paths made absolute; ids must be unique."""
    path = Path(path)
    if not path.is_file():
        raise QZoomError(f"no records file at {path}")
    records, seen = [], {}
    for n, row in _jsonl_lines(path):
        if not isinstance(row, dict):
            raise QZoomError(f"{path}:{n}: a record must be a JSON object with id, image, question, "
                             f"got a {type(row).__name__}")
        try:
            rec = SampleRecord(**row)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise QZoomError(f"{path}:{n}: not a sample record: {where}: {first['msg']} (fields: id, image, "
                             "question, answers, mode, dataset, box)") from err
        if rec.id in seen:
            raise QZoomError(f"{path}:{n}: sample id {rec.id!r} already appears on line {seen[rec.id]}; ids must "
                             "be unique")
        seen[rec.id] = n
        rec.image = str((path.parent / rec.image).resolve()) if not os.path.isabs(rec.image) else rec.image
        records.append(rec)
    if not records:
        raise QZoomError(f"{path} holds no records; write one JSON object per line (id, image, question, ...)")
    return records


def read_rows(path) -> list[dict]:
    """Rows of a results file (regressions, stage-3 answers) with `image` made absolute like `read_records`."""
    path = Path(path)
    if not path.is_file():
        raise QZoomError(f"no file at {path}")
    rows = read_jsonl(path)
    for row in rows:
        if "image" in row and not os.path.isabs(row["image"]):
            row["image"] = str((path.parent / row["image"]).resolve())
    return rows


def write_jsonl(path, rows: Iterable) -> None:
    """Write rows (dicts or pydantic models) atomically: a temporary file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(row.model_dump() if isinstance(row, BaseModel) else row,
                                               ensure_ascii=False) + "\n" for row in rows))


class JsonlAppender:
    """Append-only results file for resumable jobs: rows already there are kept and their ids skipped."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._drop_torn_tail()
        self.done = set()
        for n, row in (_jsonl_lines(self.path) if self.path.exists() else []):
            if not isinstance(row, dict) or "id" not in row:
                raise QZoomError(f"{self.path}:{n}: a row without an `id`: this file was not written by this job; "
                                 "choose another `out`")
            self.done.add(row["id"])

    def _drop_torn_tail(self) -> None:
        """A kill while appending leaves a last line without its newline: cut it off (with a warning), so the
        file reads and the next row starts on a line of its own."""
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        try:
            json.loads(data[cut:])
            with open(self.path, "ab") as f:  # a whole row that only lacks its newline: keep it
                f.write(b"\n")
            return
        except ValueError:
            pass
        warnings.warn(f"{self.path}: dropped a torn last line ({len(data) - cut} bytes; its row is redone)",
                      stacklevel=3)
        with open(self.path, "r+b") as f:
            f.truncate(cut)

    def append(self, rows: list[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done.update(row["id"] for row in rows)


def load_image(record: SampleRecord) -> Image.Image:
    try:
        return Image.open(record.image).convert("RGB")
    except (FileNotFoundError, OSError) as err:
        raise QZoomError(f"sample {record.id!r}: cannot read image {record.image} ({err})") from err


def pad_square(image: Image.Image, fill=GREY) -> Image.Image:
    """The image centred on a square of side max(W, H) filled with `fill` (LLaVA's expand2square)."""
    W, H = image.size
    side = max(W, H)
    square = Image.new("RGB", (side, side), fill)
    square.paste(image, ((side - W) // 2, (side - H) // 2))
    return square


def fixed_grid_view(spec, image: Image.Image, grid: int) -> tuple[Image.Image, int | None]:
    """The stage-1 view (SPEC §4.1): grey square padding, sized for a `grid` x `grid` token grid.

    Returns the view and the pixel budget to encode it with (None: the processor's fixed size).
    """
    pixels = spec.budget_pixels(grid * grid)
    square = pad_square(image)
    if pixels is None:
        return square, None
    side = int(round(pixels**0.5))
    return square.resize((side, side), Image.BICUBIC), pixels


def by_budget(items: list[dict], key: str) -> list[tuple]:
    """(value, items) per distinct `items[i][key]` (a budget or its pixels), None first, then increasing: a
    processor call encodes at one budget, so a micro-batch is encoded once per group."""
    groups: dict = {}
    for it in items:
        groups.setdefault(it.get(key), []).append(it)
    return [(v, groups[v]) for v in sorted(groups, key=lambda v: (v is not None, v or 0))]


def chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]
