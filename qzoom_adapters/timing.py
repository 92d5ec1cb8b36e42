"""Per-stage timing of the pipeline, off unless a `StageTimer` is active (then it costs a few events).

    with StageTimer(device) as timer:
        zoom.generate_from_inputs(...)
    timer.seconds()  # {"vision": ..., "pass_a": ..., "decode": ...}, one device sync here

On CUDA each stage records a pair of events on the current stream, so timing adds no synchronisation
to the timed work; on CPU it reads the clock (CPU work is synchronous).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from contextvars import ContextVar

import torch

_ACTIVE: ContextVar["StageTimer | None"] = ContextVar("qzoom_stage_timer", default=None)


class StageTimer:
    """Collects (stage name, start, end) marks of the pipeline run inside its `with` block."""

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.cuda = self.device.type == "cuda"
        self._marks: list[tuple[str, object, object]] = []
        self.counts: dict[str, int] = {}
        self._token = None

    def __enter__(self) -> "StageTimer":
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._token)

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @contextmanager
    def stage(self, name: str):
        start = self._now()
        try:
            yield
        finally:
            self._marks.append((name, start, self._now()))

    def count(self, name: str, n: int) -> None:
        """Add `n` to a counter (e.g. decode steps), read back with the times."""
        self.counts[name] = self.counts.get(name, 0) + int(n)

    def seconds(self) -> dict[str, float]:
        """Total seconds per stage name (stages of the same name add up)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        out: dict[str, float] = {}
        for name, a, b in self._marks:
            dt = a.elapsed_time(b) / 1e3 if self.cuda else b - a
            out[name] = out.get(name, 0.0) + dt
        return out


@contextmanager
def stage(name: str):
    """Mark a pipeline stage for the active `StageTimer`; a no-op when none is active."""
    timer = _ACTIVE.get()
    if timer is None:
        yield
        return
    with timer.stage(name):
        yield


def count(name: str, n: int) -> None:
    timer = _ACTIVE.get()
    if timer is not None:
        timer.count(name, n)
