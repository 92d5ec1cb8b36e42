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


def _released(spec_cls, path, prefix: str, nested_fields: bool):
    """A tiny model saved with Q-Zoom tensors under `prefix` and the reference's config fields."""
    torch.manual_seed(11)
    model = spec_cls.model_class()._from_config(spec_cls.tiny_config()).eval()
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
