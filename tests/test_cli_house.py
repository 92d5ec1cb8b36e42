"""The CLI a new user meets (issue 18): help on every option with its default, `qzoom infer --budget/--device/
--dtype` checked before loading, the shipped default's README commands, progress from `qzoom bench zoomworld`,
and no warning noise from the tiny builders, the trainer or the packaging metadata."""
from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import textwrap
import tomllib
import warnings
from pathlib import Path

import pytest
import torch

from qzoom_adapters.benchmarks.zoomworld.shipped import DEFAULT_DIR
from qzoom_adapters.recipes.cli import _parsers, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_README = ROOT / "benchmarks" / "zoomworld" / "default" / "README.md"


# --- item 1: help, and the new infer options ------------------------------------------------------
def test_every_option_of_every_command_has_help_and_shows_its_default():
    parsers = list(_parsers(build_parser()))
    assert {"qzoom infer", "qzoom tiny", "qzoom train stage1", "qzoom bench zoomworld"} <= {p.prog for p in parsers}
    missing = [f"{p.prog} {a.option_strings or a.dest}" for p in parsers for a in p._actions
               if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert not missing, missing
    shown = {p.prog: " ".join(p.format_help().split()) for p in parsers}
    assert "longest answer, in tokens (default: 32)" in shown["qzoom infer"]
    assert "(default: auto)" in shown["qzoom infer"] and "--budget" in shown["qzoom infer"]
    assert "scenes (default: 0)" in shown["qzoom tiny"] and "(default: 8)" in shown["qzoom tiny"]
    assert "samples per generate call (default: 16)" in shown["qzoom bench zoomworld"]


@pytest.mark.parametrize("flag, value, words", [
    ("--budget", "0", "--budget must be at least 1"),
    ("--budget", "-3", "--budget must be at least 1"),
    ("--device", "tpu", "--device 'tpu' is not cpu, cuda, cuda:N or auto"),
    ("--device", "cuda:x", "is not cpu, cuda, cuda:N or auto"),
    ("--dtype", "int8", "--dtype 'int8' is not one of auto, checkpoint, float32, bfloat16, float16"),
])
def test_infer_budget_device_dtype_fail_in_one_line_before_loading(tmp_path, capsys, flag, value, words):
    # no model, adapters or image exist: any of them checked first would give another message
    rc = main(["infer", "--model", str(tmp_path / "no-model"), "--adapters", str(tmp_path / "no-adapters"),
               "--image", str(tmp_path / "no.png"), "--question", "q", flag, value])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and words in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_infer_cuda_without_cuda_says_so_before_loading(tmp_path, capsys):
    rc = main(["infer", "--model", str(tmp_path), "--adapters", str(tmp_path), "--image", "x.png", "--question", "q",
               "--device", "cuda:1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "no CUDA device" in err


# --- item 2: the shipped default's README, run as written -------------------------------------------
def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DEFAULT_README.read_text(), flags=re.S)


def test_default_readme_python_snippets_run(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the README's paths are relative to the repository root
    snippets = _blocks("python")
    assert len(snippets) == 2
    for code in snippets:
        scope: dict = {}
        exec(compile(code, str(DEFAULT_README), "exec"), scope)
        zoom = scope["zoom"]
        assert type(zoom.processor).__name__ == "TinyQwen2_5_VLProcessor"  # a processor, not a bare tokenizer
        assert zoom.twig is not None and zoom.gate is not None
    printed = capsys.readouterr().out
    assert "-> " in printed and "truth:" in printed and "visual tokens" in printed


def test_default_readme_infer_command_runs_at_the_budget(tmp_path, monkeypatch, capsys):
    lines = _blocks("bash")[0].replace("\\\n", " ").splitlines()
    make_scene = next(line for line in lines if line.startswith("python -c"))
    infer = next(line for line in lines if line.startswith("qzoom infer"))
    assert "--budget 64" in infer
    monkeypatch.chdir(tmp_path)
    exec(shlex.split(make_scene)[2], {})
    assert (tmp_path / "scene.png").is_file()
    argv = shlex.split(infer.replace("benchmarks/zoomworld/default", str(DEFAULT_DIR)))[1:]
    assert main(argv + ["--gate-threshold", "0"]) == 0  # zoom: the crop is read at the budget too
    out = capsys.readouterr().out
    tokens = int(re.search(r"zoomed=True .*visual_tokens=(\d+)", out).group(1))
    assert 64 < tokens <= 2 * 64  # 64 for the global view + at most 64 for the crop (default view: 256)


# --- item 3: the bench shows progress ---------------------------------------------------------------
def test_bench_zoomworld_shows_progress_per_configuration(tmp_path, monkeypatch, capsys):
    from qzoom_adapters.benchmarks.zoomworld import bench

    monkeypatch.setattr(bench, "git_commit", lambda: None)
    monkeypatch.setattr(bench, "QUICK", {"n": 1, "baseline": (16,), "qzoom": (16,)})  # the smallest smoke run
    assert main(["bench", "zoomworld", "--quick", "--out", str(tmp_path / "b.json")]) == 0
    err = capsys.readouterr().err
    assert "n=1 test samples, 2 configurations" in err.splitlines()[0]
    assert re.search(r"\[1/2\] baseline at 16 visual tokens: 100%.*\b1/1\b", err), err
    # the Q-Zoom bar also counts the box-only run on detail questions the gate skipped
    assert re.search(r"\[2/2\] Q-Zoom at 16 visual tokens: 100%.*\b(\d)/\1\b", err), err


# --- item 4: no warning noise ------------------------------------------------------------------------
NOISE = ("bos_token_id must be", "eos_token_id must be", "key=rope_scaling", "Unrecognized keys in `rope_parameters`",
         "`rope_scaling` is deprecated", "Missing validation function",
         "lr_scheduler.step()", "project.license")

_BUILD_SCRIPT = textwrap.dedent("""
    import json, logging, sys, warnings
    messages = []

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_warning()
        logging.getLogger("transformers").addHandler(Keep())
        from qzoom_adapters.recipes.cli import main
        from qzoom_adapters.recipes.models import load_backbone
        from qzoom_adapters.spec import registered_families
        from qzoom_adapters.benchmarks.zoomworld.model import new_model
        assert main(["tiny", "--out", sys.argv[1]]) == 0
        load_backbone(sys.argv[1] + "/model", device="cpu")
        for spec_cls in registered_families().values():
            if hasattr(spec_cls, "tiny_config"):
                spec_cls.model_class()._from_config(spec_cls.tiny_config())
        new_model(0)
    print("MESSAGES=" + json.dumps(messages + [str(w.message) for w in caught]))
""")


def test_tiny_builds_are_quiet(tmp_path):
    # a fresh process: transformers prints some of these once per process (`warning_once`)
    run = subprocess.run([sys.executable, "-c", _BUILD_SCRIPT, str(tmp_path / "tiny")], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    messages = json.loads(run.stdout.split("MESSAGES=", 1)[1])
    noisy = [m for m in messages if any(n in m for n in NOISE)]
    assert not noisy, noisy
    assert not any(n in run.stderr for n in NOISE), run.stderr[-3000:]


def test_package_license_is_an_spdx_expression():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0" and meta["project"]["license-files"] == ["LICENSE"]
    assert any(re.fullmatch(r"setuptools>=(\d+)", r) and int(r.split(">=")[1]) >= 77
               for r in meta["build-system"]["requires"])
    assert (ROOT / "LICENSE").is_file()
