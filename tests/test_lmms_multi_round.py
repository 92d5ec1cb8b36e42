"""`generate_until_multi_round` of the `qzoom` lmms-eval model: lmms-eval's multi-round protocol (the task's
`doc_to_text` gives each next round from the answers so far) run by lmms-eval's own evaluator on a local task, each
round's answer equal to Q-Zoom's answer to that round alone; a round Q-Zoom cannot answer is one line.

Skipped (with the reason) where lmms-eval is not installed: `pip install -e .[eval]` (see README "Evaluate").
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

lmms_eval = pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install -e .[eval])")

from lmms_eval import evaluator  # noqa: E402
from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402

from qzoom_adapters.benchmarks.lmms.model import QZoomLMM, RequestError  # noqa: E402
from qzoom_adapters.benchmarks.lmms.zoomworld_task import write_task  # noqa: E402
from qzoom_adapters.benchmarks.zoomworld.shipped import DEFAULT_DIR, load_default  # noqa: E402

N, BUDGET, BATCH, MAX_NEW = 4, 64, 3, 6
MODEL_ARGS = f"pretrained={DEFAULT_DIR / 'model'},adapters={DEFAULT_DIR},budget={BUDGET},device=cpu"
TASK, VIDEO_TASK = "qzoom_zoomworld_rounds", "qzoom_zoomworld_video_round"

# The task's functions: round r (1, 2, ...) asks about the top-left quadrant, then the whole scene again; a document
# has 2 or 3 rounds (by its seed); each call checks what the model handed back to it.
UTILS = '''
def rounds(doc):
    return 2 + int(doc["seed"]) % 2


def round_view(doc, r):
    image = doc["image"].convert("RGB")
    return image.crop((0, 0, image.width // 2, image.height // 2)) if r == 1 else image


def round_question(doc, r):
    return doc["question"] if r == 0 else f"{doc['question']} (look again, round {r})"


def doc_to_visual(doc):
    return [round_view(doc, 0)]


def doc_to_text(doc, lmms_eval_specific_kwargs=None, previous_output=None, round_idx=None, previous_round_info=None):
    if round_idx is None:
        return round_question(doc, 0)
    assert len(previous_output) == round_idx and all(isinstance(a, str) for a in previous_output), previous_output
    assert previous_round_info == (None if round_idx == 1 else {"asked": round_idx - 1}), previous_round_info
    if round_idx == rounds(doc):
        return None, None, True, previous_output, None
    return [round_view(doc, round_idx)], round_question(doc, round_idx), False, previous_output, {"asked": round_idx}


def video_doc_to_text(doc, lmms_eval_specific_kwargs=None, previous_output=None, round_idx=None,
                      previous_round_info=None):
    if round_idx is None:
        return doc["question"]
    return ["clip_0.mp4"], "what happens next?", False, previous_output, None


def process_results(doc, results):
    answers = results[0]
    return {"rounds": float(len(answers))}
'''


def _yaml(task: str, data_dir, doc_to_text: str) -> str:
    return textwrap.dedent(f"""\
        task: {task}
        dataset_path: "{data_dir}"
        dataset_kwargs:
          load_from_disk: true
        test_split: test
        output_type: generate_until_multi_round
        doc_to_visual: !function rounds_utils.doc_to_visual
        doc_to_text: !function rounds_utils.{doc_to_text}
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: {MAX_NEW}
          until: []
          do_sample: false
        process_results: !function rounds_utils.process_results
        metric_list:
          - metric: rounds
            aggregation: mean
            higher_is_better: true
        metadata:
          version: 0.0
        """)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    zw = write_task(tmp_path_factory.mktemp("rounds_task"), N)
    (zw.folder / f"{zw.name}.yaml").unlink()  # only the multi-round tasks in this folder
    data = (zw.folder / "data").resolve()
    (zw.folder / "rounds_utils.py").write_text(UTILS)
    (zw.folder / f"{TASK}.yaml").write_text(_yaml(TASK, data, "doc_to_text"))
    (zw.folder / f"{VIDEO_TASK}.yaml").write_text(_yaml(VIDEO_TASK, data, "video_doc_to_text"))
    sys.path.insert(0, str(zw.folder))
    import rounds_utils

    sys.path.remove(str(zw.folder))
    return zw, rounds_utils


def test_lmms_eval_runs_every_round_and_each_answer_is_that_rounds_own(task, one_thread):
    zw, utils = task
    docs = {i: {"image": s.image, "question": s.question, "seed": s.seed} for i, s in enumerate(zw.samples)}
    assert {utils.rounds(d) for d in docs.values()} == {2, 3}, "the documents should differ in their round count"
    res = evaluator.simple_evaluate(model="qzoom", model_args=MODEL_ARGS, tasks=[TASK], batch_size=BATCH,
                                    task_manager=TaskManager("WARNING", include_path=str(zw.folder)),
                                    log_samples=True, verbosity="WARNING")
    assert res["results"][TASK]["rounds,none"] == pytest.approx(sum(utils.rounds(d) for d in docs.values()) / N)
    zoom, spec, processor = load_default()
    pixels = spec.budget_pixels(BUDGET)
    zoom = zoom.with_config(crop_min_pixels=pixels, crop_max_pixels=pixels)
    logged = sorted(res["samples"][TASK], key=lambda d: d["doc_id"])
    assert [d["doc_id"] for d in logged] == list(range(N))
    for entry in logged:
        doc = docs[entry["doc_id"]]
        answers = entry["filtered_resps"][0]
        assert isinstance(answers, list) and len(answers) == utils.rounds(doc)
        for r, answer in enumerate(answers):  # the round alone, through the pipeline
            image, question = utils.round_view(doc, r), utils.round_question(doc, r)
            alone = zoom.generate_from_inputs(spec.chat_inputs(processor, [image], [question], pixels=pixels), [image],
                                              max_new_tokens=MAX_NEW)[0]
            assert answer == alone.text, (entry["doc_id"], r)


@pytest.fixture(scope="module")
def lm():
    return QZoomLMM.create_from_arg_string(MODEL_ARGS, {"batch_size": 2, "max_batch_size": None, "device": None})


def _requests(zw, doc_to_visual, doc_to_text, n: int = 2) -> list[Instance]:
    return [Instance("generate_until_multi_round",
                     (s.question, {"max_new_tokens": MAX_NEW, "until": []}, doc_to_visual, doc_to_text, i, zw.name,
                      "test"), 0, metadata={"task": zw.name, "doc_id": i, "repeats": 1})
            for i, s in enumerate(zw.samples[:n])]


def _task_dict(zw):
    import datasets

    return {zw.name: datasets.load_from_disk(str(zw.folder / "data"))}


def test_stats_name_each_round_and_documents_stop_on_their_own(lm, task, one_thread):
    zw, utils = task
    lm.task_dict = _task_dict(zw)
    lm.stats.clear()
    reqs = _requests(zw, utils.doc_to_visual, utils.doc_to_text, n=N)
    got = lm.generate_until_multi_round(reqs)
    rounds = [utils.rounds(lm.task_dict[zw.name]["test"][i]) for i in range(N)]
    assert [len(g) for g in got] == rounds
    expected = sorted((i, r) for i in range(N) for r in range(rounds[i]))
    assert sorted((s.doc_id, s.round_idx) for s in lm.stats) == expected


@pytest.mark.parametrize("bad,match", [
    ("no_visual", "document 0 has no visual; Q-Zoom answers questions about still images"),
    ("video_round", "document 0 round 1: .*clip_0.mp4.*; Q-Zoom answers questions about still images"),
    ("text_only", "document 0 round 1: doc_to_text returned str, not \\(visuals, context, terminal, round results, "
                  "info\\)"),
])
def test_a_round_qzoom_cannot_answer_is_one_line(lm, task, bad, match, one_thread):
    zw, utils = task
    lm.task_dict = _task_dict(zw)
    visual, text = utils.doc_to_visual, utils.doc_to_text
    if bad == "no_visual":
        def visual(doc):
            return []
    elif bad == "video_round":
        text = utils.video_doc_to_text
    else:
        def text(doc, round_idx=None, **kwargs):
            return "just text"
    with pytest.raises(RequestError, match=f"^{zw.name} {match}") as err:
        lm.generate_until_multi_round(_requests(zw, visual, text, n=1))
    assert isinstance(err.value, SystemExit) and len(str(err.value).splitlines()) == 1


def test_the_lmms_eval_command_line_prints_one_line_for_a_video_round(task):
    zw, _ = task
    done = subprocess.run([sys.executable, "-m", "lmms_eval", "--model", "qzoom", "--model_args", MODEL_ARGS,
                           "--tasks", VIDEO_TASK, "--include_path", str(zw.folder), "--limit", "1",
                           "--verbosity", "WARNING"], capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in out, out[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"qzoom: {VIDEO_TASK} document 0 round 1: ") and "clip_0.mp4" in last, last


def test_a_request_with_several_images_is_answered_with_all_of_them(lm, task, one_thread):
    """generate_until with two images a request: each answer is QZoom's on both images (RoI cut from the last),
    its visual tokens count both; loglikelihood refuses several images in one line."""
    zw, utils = task
    lm.task_dict = _task_dict(zw)
    lm.stats.clear()

    def two(doc):
        return utils.doc_to_visual(doc) * 2

    reqs = [Instance("generate_until", (s.question, {"max_new_tokens": MAX_NEW, "until": []}, two, i, zw.name, "test"),
                     0, metadata={"task": zw.name, "doc_id": i, "repeats": 1}) for i, s in enumerate(zw.samples[:2])]
    got = lm.generate_until(reqs)
    zoom, spec, processor = load_default()
    pixels = spec.budget_pixels(BUDGET)
    zoom = zoom.with_config(crop_min_pixels=pixels, crop_max_pixels=pixels)
    for i, text in enumerate(got):
        images = [im.convert("RGB") for im in two(lm.task_dict[zw.name]["test"][i])]
        inputs = spec.chat_inputs(processor, [images], [zw.samples[i].question], pixels=pixels)
        alone = zoom.generate_from_inputs(inputs, [images], max_new_tokens=MAX_NEW)[0]
        # one image's global view alone (the gate off: whether either call zooms is the gate's business)
        single = zoom.with_config(gate_threshold=2.0).generate_from_inputs(
            spec.chat_inputs(processor, [images[0]], [zw.samples[i].question], pixels=pixels), [images[0]],
            max_new_tokens=MAX_NEW)[0]
        assert text == alone.text and alone.roi_image == 1
        assert lm.stats[i].visual_tokens == alone.visual_tokens >= 2 * single.visual_tokens
    scored = Instance("loglikelihood", (zw.samples[0].question, " x", two, 0, zw.name, "test"), 0,
                      metadata={"task": zw.name, "doc_id": 0, "repeats": 1})
    with pytest.raises(RequestError, match="document 0 has 2 images; loglikelihood scores one image per question"):
        lm.loglikelihood([scored])
