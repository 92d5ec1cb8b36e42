"""The conformance kit, run for every registered backbone family (built-in and entry points)."""
from __future__ import annotations

import pytest

from qzoom_adapters.spec import registered_families
from qzoom_adapters.testing import CHECKS, make_kit, run_conformance

FAMILIES = sorted(registered_families())
_KITS = {}


def _kit(family):
    if family not in _KITS:
        _KITS[family] = make_kit(registered_families()[family])
    return _KITS[family]


def test_builtin_families_are_registered():
    assert {"qwen2_5_vl", "qwen2_vl", "qwen3_vl", "llava"} <= set(FAMILIES)


@pytest.mark.parametrize("check", sorted(CHECKS))
@pytest.mark.parametrize("family", FAMILIES)
def test_conformance(family, check):
    run_conformance(registered_families()[family], checks=[check], kit=_kit(family))
