"""Old name of `qzoom_adapters.compat`, kept so existing `from qzoom_adapters.backbones import _compat` keeps working.

New code imports `qzoom_adapters.compat`. This module *is* that module (one object, so a test that
monkeypatches a name through either import sees the same change).
"""
import sys

from qzoom_adapters import compat

sys.modules[__name__] = compat
