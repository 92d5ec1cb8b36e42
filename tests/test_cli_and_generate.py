"""`generate()` through a processor, `qzoom demo`, `qzoom infer`, and reference key mapping."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from PIL import Image

import qzoom_adapters as qz
from qzoom_adapters.backbones.qwen2_5_vl import Qwen2_5_VLSpec
from qzoom_adapters.backbones.tiny_processor import TINY_VOCAB_SIZE, tiny_qwen2_5_vl_processor
from qzoom_adapters.benchmarks.zoomworld.shipped import demo_samples, load_default, write_untrained_default
from qzoom_adapters.errors import QZoomError
from qzoom_adapters.testing import synthetic_image
from qzoom_adapters.recipes.cli import main


def _tiny_chat_model():
    torch.manual_seed(3)
    cfg = Qwen2_5_VLSpec.tiny_config(text={"vocab_size": TINY_VOCAB_SIZE})
    model = Qwen2_5_VLSpec.model_class()._from_config(cfg).eval()
    model.generation_config.eos_token_id = 2
    return model


@torch.no_grad()
def test_generate_equals_generate_from_inputs():
    model, proc = _tiny_chat_model(), tiny_qwen2_5_vl_processor()
    zoom = qz.QZoom(model, proc, twig=qz.TwigRPN.from_backbone(model, 3, 3), gate=qz.DynamicGate.from_backbone(model, 3, 3),
                    config=qz.ZoomConfig(gate_threshold=0.0, roi_threshold=0.0))
    images = [synthetic_image(300, 200, 4), synthetic_image(200, 260, 5)]
    questions = ["What is written on the red plate?", "How many plates?"]
    outs = zoom.generate(images, questions, max_new_tokens=5)
    inputs = zoom.spec.chat_inputs(proc, images, questions)
    again = zoom.generate_from_inputs(inputs, images, max_new_tokens=5)
    assert [o.tokens for o in outs] == [o.tokens for o in again]
    assert all(o.zoomed and isinstance(o.text, str) for o in outs)
    assert outs[0].text == proc.tokenizer.decode(outs[0].tokens, skip_special_tokens=True)


@pytest.fixture(scope="module")
def untrained_default(tmp_path_factory):
    return write_untrained_default(tmp_path_factory.mktemp("default"))


def test_demo_runs_and_writes_pictures(untrained_default, tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(untrained_default), "--out", str(out), "--samples", "3"]) == 0
    text = capsys.readouterr().out
    samples = demo_samples(3)
    assert [s.family for s in samples] == ["detail", "global", "detail"]
    assert sorted(p.name for p in out.glob("*.png")) == ["sample_0.png", "sample_1.png", "sample_2.png"]
    for i, s in enumerate(samples):
        with Image.open(out / f"sample_{i}.png") as png:
            assert png.width == s.image.width and png.height > s.image.height  # the caption band below
        block = text.split(f"[{i + 1}/3] {s.id} ({s.family}) {s.question}\n", 1)[1]
        gate_line, answer_line = block.splitlines()[:2]
        assert "gate=" in gate_line and "zoomed=" in gate_line
        assert "answer=" in answer_line and f"truth={s.answer!r}" in answer_line and f"sample_{i}.png" in answer_line
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"n", "budget", "accuracy", "detail_accuracy", "global_accuracy", "zoom_rate_detail",
                            "zoom_rate_global", "mean_visual_tokens", "seconds", "answers"}
    assert (summary["n"], summary["budget"]) == (3, 64)
    answers = summary["answers"]
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    _assert_scored(summary, text, samples)
    # the untrained model answers everything wrong; make two truths its own answers (upper case, a full stop:
    # the normalisation must see through both) and the scores must move to exactly 2/3, 1/2 and 1/1
    from qzoom_adapters.benchmarks.zoomworld import shipped

    rigged = [dataclasses.replace(s, answer=a.upper() + ".") if i < 2 else s
              for i, (s, a) in enumerate(zip(samples, answers))]
    monkeypatch.setattr(shipped, "demo_samples", lambda n, start=0: rigged[:n])
    assert main(["demo", "--model", str(untrained_default), "--out", str(tmp_path / "demo2"), "--samples", "3"]) == 0
    text2 = capsys.readouterr().out
    summary2 = json.loads((tmp_path / "demo2" / "summary.json").read_text())
    assert summary2["answers"] == answers and _norm(answers[2]) != _norm(samples[2].answer)
    _assert_scored(summary2, text2, rigged)
    assert (summary2["accuracy"], summary2["detail_accuracy"], summary2["global_accuracy"]) == \
        pytest.approx((2 / 3, 1 / 2, 1.0))


def _assert_scored(summary, text, samples):
    """accuracy (all, per family) == share of the answers that exact-match their truths; printed lines agree."""
    answers = summary["answers"]
    right = [_norm(a) == _norm(s.answer) != "" for a, s in zip(answers, samples)]
    for s, a, ok in zip(samples, answers, right):
        assert f"answer={a!r} truth={s.answer!r} {'correct' if ok else 'wrong'} -> " in text
    assert summary["accuracy"] == pytest.approx(sum(right) / len(right))
    for fam in ("detail", "global"):
        mine = [ok for ok, s in zip(right, samples) if s.family == fam]
        assert summary[f"{fam}_accuracy"] == pytest.approx(sum(mine) / len(mine))
    assert f"summary: n={len(samples)} accuracy={summary['accuracy']:.2f} (detail {summary['detail_accuracy']:.2f}, " \
           f"global {summary['global_accuracy']:.2f})" in text


def _norm(text):
    """ZoomWorld's exact-match normalisation, written out: lower case, letters and digits only."""
    return "".join(c for c in text.lower() if c.isascii() and c.isalnum())


def test_demo_norm_matches_scoring():
    from qzoom_adapters.benchmarks.zoomworld.scoring import exact_match

    for pred, truth in (("Red.", "red"), ("A-7 Q", "a7q"), ("red", "blue"), ("", ""), ("ÄB", "b")):
        assert exact_match(pred, truth) == (_norm(pred) == _norm(truth) != "")


def test_demo_without_a_default_says_how_to_get_one(tmp_path, capsys):
    assert main(["demo", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert "no ZoomWorld default" in err and "train it with benchmarks/zoomworld" in err
    with pytest.raises(QZoomError, match="adapter_config.json"):
        load_default(tmp_path)


def test_infer_from_saved_files(tmp_path, capsys):
    model, proc = _tiny_chat_model(), tiny_qwen2_5_vl_processor()
    model.save_pretrained(tmp_path / "model")
    proc.save_pretrained(tmp_path / "model")
    zoom = qz.QZoom(model, proc, twig=qz.TwigRPN.from_backbone(model, 3, 3), gate=qz.DynamicGate.from_backbone(model, 3, 3),
                    config=qz.ZoomConfig(gate_threshold=0.0, roi_threshold=0.0))
    zoom.save_pretrained(tmp_path / "adapters")
    img = synthetic_image(300, 200, 6)
    img.save(tmp_path / "img.png")
    expected = zoom.generate([img], ["What is written?"], max_new_tokens=6)[0]
    rc = main(["infer", "--adapters", str(tmp_path / "adapters"), "--model", str(tmp_path / "model"),
               "--image", str(tmp_path / "img.png"), "--question", "What is written?", "--max-new-tokens", "6",
               "--heatmap", str(tmp_path / "heat.png")])
    out = capsys.readouterr().out
    assert rc == 0 and f"zoomed=True box={expected.bbox}" in out and expected.text in out
    assert (tmp_path / "heat.png").is_file()


def test_reference_key_mapping_for_old_layouts():
    """The family's own renames (BackboneSpec.checkpoint_key_renames) map the transformers <= 4.51 layout."""
    from qzoom_adapters.io import map_checkpoint_keys
    from qzoom_adapters.spec import get_spec

    model = _tiny_chat_model()
    own = set(model.state_dict())
    old = ["model.layers.0.self_attn.q_proj.weight", "visual.blocks.0.norm1.weight", "lm_head.weight",
           "model.embed_tokens.weight", "model.twig_layers.0.mlp.up_proj.weight"]
    mapping = map_checkpoint_keys(type(get_spec(model)), old, own)
    assert mapping["model.layers.0.self_attn.q_proj.weight"] == "model.language_model.layers.0.self_attn.q_proj.weight"
    assert mapping["visual.blocks.0.norm1.weight"] == "model.visual.blocks.0.norm1.weight"
    assert mapping["model.embed_tokens.weight"] in own and mapping["lm_head.weight"] == "lm_head.weight"
    assert "model.twig_layers.0.mlp.up_proj.weight" not in mapping
    # every key of the model, written in the old layout, maps back onto itself
    legacy = {k.replace("model.language_model.", "model.", 1).replace("model.visual.", "visual.", 1): k for k in own}
    assert map_checkpoint_keys(type(get_spec(model)), legacy, own) == legacy
