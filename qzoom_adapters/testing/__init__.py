"""Conformance kit: the invariants the core relies on, checked for any `BackboneSpec`.

    from qzoom_adapters.testing import run_conformance
    run_conformance(MySpec)                     # uses MySpec.tiny_config() / MySpec.tiny_processor()
    run_conformance(MySpec, make_model=lambda seed: ..., make_processor=lambda: ...)

Each check builds tiny random models on the CPU; no downloads, no GPU.
"""
from __future__ import annotations

import warnings
from typing import Callable, Iterable

from ..spec import get_spec
from .checks import CHECKS
from .kit import Kit, NotApplicable, default_model_factory, raises, synthetic_image


def make_kit(spec_cls, make_model: Callable | None = None, make_processor: Callable | None = None,
             K: int | None = None, T: int = 3) -> Kit:
    """A `Kit` for `spec_cls`; factories default to the spec's `tiny_config()` / `tiny_processor()`."""
    for name, given in (("tiny_config", make_model), ("tiny_processor", make_processor)):
        if given is None and not hasattr(spec_cls, name):
            raise TypeError(f"{spec_cls.__name__} has no {name}(); pass make_model/make_processor to the kit")
    kit = Kit(spec_cls, make_model or default_model_factory(spec_cls), make_processor or spec_cls.tiny_processor, T=T)
    kit.K = K if K is not None else max(3, kit.spec_cls(kit.model).min_branch_layer)
    return kit


def run_conformance(spec_cls, make_model: Callable | None = None, make_processor: Callable | None = None, *,
                    checks: Iterable[str] | None = None, kit: Kit | None = None) -> list[str]:
    """Run the named checks (default: all) and return the names of those that passed; the first failure (or error)
    raises AssertionError. A check that does not apply to the spec (`NotApplicable`, e.g. visual-token budgets for
    a family without them) is left out of the result and reported with a `ConformanceNotApplicable` warning."""
    kit = kit or make_kit(spec_cls, make_model, make_processor)
    names = list(checks) if checks is not None else list(CHECKS)
    unknown = set(names) - set(CHECKS)
    if unknown:
        raise ValueError(f"unknown checks {sorted(unknown)}; available: {sorted(CHECKS)}")
    resolved = type(get_spec(kit.model))
    if resolved is not spec_cls:
        raise AssertionError(f"model_type {kit.model.config.model_type!r} resolves to {resolved.__name__}, not "
                             f"{spec_cls.__name__}; register the spec (qz.register_backbone) before checking it")
    passed = []
    for name in names:
        try:
            CHECKS[name](kit)
        except NotApplicable as why:
            warnings.warn(f"{spec_cls.__name__}: conformance check {name!r} is not applicable: {why}",
                          ConformanceNotApplicable, stacklevel=2)
            continue
        except Exception as err:  # an error inside a check is a failure of that check
            raise AssertionError(f"{spec_cls.__name__} fails conformance check {name!r}: "
                                 f"{type(err).__name__}: {err}") from err
        passed.append(name)
    return passed


class ConformanceNotApplicable(UserWarning):
    """A conformance check that does not apply to the spec was not run (it did not pass)."""


__all__ = ["CHECKS", "ConformanceNotApplicable", "Kit", "NotApplicable", "make_kit", "run_conformance", "raises",
           "synthetic_image", "default_model_factory"]
