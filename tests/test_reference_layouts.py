"""`from_reference_checkpoint` on checkpoints written in the released layouts (SPEC §6), per family."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import qzoom_adapters as qz
from qzoom_adapters.backbones.qwen2_5_vl import Qwen2_5_VLSpec
from qzoom_adapters.backbones.qwen3_vl import Qwen3VLSpec

K, T = 3, 3


def _released(spec_cls, path, prefix: str, nested_fields: bool, dtype=torch.float32):
    """A tiny model saved (in `dtype`) with Q-Zoom tensors under `prefix` and the reference's config fields."""
    torch.manual_seed(11)
    model = spec_cls.model_class()._from_config(spec_cls.tiny_config()).to(dtype).eval()
    twig = qz.TwigRPN.from_backbone(model, K, T)
    gate = qz.DynamicGate.from_backbone(model, K, T)
    with torch.no_grad():
        for p in list(twig.parameters()) + list(gate.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path)
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    tensors.update({f"{prefix}twig_{k}": v for k, v in twig.state_dict().items()})  # twig_layers.{i}.*
    tensors.update({f"{prefix}high_res_{k}": v for k, v in gate.state_dict().items()})  # high_res_layers / high_res_head
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(file), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    fields = {"enable_twig": True, "twig_K": K, "twig_T": T, "enable_high_res": True, "high_res_K": K,
              "high_res_T": T, "reuse_src_pos": True, "high_res_thresh": 0.1, "roi_conf_thresh": 0.2}
    if nested_fields:
        cfg["text_config"].update(fields)
    else:
        cfg.update(fields)
    (path / "config.json").write_text(json.dumps(cfg))
    return model, twig, gate


@pytest.mark.parametrize("spec_cls,prefix,nested", [
    (Qwen3VLSpec, "model.language_model.", False),
    (Qwen3VLSpec, "model.language_model.", True),
    (Qwen2_5_VLSpec, "model.", False),
], ids=["qwen3-top", "qwen3-nested", "qwen25-legacy"])
@torch.no_grad()
def test_released_layout_round_trip(spec_cls, prefix, nested, tmp_path, request):
    kit = request.getfixturevalue("qwen3" if spec_cls is Qwen3VLSpec else "qwen25")
    model, twig, gate = _released(spec_cls, tmp_path, prefix, nested)
    zoom = qz.QZoom.from_reference_checkpoint(tmp_path, kit.processor)
    assert zoom.config.position_mode == "aligned" and zoom.config.gate_threshold == 0.1
    assert zoom.config.roi_threshold == pytest.approx(0.2)
    for ours, ref in ((zoom.twig, twig), (zoom.gate, gate)):
        for (n, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
            assert torch.equal(a, b), n
    direct = qz.QZoom(model, kit.processor, twig=twig, gate=gate, config=zoom.config.model_copy(update={"gate_threshold": 0.0}))
    zoom.config = direct.config
    a = zoom.generate(kit.images[:2], kit.questions[:2], max_new_tokens=3)
    b = direct.generate(kit.images[:2], kit.questions[:2], max_new_tokens=3)
    assert [(o.tokens, o.bbox) for o in a] == [(o.tokens, o.bbox) for o in b]


# --- dtype and placement (issue 17: released checkpoints at real scale) ----------------------------------------
@pytest.fixture(scope="module")
def bf16_release(tmp_path_factory):
    """A Qwen2.5-VL checkpoint released in bf16, in the transformers 4.51 layout (`model.layers.*`)."""
    path = tmp_path_factory.mktemp("bf16_release")
    model, twig, gate = _released(Qwen2_5_VLSpec, path, "model.", False, dtype=torch.bfloat16)
    assert {t.dtype for t in load_file(str(path / "model.safetensors")).values()} == {torch.bfloat16}
    return path, model, twig, gate


def _dtypes(zoom) -> set:
    return {p.dtype for m in (zoom.model, zoom.twig, zoom.gate) for p in m.parameters()}


def test_a_bf16_release_loads_in_bf16_by_default_and_in_fp32_when_asked(bf16_release, qwen25):
    path, model, twig, gate = bf16_release
    own = qz.QZoom.from_reference_checkpoint(path, qwen25.processor)
    assert _dtypes(own) == {torch.bfloat16}
    for ours, ref in ((own.model, model), (own.twig, twig), (own.gate, gate)):
        for (n, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
            assert torch.equal(a, b), n
    for kwargs in ({"torch_dtype": torch.float32}, {"torch_dtype": "float32"}, {"dtype": "float32"},
                   {"dtype": torch.float32, "torch_dtype": "auto"}):
        wide = qz.QZoom.from_reference_checkpoint(path, qwen25.processor, **kwargs)
        assert _dtypes(wide) == {torch.float32}, kwargs
        for ours, ref in ((wide.model, own.model), (wide.twig, own.twig), (wide.gate, own.gate)):
            for (n, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
                assert torch.equal(a, b.float()), n  # bf16 values widen exactly


@torch.no_grad()
def test_device_map_cpu_gives_the_same_answers_as_the_default_load(bf16_release, qwen25, one_thread):
    path = bf16_release[0]
    runs = {}
    for name, kwargs in (("default", {}), ("device_map", {"device_map": "cpu"}), ("dict", {"device_map": {"": "cpu"}}),
                         ("device", {"device": torch.device("cpu")})):
        zoom = qz.QZoom.from_reference_checkpoint(path, qwen25.processor, dtype="float32", gate_threshold=0.0, **kwargs)
        assert {p.device.type for m in (zoom.model, zoom.twig, zoom.gate) for p in m.parameters()} == {"cpu"}
        outs = zoom.generate(qwen25.images[:2], qwen25.questions[:2], max_new_tokens=3, return_trace=True)
        assert all(o.zoomed for o in outs), name
        runs[name] = outs
    for name, outs in runs.items():
        for a, b in zip(outs, runs["default"]):
            assert (a.tokens, a.bbox) == (b.tokens, b.bbox), name
            assert torch.equal(a.trace["first_logits"], b.trace["first_logits"]), name


@pytest.mark.parametrize("kwargs,match", [
    ({"torch_dtype": "int8"}, "torch_dtype='int8' is not \"auto\" or a floating torch dtype"),
    ({"dtype": "bf16"}, "dtype='bf16' is not \"auto\" or a floating torch dtype"),
    ({"torch_dtype": torch.int64}, "torch_dtype=torch.int64 is not"),
    ({"torch_dtype": "float16", "dtype": "float32"}, "pass torch_dtype= or dtype="),
    ({"device": "tpu"}, "device='tpu' is not cpu, cuda, cuda:N or auto"),
    ({"device_map": "gpu"}, "device_map='gpu' is not cpu, cuda, cuda:N or auto"),
    ({"device_map": {"": -1}}, "device_map\\[''\\]=-1 is not a CUDA device index"),
    ({"device_map": {"model": "auto"}}, "device_map\\['model'\\]='auto' is not a device"),
    ({"device_map": {}}, "names no module"),
    ({"device": "cpu", "device_map": "auto"}, "either device= or device_map="),
])
def test_bad_dtype_or_placement_is_one_clear_error_before_anything_loads(tmp_path, kwargs, match):
    with pytest.raises(qz.QZoomError, match=match) as err:
        qz.QZoom.from_reference_checkpoint(tmp_path / "nowhere", **kwargs)  # checked before the folder is read
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("kwargs", [{"device": "cuda"}, {"device_map": "cuda:0"}, {"device_map": {"": 0}}])
def test_cuda_placement_without_cuda_says_so(bf16_release, kwargs):
    with pytest.raises(qz.QZoomError, match="no CUDA device is available here"):
        qz.QZoom.from_reference_checkpoint(bf16_release[0], **kwargs)


def test_qzoom_infer_reference_dtype_checkpoint_answers_as_the_python_api(bf16_release, qwen25, tmp_path, capsys):
    from qzoom_adapters.recipes.cli import main

    path = bf16_release[0]
    qwen25.processor.save_pretrained(tmp_path / "processor")
    qwen25.images[0].save(tmp_path / "img.png")
    zoom = qz.QZoom.from_reference_checkpoint(path, qwen25.processor, gate_threshold=0.0)
    expected = zoom.generate([qwen25.images[0]], [qwen25.questions[0]], max_new_tokens=3)[0]
    assert expected.zoomed and _dtypes(zoom) == {torch.bfloat16}
    rc = main(["infer", "--reference", str(path), "--processor", str(tmp_path / "processor"), "--image",
               str(tmp_path / "img.png"), "--question", qwen25.questions[0], "--max-new-tokens", "3",
               "--gate-threshold", "0", "--device", "cpu", "--dtype", "checkpoint"])
    out = capsys.readouterr().out
    assert rc == 0 and f"zoomed=True box={expected.bbox}" in out and out.rstrip("\n").endswith(expected.text)


@pytest.fixture
def no_tf32():
    """fp32 on the GPU as on the CPU (TF32 would round the vision tower's convolution and the matmuls)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@torch.no_grad()
def test_on_a_gpu_every_weight_lands_there_and_answers_match_the_cpu(bf16_release, qwen25, no_tf32):
    path = bf16_release[0]
    cpu = qz.QZoom.from_reference_checkpoint(path, qwen25.processor, dtype="float32", gate_threshold=0.0)
    ref = cpu.generate(qwen25.images[:2], qwen25.questions[:2], max_new_tokens=3, return_trace=True)
    for kwargs in ({"device": "cuda"}, {"device_map": "cuda:0"}, {"device_map": {"": 0}}, {"device_map": "auto"}):
        gpu = qz.QZoom.from_reference_checkpoint(path, qwen25.processor, dtype="float32", gate_threshold=0.0,
                                                 **kwargs)
        assert {str(p.device) for m in (gpu.model, gpu.twig, gpu.gate) for p in m.parameters()} == {"cuda:0"}, kwargs
        outs = gpu.generate(qwen25.images[:2], qwen25.questions[:2], max_new_tokens=3, return_trace=True)
        for a, b in zip(outs, ref):
            assert (a.zoomed, a.bbox) == (b.zoomed, b.bbox), kwargs
            torch.testing.assert_close(a.trace["first_logits"].cpu(), b.trace["first_logits"], rtol=1e-3, atol=1e-3)
    own = qz.QZoom.from_reference_checkpoint(path, qwen25.processor, device="cuda:0")
    assert _dtypes(own) == {torch.bfloat16}
