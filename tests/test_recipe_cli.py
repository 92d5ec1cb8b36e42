"""The shipped recipe configs hold SPEC §4 numbers, and every `qzoom` recipe command runs its --help example."""
import json
import re
import shlex
from pathlib import Path

import pytest

from qzoom_adapters.recipes.cli import build_parser, main
from qzoom_adapters.recipes.config import load_config
from qzoom_adapters.errors import QZoomError

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"


@pytest.mark.parametrize("name,K,textual,natural,natural_sink", [
    ("qwen2_5_vl_7b", 18, {22: [1, 4], 23: [6, 11]}, {16: [1, 7, 17], 19: [17, 20]}, {9: [4, 22]}),
    ("qwen2_5_vl_3b", 24, {20: [1, 4], 22: [14]}, {21: [9, 11], 22: [0, 7]}, {8: [1, 13]}),
    ("qwen3_vl_4b", 24, {19: [24, 27], 24: [21, 23]}, {20: [15, 21, 23], 21: [8, 10, 11]}, {20: [1, 24]}),
    ("llava_1_5_7b", 15, {14: [13, 24, 26]}, {14: [13, 24, 26]}, {}),
])
def test_shipped_configs_hold_spec_defaults(name, K, textual, natural, natural_sink):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert (cfg.K, cfg.T) == (K, 3)
    lab = cfg.labels_stage1
    assert (lab.grid, lab.max_new_tokens) == (24, 128)
    assert (lab.textual_pairs, lab.natural_pairs, lab.natural_sink_pairs) == (textual, natural, natural_sink)
    t = cfg.stage1.train
    assert (t.lr, t.weight_decay, tuple(t.betas), t.warmup_ratio, t.grad_clip, t.effective_batch, t.epochs) == (
        1e-4, 0.0, (0.9, 0.999), 0.03, 1.0, 128, 1)
    assert cfg.stage2.train.lr == 1e-6 and cfg.stage2.box_noise == 0.8
    if name == "qwen3_vl_4b":
        assert lab.textual_sink_pairs == {24: [6, 10]}
    if cfg.stage3 is not None:
        assert cfg.stage3.train.lr == 1e-4 and cfg.stage3.p_hard == 0.9
    assert cfg.model.path.startswith("hf:")


def test_config_errors_are_clear(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("model: {path: m}\nK: 3\nstage1: {labels: l, out: o, trian: {}}\n")
    with pytest.raises(QZoomError, match=r"stage1\.trian"):
        load_config(bad)
    with pytest.raises(QZoomError, match="no config file"):
        load_config(tmp_path / "missing.yaml")
    good = tmp_path / "g.yaml"
    good.write_text("model: {path: m}\nK: 3\nstage1: {labels: l, out: o}\n")
    cfg = load_config(good, ["stage1.train.max_steps=7", "K=5"])
    assert cfg.stage1.train.max_steps == 7 and cfg.K == 5
    assert cfg.stage1.labels == str((tmp_path / "l").resolve())  # relative to the YAML file


def _examples():
    """(command, example) from every sub-command's --help text, in the order a user runs them."""
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices
    found = {}
    for name, p in sub.items():
        nested = [a for a in p._actions if a.__class__.__name__ == "_SubParsersAction"]
        for q in (nested[0].choices.values() if nested else [p]):
            m = re.search(r"Example[^\n]*:\s*\n?\s*(qzoom [^\n]+)", q.description or "")
            if m:
                found[q.prog] = m.group(1).strip()
    return found


def test_every_recipe_command_runs_its_help_example(tmp_path, monkeypatch):
    examples = _examples()
    order = ["qzoom tiny", "qzoom labels stage1", "qzoom train stage1", "qzoom heads", "qzoom mine",
             "qzoom train stage2", "qzoom labels stage3", "qzoom train stage3"]
    assert set(order) <= set(examples), sorted(examples)
    monkeypatch.chdir(tmp_path)
    for prog in order:
        argv = shlex.split(examples[prog])[1:]
        assert main(argv) == 0, prog
    for stage in ("stage1", "stage2", "stage3"):
        done = json.loads((tmp_path / "tiny" / "runs" / stage / "training_complete.json").read_text())
        assert done["finished"] and done["step"] >= 1
    assert (tmp_path / "tiny" / "runs" / "stage3" / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "tiny" / "heads.json").read_text())
