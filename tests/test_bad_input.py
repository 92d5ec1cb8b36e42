"""Bad adapter files and configs get a clear error (input errors are in the conformance kit)."""
from __future__ import annotations

import pytest
import torch

import qzoom_adapters as qz


@pytest.fixture(scope="module")
def zoom(qwen25):
    return qwen25.zoom(gate_threshold=0.0)


@pytest.fixture(scope="module")
def model(qwen25):
    return qwen25.model


def test_corrupt_adapter_file(zoom, tmp_path, model):
    zoom.save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(qz.QZoomError, match="corrupt"):
        qz.QZoom.from_pretrained(tmp_path, model=model)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(qz.QZoomError, match="not a valid adapter config"):
        qz.QZoom.from_pretrained(tmp_path, model=model)
    with pytest.raises(qz.QZoomError, match="no adapter_config.json"):
        qz.QZoom.from_pretrained(tmp_path / "missing", model=model)


def test_unknown_config_keys_warn_and_bad_values_fail():
    with pytest.warns(UserWarning, match="unknown keys"):
        cfg = qz.ZoomConfig.model_validate({"gate_threshold": 0.1, "from_the_future": 1})
    assert cfg.gate_threshold == 0.1
    with pytest.raises(ValueError):
        qz.ZoomConfig(position_mode="diagonal")
    with pytest.raises(ValueError):
        qz.ZoomConfig(blur_kernel=4)


def test_unregistered_model_fails_clearly():
    with pytest.raises(qz.QZoomError, match="has no `config.model_type`"):
        qz.get_spec(torch.nn.Linear(2, 2))
