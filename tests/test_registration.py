"""Registering a family from outside the package (entry point) and the kit's command line."""
from __future__ import annotations

import sys
import textwrap

import pytest
import torch

import qzoom_adapters as qz
from qzoom_adapters import spec as spec_module
from qzoom_adapters.testing.__main__ import main as kit_main
from qzoom_adapters.testing.checks import CHECKS


def test_entry_point_registers_an_outside_family(tmp_path, monkeypatch):
    (tmp_path / "my_vlm_spec.py").write_text(textwrap.dedent('''
        from qzoom_adapters.backbones.qwen2_vl import Qwen2VLSpec

        class MySpec(Qwen2VLSpec):
            family = "my_vlm"
            model_types = ("my_vlm",)
    '''))
    dist = tmp_path / "my_vlm_spec-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-vlm-spec\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[qzoom_adapters.backbones]\nmy_vlm = my_vlm_spec:MySpec\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(spec_module, "_entry_points_loaded", False)
    monkeypatch.setattr(spec_module, "_REGISTRY", dict(spec_module._REGISTRY))
    families = qz.registered_families()
    assert families["my_vlm"].__name__ == "MySpec"
    assert spec_module.spec_class_for("my_vlm") is families["my_vlm"]
    with pytest.raises(qz.QZoomError, match="no BackboneSpec is registered for model_type='nope'"):
        spec_module.spec_class_for("nope")
    sys.modules.pop("my_vlm_spec", None)


def test_register_backbone_needs_family_and_model_types():
    class Incomplete:
        family = "x"

    with pytest.raises(qz.QZoomError, match="model_types"):
        qz.register_backbone(Incomplete)


def test_kit_command_line_as_in_contributing(capsys):
    assert kit_main(["qzoom_adapters.backbones.qwen2_vl:Qwen2VLSpec"]) == 0
    out = capsys.readouterr().out
    assert out.count(" ok") == len(CHECKS) and "all checks passed" in out


class _ForgetsDeepstack:
    """A Qwen3-VL spec that drops the crop's deepstack features: the kit must notice."""

    def decoder_inputs(self, image_mask, features):
        return {}


class _InsertsBeforeTheImage:
    """A LLaVA spec that puts the RoI block before the global image: the kit must notice."""

    def roi_insert_index(self, ids):
        return int((ids == self.image_token_id).nonzero()[0])


@pytest.mark.parametrize("family,mixin,check", [
    ("qwen3_vl", _ForgetsDeepstack, "kv_reuse_equals_recompute"),
    ("llava", _InsertsBeforeTheImage, "roi_positions_follow_spec"),
])
def test_kit_catches_a_broken_spec(family, mixin, check, monkeypatch):
    from qzoom_adapters.testing import make_kit, run_conformance

    base = qz.registered_families()[family]
    broken = type(f"Broken{base.__name__}", (mixin, base), {})
    monkeypatch.setattr(spec_module, "_REGISTRY", {**spec_module._REGISTRY, family: broken})
    with pytest.raises(AssertionError, match=check):
        run_conformance(broken, checks=[check], kit=make_kit(broken))
    with pytest.raises(AssertionError, match="register the spec"):
        run_conformance(base, checks=[check], kit=make_kit(base))


def test_incomplete_spec_names_what_is_missing():
    from qzoom_adapters.backbones.base import VisionLanguageSpec

    class Half(VisionLanguageSpec):
        family, model_types = "half", ("half",)

        def token_grid(self, grid_row):
            return 1, 1

    with pytest.raises(TypeError, match="encode_images"):
        Half(torch.nn.Module())
