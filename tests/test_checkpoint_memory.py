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
    from qzoom_adapters.devices import loading_dtype, placement
    from qzoom_adapters.errors import QZoomError
    from qzoom_adapters.recipes.infer_command import _device_dtype

    assert placement(None, None) is None and placement("cpu", None) is None
    assert placement(None, "auto") == "auto" and placement("auto", None) == "auto"  # device maps pass through
    assert placement(None, "cpu") == {"": "cpu"} and placement(None, {"visual": "cpu", "model": "disk"}) == {
        "visual": "cpu", "model": "disk"}
    with pytest.raises(QZoomError, match="either device= or device_map="):
        placement("cpu", "auto")
    with pytest.raises(QZoomError, match="device='tpu' is not cpu, cuda, cuda:N or auto"):
        placement("tpu", None)
    if torch.cuda.is_available():
        assert placement("cuda", None) == {"": f"cuda:{torch.cuda.current_device()}"}
        assert placement(torch.device("cuda", 0), None) == {"": "cuda:0"} and placement(None, {"": 0}) == {"": 0}
    else:
        with pytest.raises(QZoomError, match="device=cuda:1: no CUDA device is available here; use device=cpu"):
            placement("cuda:1", None)
    assert loading_dtype("auto") == loading_dtype(None) == "auto" and loading_dtype("bfloat16") is torch.bfloat16
    assert loading_dtype("auto", dtype="torch.float16") is torch.float16
    assert loading_dtype(torch.float32) is torch.float32
    with pytest.raises(QZoomError, match="torch_dtype='int8' is not"):
        loading_dtype("int8")
    assert _device_dtype("cpu", "checkpoint") == (torch.device("cpu"), "auto")  # qzoom infer --dtype checkpoint


def test_the_command_runs_on_the_cpu_and_refuses_a_missing_gpu_in_one_line(tmp_path, capsys):
    from qzoom_adapters.benchmarks.checkpoint_memory import main

    small = ["--layers", "2", "--vocab", "1000", "--vision-depth", "1", "--intermediate", "512", "--K", "1", "--T", "1",
             "--dir", str(tmp_path)]
    assert main([*small, "--device", "cpu", "--out", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["device"] == "cpu" and report["gpu"] is None and report["cuda_peak_over_checkpoint"] is None
    assert report["peak_rss_after_reading"] >= report["peak_rss_during_load"] > report["baseline_rss"] > 0
    assert list(tmp_path.iterdir()) == [tmp_path / "report.json"]  # the temporary checkpoint is gone
    capsys.readouterr()
    for device, match in (("tpu", "--device 'tpu' is not cpu, cuda, cuda:N or auto"),
                          *([] if torch.cuda.is_available() else
                            [("cuda", "--device cuda: no CUDA device is available here; use --device cpu")])):
        with pytest.raises(SystemExit) as done:
            main([*small, "--device", device])
        err = capsys.readouterr().err.strip().splitlines()
        assert done.value.code == 2 and err[-1].endswith(f"error: {match}"), err
        assert list(tmp_path.iterdir()) == [tmp_path / "report.json"]  # refused before any checkpoint was written


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_the_gpu_the_checkpoint_is_held_once_there(checkpoint):
    path, facts = checkpoint
    once = measure(path, device="cuda:0")
    twice = measure(path, control=True, device="cuda:0")
    ratio = once["cuda_peak_after_reading"] / facts["checkpoint_bytes"]
    control = twice["cuda_peak_after_reading"] / facts["checkpoint_bytes"]
    assert once["cuda_peak_during_load"] <= once["cuda_peak_after_reading"]
    assert 0.95 < ratio < 1.25, f"GPU peak over the checkpoint's bytes: {ratio:.2f}"
    assert control > ratio + 0.7, f"the control (held twice) measured {control:.2f} against {ratio:.2f}"
    host = (once["peak_rss_after_reading"] - once["baseline_rss"]) / facts["checkpoint_bytes"]
    assert host < 1.25, f"the load passed {host:.2f}x the checkpoint through host memory"
