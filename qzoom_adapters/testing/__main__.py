"""`python -m qzoom_adapters.testing [module:SpecClass | family ...]`: run the conformance kit, one line per check."""
from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback

from ..spec import registered_families
from . import CHECKS, NotApplicable, make_kit


def _spec_class(name: str):
    if ":" in name:
        module, attr = name.split(":", 1)
        return getattr(importlib.import_module(module), attr)
    families = registered_families()
    if name not in families:
        raise SystemExit(f"unknown family {name!r}; registered: {sorted(families)} (or pass module:SpecClass)")
    return families[name]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qzoom_adapters.testing", description=__doc__)
    parser.add_argument("specs", nargs="*", help="module:SpecClass or a registered family (default: all registered)")
    parser.add_argument("--check", action="append", choices=sorted(CHECKS), help="run only these checks")
    args = parser.parse_args(argv)
    specs = [_spec_class(s) for s in args.specs] or list(registered_families().values())
    failed = not_applicable = 0
    for spec_cls in specs:
        kit = make_kit(spec_cls)
        for name in args.check or CHECKS:
            start = time.perf_counter()
            try:
                CHECKS[name](kit)
                status = "ok"
            except NotApplicable as why:  # not run for this spec: neither a pass nor a failure
                not_applicable += 1
                status = f"n/a ({why})"
            except Exception:  # report every check, then fail at the end
                failed += 1
                status = "FAILED\n" + traceback.format_exc(limit=3)
            print(f"{spec_cls.family:12s} {name:40s} {time.perf_counter() - start:5.1f}s  {status}", flush=True)
    na = f" ({not_applicable} not applicable)" if not_applicable else ""
    print(f"{failed} check(s) failed{na}" if failed else f"all checks passed{na}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
