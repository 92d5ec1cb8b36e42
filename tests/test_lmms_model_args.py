"""The `qzoom` lmms-eval model's arguments: checked before anything loads, one line for each mistake (no lmms-eval
needed: the checks live in `benchmarks/lmms/model_args.py`)."""
from __future__ import annotations

import pytest
import torch

import qzoom_adapters as qz
from qzoom_adapters.backbones.qwen3_vl import Qwen3VLSpec
from qzoom_adapters.benchmarks.lmms.model_args import ModelArgsError, parse_model_args
from qzoom_adapters.benchmarks.zoomworld.shipped import DEFAULT_DIR

MODEL, ADAPTERS = str(DEFAULT_DIR / "model"), str(DEFAULT_DIR)


@pytest.fixture(scope="module")
def qwen3_adapters(tmp_path_factory):
    torch.manual_seed(0)
    model = Qwen3VLSpec.model_class()._from_config(Qwen3VLSpec.tiny_config()).eval()
    out = tmp_path_factory.mktemp("qwen3_adapters")
    qz.QZoom(model, None, twig=qz.TwigRPN.from_backbone(model, 2, 2)).save_pretrained(out)
    return str(out)


def test_good_args_as_lmms_eval_passes_them():
    # lmms-eval parses "gate_threshold=0.05,budget=64" into a float and an int, and adds batch_size (a string from
    # its command line), max_batch_size and device
    args = parse_model_args({"pretrained": MODEL, "adapters": ADAPTERS, "gate_threshold": 0.05, "budget": 64,
                             "batch_size": "4", "max_batch_size": None, "device": "cpu"})
    assert args.batch_size == 4 and args.budget == 64 and args.device == "cpu"
    assert args.zoom_overrides() == {"gate_threshold": 0.05}  # only what was given replaces the saved settings
    assert parse_model_args({"pretrained": MODEL, "adapters": ADAPTERS}).zoom_overrides() == {}
    assert parse_model_args({"pretrained": MODEL, "adapters": ADAPTERS,
                             "roi_region": "largest"}).zoom_overrides() == {"roi_region": "largest"}


@pytest.mark.parametrize("raw,words", [
    ({"bogus": 1}, "unknown model arg 'bogus' (known: pretrained, adapters"),
    ({"gate_threshold": "abc"}, "model arg gate_threshold='abc'"),
    ({"budget": 64.5}, "model arg budget=64.5"),
    ({"max_pixels": "many"}, "model arg max_pixels='many'"),
    ({"dtype": "int8"}, "model arg dtype='int8'"),
    ({"device": "tpu"}, "'tpu' is not cpu, cuda, cuda:N or auto"),
    ({"roi_threshold": 15}, "model arg roi_threshold=15"),
    ({"roi_region": "biggest"}, "model arg roi_region='biggest'"),
    ({"budget": 64, "max_pixels": 1000}, "either budget= (visual tokens) or min_pixels=/max_pixels="),
    ({"min_pixels": 2000, "max_pixels": 1000}, "min_pixels=2000 exceeds max_pixels=1000"),
    ({"adapters": "/nowhere"}, "adapters=/nowhere is not a folder"),
    ({"pretrained": "/nowhere"}, "pretrained=/nowhere is not a folder"),
    ({"adapters": MODEL}, "no adapter_config.json there"),
])
def test_bad_args_fail_in_one_line(raw, words):
    with pytest.raises(ModelArgsError) as err:
        parse_model_args({"pretrained": MODEL, "adapters": ADAPTERS, **raw})
    message = str(err.value)
    assert words in message and "\n" not in message
    assert err.value.code == f"qzoom: {message}"  # what the interpreter prints when nobody catches it


def test_missing_arguments_name_the_fix():
    with pytest.raises(ModelArgsError, match="'adapters' is required: a folder written by QZoom.save_pretrained"):
        parse_model_args({"pretrained": MODEL})
    with pytest.raises(ModelArgsError, match="model arg 'pretrained' is required"):
        parse_model_args({"adapters": ADAPTERS})


def test_adapters_of_another_family_fail_before_loading(qwen3_adapters):
    with pytest.raises(ModelArgsError) as err:
        parse_model_args({"pretrained": MODEL, "adapters": qwen3_adapters})
    assert str(err.value) == (f"adapters={qwen3_adapters} were saved for 'qwen3_vl' (model_type 'qwen3_vl') but "
                              f"pretrained={MODEL} is 'qwen2_5_vl' (model_type 'qwen2_5_vl'); pass the adapters "
                              "trained for this model")

