"""The entry point lmms-eval reads (group `lmms_eval.models` in pyproject.toml): `--model qzoom`."""
from __future__ import annotations

MODEL_ID = "qzoom"
CLASS_PATH = "qzoom_adapters.benchmarks.lmms.model.QZoomLMM"


def model_manifest():
    """The `ModelManifest` lmms-eval registers at start-up (a simple model: doc_to_visual + doc_to_text)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
