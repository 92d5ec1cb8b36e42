"""Q-Zoom in lmms-eval: the `qzoom` model plugin (entry point `lmms_eval.models`), its arguments, a local ZoomWorld
task, the Q-Zoom benchmark suites and the `qzoom eval` runner. Only `model.py` and `manifest.py`'s function import
lmms-eval; nothing in the core does."""
