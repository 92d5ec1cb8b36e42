"""`qzoom eval`: presets equal SPEC §2, arguments and missing datasets fail in one line before anything loads, and on
the local ZoomWorld task the runner's rows equal `qzoom bench zoomworld`'s scoring (the lmms-eval parts skip
without lmms-eval)."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from qzoom_adapters.benchmarks.lmms.suites import SUITES, SWEEP, preset_for
from qzoom_adapters.benchmarks.zoomworld.shipped import DEFAULT_DIR
from qzoom_adapters.recipes.cli import main

MODEL, ADAPTERS = str(DEFAULT_DIR / "model"), str(DEFAULT_DIR)


def test_presets_are_spec_section_2():
    doc, hr = SUITES["doc"], SUITES["hr"]
    assert (doc.max_tokens, hr.max_tokens) == (576, 4096)
    assert [p.title for p in doc.tasks] == ["TextVQA", "ChartQA", "DocVQA", "InfoVQA", "OCRBench"]
    assert [p.title for p in hr.tasks] == ["V* Bench", "HR-Bench 4K", "HR-Bench 8K", "MME-RealWorld-lite"]
    q25 = {p.title: p.roi_threshold["qwen2_5_vl"] for p in doc.tasks}
    assert q25 == {"TextVQA": 0.15, "InfoVQA": 0.15, "OCRBench": 0.15, "ChartQA": 0.125, "DocVQA": 0.125}
    assert {p.gate_threshold["qwen2_5_vl"] for p in doc.tasks} == {0.05}
    assert all(0.03 <= p.roi_threshold["qwen2_5_vl"] <= 0.04 for p in hr.tasks)
    assert {p.gate_threshold["qwen2_5_vl"] for p in hr.tasks} == {0.02}
    assert {(p.roi_threshold["qwen3_vl"], p.gate_threshold["qwen3_vl"]) for p in doc.tasks} == {(0.15, 0.10)}
    assert {(p.roi_threshold["qwen3_vl"], p.gate_threshold["qwen3_vl"]) for p in hr.tasks} == {(0.10, 0.025)}
    assert SWEEP == (256, 384, 576, 1024, 2048, 4096)  # SPEC §5
    assert all(p.min_tokens <= s.max_tokens for s in SUITES.values() for p in s.tasks)


def test_presets_name_the_datasets_and_metrics_of_the_installed_lmms_eval():
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install -e .[eval])")
    from lmms_eval.tasks import TaskManager
    from lmms_eval.utils import load_yaml_config

    index = TaskManager("WARNING").task_index
    for suite in SUITES.values():
        for p in suite.tasks:
            cfg = load_yaml_config(index[p.task]["yaml_path"])
            assert (cfg["dataset_path"], cfg.get("dataset_name")) == (p.dataset, p.dataset_name), p.task
            assert p.metric in [m["metric"] for m in cfg["metric_list"]], p.task
            assert cfg["output_type"] == "generate_until"


@pytest.mark.parametrize("argv,words", [
    (["--suite", "doc"], "give --model and --adapters"),
    (["--model", MODEL, "--adapters", ADAPTERS, "--suite", "ocr"], "--suite 'ocr' is not one of doc, hr or all"),
    (["--model", MODEL, "--adapters", ADAPTERS, "--budgets", "576,big"], "--budgets must be comma-separated integers"),
    (["--model", MODEL, "--adapters", ADAPTERS, "--budgets", "0"], "--budgets must be positive integers"),
    (["--model", MODEL, "--adapters", ADAPTERS, "--methods", "qzoom,plain"], "--methods must be among qzoom, baseline"),
    (["--model", MODEL, "--adapters", ADAPTERS, "--tasks", "mytask"], "--budgets is needed for mytask"),
    (["--model", MODEL, "--adapters", ADAPTERS, "--gate-threshold", "-1"], "gate_threshold"),
    (["--model", MODEL, "--adapters", ADAPTERS, "--dtype", "int8"], "--dtype 'int8' is not one of auto, checkpoint"),
    (["--model", MODEL, "--adapters", ADAPTERS, "--include-path", "/nowhere"], "--include-path /nowhere is not a folder"),
])
def test_bad_arguments_fail_in_one_line(argv, words, capsys):
    assert main(["eval", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qzoom eval: ") and words in err[0]


def test_missing_datasets_name_what_to_download(tmp_path, monkeypatch, capsys):
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    (tmp_path / "hf" / "hub" / "datasets--echo840--OCRBench" / "snapshots" / "abc").mkdir(parents=True)
    assert main(["eval", "--model", MODEL, "--adapters", ADAPTERS, "--suite", "doc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "datasets not in your Hugging Face cache" in err[0]
    for task in ("textvqa_val", "chartqa", "docvqa_val", "infovqa_val"):
        assert f"{task} needs {preset_for(task)[1].dataset}" in err[0]
    assert "ocrbench needs" not in err[0]  # that one is cached
    assert "hf download --repo-type dataset lmms-lab-encoder/DocVQA" in err[0] and "--allow-download" in err[0]


def test_list_prints_every_preset(capsys):
    assert main(["eval", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(p.task in out and p.dataset in out for s in SUITES.values() for p in s.tasks)


def test_runner_on_local_zoomworld_equals_the_bench(tmp_path, one_thread, capsys):
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install -e .[eval])")
    from qzoom_adapters.benchmarks.lmms.zoomworld_task import write_task
    from qzoom_adapters.benchmarks.zoomworld.bench import run_baseline, run_qzoom
    from qzoom_adapters.benchmarks.zoomworld.shipped import load_default

    task = write_task(tmp_path / "task", 4)
    out = tmp_path / "eval"
    assert main(["eval", "--model", MODEL, "--adapters", ADAPTERS, "--tasks", task.name, "--include-path",
                 str(task.folder), "--budgets", "64", "--batch-size", "4", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"qzoom", "baseline"} and all(r["n"] == 4 and r["budget"] == 64 for r in rows.values())
    zoom, spec, processor = load_default()
    cpu = torch.device("cpu")
    bench_q = run_qzoom(zoom, processor, task.samples, 64, 4, cpu)
    bench_b, _ = run_baseline(zoom.model, processor, spec, task.samples, 64, 4, cpu)
    assert rows["qzoom"]["accuracy"] == pytest.approx(bench_q["accuracy"]["all"])
    assert rows["qzoom"]["zoom_rate"] == pytest.approx(bench_q["zoom_rate"])
    assert rows["qzoom"]["visual_tokens"] == pytest.approx(bench_q["visual_tokens"])
    assert rows["baseline"]["accuracy"] == pytest.approx(bench_b["accuracy"]["all"])
    assert rows["baseline"]["zoom_rate"] == 0 and rows["baseline"]["visual_tokens"] == pytest.approx(bench_b["visual_tokens"])
    assert rows["qzoom"]["gate_threshold"] == zoom.config.gate_threshold  # a local task keeps the saved threshold
    for r in rows.values():
        assert r["latency_s"] > 0 and r["throughput"] == pytest.approx(1 / r["latency_s"])
    groups = {g["method"]: g for g in report["groups"]}
    assert groups["qzoom"]["accuracy"] == rows["qzoom"]["accuracy"]  # one task: the group is that task
    table = (out / "eval.md").read_text()
    assert "| Q-Zoom | custom | qzoom_zoomworld | 64 |" in table and "| baseline | custom | qzoom_zoomworld | 64 |" in table
    for name in ("pareto_custom_tokens.png", "pareto_custom_throughput.png"):
        with Image.open(out / name) as png:
            assert png.size[0] > 0
