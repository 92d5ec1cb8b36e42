"""The `qzoom` model through the real lmms-eval: found from the entry point alone, scored by lmms-eval's own
evaluator on a local ZoomWorld task, and equal to `qzoom bench zoomworld`'s scoring of the same questions.

Skipped (with the reason) where lmms-eval is not installed: `pip install -e .[eval]` (see README "Evaluate").
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

lmms_eval = pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install -e .[eval])")

from lmms_eval import evaluator  # noqa: E402
from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402

from qzoom_adapters.benchmarks.lmms.model import QZoomLMM  # noqa: E402
from qzoom_adapters.benchmarks.lmms.zoomworld_task import write_task  # noqa: E402
from qzoom_adapters.benchmarks.zoomworld.bench import run_qzoom  # noqa: E402
from qzoom_adapters.benchmarks.zoomworld.shipped import DEFAULT_DIR, load_default  # noqa: E402

N, BUDGET, BATCH = 6, 64, 3
MODEL_ARGS = f"pretrained={DEFAULT_DIR / 'model'},adapters={DEFAULT_DIR},budget={BUDGET},device=cpu"


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("zoomworld_task"), N)


@pytest.fixture(scope="module")
def task_manager(task):
    return TaskManager("WARNING", include_path=str(task.folder))


def test_the_entry_point_alone_makes_qzoom_a_model():
    from lmms_eval.models import get_model, get_model_manifest

    assert "LMMS_EVAL_PLUGINS" not in os.environ
    assert get_model("qzoom") is QZoomLMM
    manifest = get_model_manifest("qzoom")
    assert manifest.simple_class_path == "qzoom_adapters.benchmarks.lmms.model.QZoomLMM"


def test_lmms_eval_scores_equal_qzoom_bench_zoomworld(task, task_manager, one_thread):
    res = evaluator.simple_evaluate(model="qzoom", model_args=MODEL_ARGS, tasks=[task.name], batch_size=BATCH,
                                    task_manager=task_manager, log_samples=True, verbosity="WARNING")
    got = res["results"][task.name]
    zoom, spec, processor = load_default()
    row = run_qzoom(zoom, processor, task.samples, BUDGET, BATCH, torch.device("cpu"))  # the bench's own run
    assert got["accuracy,none"] == pytest.approx(row["accuracy"]["all"], abs=1e-12)
    assert got["detail_accuracy,none"] == pytest.approx(row["accuracy"]["detail"], abs=1e-12)
    assert got["global_accuracy,none"] == pytest.approx(row["accuracy"]["global"], abs=1e-12)
    # and answer by answer: the same greedy text as the pipeline gives on the bench's inputs
    pixels = spec.budget_pixels(BUDGET)
    direct = zoom.with_config(crop_min_pixels=pixels, crop_max_pixels=pixels)
    ref = direct.generate_from_inputs(spec.chat_inputs(processor, [s.image for s in task.samples],
                                                       [s.question for s in task.samples], pixels=pixels),
                                      [s.image for s in task.samples], max_new_tokens=8)
    logged = sorted(res["samples"][task.name], key=lambda d: d["doc_id"])
    assert [d["filtered_resps"][0] for d in logged] == [o.text for o in ref]


@pytest.fixture(scope="module")
def lm():
    return QZoomLMM.create_from_arg_string(MODEL_ARGS, {"batch_size": 2, "max_batch_size": None, "device": None})


def _request(kind: str, args: tuple, doc_id: int, task) -> Instance:
    return Instance(kind, args, 0, metadata={"task": task.name, "doc_id": doc_id, "repeats": 1})


def _visual(doc):
    return [doc["image"].convert("RGB")]


def test_stats_record_each_answer(lm, task, one_thread):
    lm.task_dict = {task.name: task_ds(task)}
    lm.stats.clear()
    reqs = [_request("generate_until", (s.question, {"max_new_tokens": 8, "until": []}, _visual, i, task.name, "test"),
                     i, task)
            for i, s in enumerate(task.samples[:3])]
    texts = lm.generate_until(reqs)
    assert len(texts) == 3 and [s.doc_id for s in lm.stats] == [0, 1, 2]
    for s in lm.stats:
        assert s.task == task.name and s.latency_s > 0 and s.visual_tokens >= 1
        assert (s.bbox is not None) == s.zoomed and (s.gate_prob >= lm.zoom.config.gate_threshold) == s.zoomed


def task_ds(task):
    import datasets

    return datasets.load_from_disk(str(task.folder / "data"))


def test_loglikelihood_scores_the_answering_path(lm, task, one_thread):
    """The greedy answer is greedy under loglikelihood, and its score is that of the path that answered."""
    from qzoom_adapters.likelihood import continuation_scores

    lm.task_dict = {task.name: task_ds(task)}
    answers = lm.generate_until([_request("generate_until", (s.question, {"max_new_tokens": 8, "until": []}, _visual,
                                                             i, task.name, "test"), i, task)
                                 for i, s in enumerate(task.samples[:2])])
    reqs = [_request("loglikelihood", (s.question, a, _visual, i, task.name, "test"), i, task)
            for i, (s, a) in enumerate(zip(task.samples[:2], answers)) if a]
    assert reqs, "the shipped default answers these questions with text"
    got = lm.loglikelihood(reqs)
    for (logprob, greedy), req in zip(got, reqs):
        s = task.samples[req.args[3]]
        ref = continuation_scores(lm.zoom, [s.image], [s.question], [req.args[1]], pixels=lm.view_pixels)[0]
        assert greedy and logprob == pytest.approx(ref.logprob) and logprob < 0


def _cli(*model_args: str, task_folder) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmms_eval", "--model", "qzoom", "--model_args", ",".join(model_args),
                           "--tasks", "qzoom_zoomworld", "--include_path", str(task_folder)],
                          capture_output=True, text=True, timeout=300)


def test_bad_model_args_give_one_line_from_the_lmms_eval_command_line(task):
    done = _cli(f"pretrained={DEFAULT_DIR / 'model'}", f"adapters={DEFAULT_DIR}", "gate_threshold=abc",
                task_folder=task.folder)
    assert done.returncode == 1 and "Traceback" not in done.stderr + done.stdout
    assert done.stderr.strip().splitlines() == [
        "qzoom: model arg gate_threshold='abc': Input should be a valid number, unable to parse string as a number"]
