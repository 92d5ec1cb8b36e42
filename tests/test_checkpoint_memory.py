"""Released checkpoints at real width: loaded once (peak host RSS ~ the checkpoint's bytes, not twice), in the
checkpoint's own dtype, adapter tensors read by key. The shape is Qwen2.5-VL-7B's hidden width and heads with fewer
layers and a narrower MLP and vocabulary, so the test stays at ~1 GB; `python -m
qzoom_adapters.benchmarks.checkpoint_memory` measures larger shapes."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from qzoom_adapters.benchmarks.checkpoint_memory import CheckpointShape, measure, write_checkpoint

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")

SHAPE = CheckpointShape(layers=4, vocab=4096, vision_depth=1, intermediate=4096, K=1, T=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt7b") / "ckpt"
    return path, write_checkpoint(path, SHAPE)


def test_checkpoint_is_held_once_and_the_measure_sees_a_second_copy(checkpoint):
    path, facts = checkpoint
    assert facts["checkpoint_bytes"] > 800e6 and len(facts["files"]) == 1
    once = measure(path)
    twice = measure(path, control=True)  # plus a second, materialised copy of every tensor
    ratio = (once["peak_rss_after_reading"] - once["baseline_rss"]) / facts["checkpoint_bytes"]
    control = (twice["peak_rss_after_reading"] - twice["baseline_rss"]) / facts["checkpoint_bytes"]
    assert once["peak_rss_during_load"] <= once["peak_rss_after_reading"]
    assert ratio < 1.25, f"peak RSS over the checkpoint's bytes: {ratio:.2f} (held more than once)"
    assert control > ratio + 0.7, f"the control (held twice) measured {control:.2f} against {ratio:.2f}"


def test_released_layout_loads_in_its_own_dtype_with_the_adapter_tensors(checkpoint):
    import qzoom_adapters as qz
    from safetensors import safe_open

    path, facts = checkpoint
    zoom = qz.QZoom.from_reference_checkpoint(path, torch_dtype="auto")
    assert {p.dtype for p in zoom.model.parameters()} == {torch.bfloat16}
    assert zoom.K == SHAPE.K and zoom.twig.T == zoom.gate.T == SHAPE.T
    assert zoom.config.gate_threshold == 0.02 and zoom.config.position_mode == "aligned"
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(path / index["model.twig_layers.1.mlp.down_proj.weight"]), "pt") as f:
        assert torch.equal(zoom.twig.layers[1].mlp.down_proj.weight, f.get_tensor("model.twig_layers.1.mlp.down_proj.weight"))
        assert torch.equal(zoom.gate.head.weight, f.get_tensor("model.high_res_head.weight"))
        # the backbone's decoder came from the legacy `model.layers.*` keys
        assert torch.equal(zoom.spec.layers[0].self_attn.q_proj.weight, f.get_tensor("model.layers.0.self_attn.q_proj.weight"))


def test_placement_and_dtype_arguments():
    from qzoom_adapters.errors import QZoomError
    from qzoom_adapters.io import _dtype_arg, _placement
    from qzoom_adapters.recipes.infer_command import _device_dtype

    assert _placement(None, None) is None and _placement("cpu", None) is None
    assert _placement("cuda:1", None) == {"": "cuda:1"} and _placement(torch.device("cuda", 0), None) == {"": "cuda:0"}
    assert _placement("auto", None) == "auto" and _placement(None, {"": 0}) == {"": 0}  # device maps pass through
    with pytest.raises(QZoomError, match="either device= or device_map="):
        _placement("cpu", "auto")
    with pytest.raises(QZoomError, match="'tpu' is not a torch device"):
        _placement("tpu", None)
    assert _dtype_arg("auto") == "auto" and _dtype_arg(None) == "auto" and _dtype_arg("bfloat16") is torch.bfloat16
    with pytest.raises(QZoomError, match="torch_dtype 'int8' is not"):
        _dtype_arg("int8")
    assert _device_dtype("cpu", "checkpoint") == (torch.device("cpu"), "auto")  # qzoom infer --dtype checkpoint
