"""Which samples of a batch zoom: the caller's decisions, the caller's boxes, else the gate (SPEC §3.2, per sample)."""
from __future__ import annotations

from .errors import QZoomError


def zoom_decisions(gate_prob, B: int, gate_threshold: float, has_twig: bool, force_zoom=None,
                   boxes=None) -> list[bool]:
    """Per sample: `force_zoom` where given, else zoom where the caller gave a box, else the gate's decision
    (`gate_prob >= gate_threshold`; no gate: always; no twig: never, a box aside)."""
    given = [b is not None for b in boxes] if boxes is not None else [False] * B
    if force_zoom is not None:
        if len(force_zoom) != B:
            raise QZoomError(f"force_zoom has {len(force_zoom)} decisions for a batch of {B}")
        if not has_twig and any(z and not g for z, g in zip(force_zoom, given)):
            raise QZoomError("force_zoom asks to zoom, but this QZoom has no twig to find the region (pass "
                             "boxes= for those samples)")
        return [bool(z) for z in force_zoom]
    if not has_twig:
        gated = [False] * B
    elif gate_prob is None:
        gated = [True] * B
    else:
        gated = (gate_prob >= gate_threshold).tolist()
    return [g or z for g, z in zip(given, gated)]
