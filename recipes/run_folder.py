"""The bookkeeping of a training run folder that makes resuming safe.

A run folder is marked by `qzoom_run.json` (`RUN_NAME`): the settings that shape the run (a resume with
other ones is refused, naming them) and the checkpoints the run wrote (the only ones it resumes from or
rotates away). A non-empty folder without that marker is never trained into; a folder holding
`training_complete.json` (`DONE_NAME`) is a finished run and is never trained into again. Files that a
resume reads are written through a temporary file and a rename, and a torn loss-log line never blocks one.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from qzoom_adapters.atomic import atomic_write_text
from qzoom_adapters.errors import QZoomError

DONE_NAME = "training_complete.json"
RUN_NAME = "qzoom_run.json"  # marks a run folder: its settings and the checkpoints it wrote


def _short(value, limit: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def settings_diff(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every key whose value differs (a missing key reads as absent)."""
    missing = object()

    def show(v):
        return "(absent)" if v is missing else _short(v)

    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            out.append(f"{key}: {show(a)} -> {show(b)}")
    return out


def check_out_dir(out: Path, settings: dict) -> dict | None:
    """The run recorded in `out` to resume (None: a fresh run); refuses a finished run, a run with other
    settings, and a non-empty folder that is not a run of ours. Reads only (every process runs it)."""
    if (out / DONE_NAME).exists():
        raise QZoomError(f"{out} already holds a finished run ({DONE_NAME}); choose another `out` or move "
                         "it away (nothing is overwritten)")
    if out.exists() and not out.is_dir():
        raise QZoomError(f"`out` {out} is a file, not a folder; choose another `out`")
    marker = out / RUN_NAME
    if marker.is_file():
        try:
            run = json.loads(marker.read_text(encoding="utf-8"))
            old, names = run["settings"], run["checkpoints"]
            if not isinstance(old, dict) or not isinstance(names, list):
                raise TypeError
        except (ValueError, KeyError, TypeError) as err:
            raise QZoomError(f"{marker} is corrupt ({type(err).__name__}); start a new run with another `out` "
                             "(the folder is left as it is)") from err
        diff = settings_diff(old, settings)
        if diff:
            raise QZoomError(f"{out} holds a run with other settings ({'; '.join(diff)}); resume it with "
                             "its settings, or give a new `out` for a new run")
        return run
    if out.is_dir() and any(out.iterdir()):
        found = sorted(p.name for p in out.iterdir())
        raise QZoomError(f"{out} is not empty ({', '.join(found[:4])}{', ...' if len(found) > 4 else ''}) "
                         f"and holds no qzoom training run ({RUN_NAME}); choose a new or empty `out` folder "
                         "(nothing in it is overwritten)")
    return None


def start_run(acc, out: Path, settings: dict) -> dict:
    """Check `out` on every process, then (main process) mark a fresh run folder; all processes agree.
    Returns the run record (resumed, or the fresh one)."""
    acc.wait_for_everyone()  # nobody writes into `out` before every process has looked at it
    run = check_out_dir(out, settings)
    acc.wait_for_everyone()
    if run is None:
        from qzoom_adapters import __version__

        run = {"library": __version__, "settings": settings, "checkpoints": []}
        if acc.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            save_run(out, run)
    acc.wait_for_everyone()
    return run


def save_run(out: Path, run: dict) -> None:
    """Write the run record (settings and checkpoints) into `out`, atomically."""
    atomic_write_text(out / RUN_NAME, json.dumps(run, indent=1))


def latest_checkpoint(ckpt_dir: Path, run: dict) -> Path | None:
    """The newest complete checkpoint the run wrote (a folder it did not write is never resumed from)."""
    done = [ckpt_dir / n for n in run.get("checkpoints", []) if (ckpt_dir / n / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def read_log_rows(path: Path) -> list[dict]:
    """Rows of a JSONL loss log; a torn line (a kill while appending) and rows without a step are dropped with a
    warning, so one bad line never blocks a resume."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows, bad = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad.append(n)
            continue
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            bad.append(n)
            continue
        rows.append(row)
    if bad:
        torn = bad == [len(lines)]
        warnings.warn(f"{path}: dropped {'a torn last line' if torn else f'unreadable line(s) {bad[:10]}'} "
                      f"({len(rows)} rows kept)", stacklevel=2)
    return rows
