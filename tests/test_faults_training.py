"""Faults and bad input on the training side (issue 19): resumes that would mix runs, labels that would mix
teachers or records, torn logs, lost label shards, folders that are not ours, and one-line errors."""
from __future__ import annotations

import builtins
import io
import json
import shutil

import pytest
import torch
from torch import nn

import qzoom_adapters.recipes.trainer as trainer_mod
from qzoom_adapters.errors import QZoomError
from qzoom_adapters.recipes.cli import main
from qzoom_adapters.recipes.config import TrainSection, load_config
from qzoom_adapters.recipes.data import JsonlAppender, read_jsonl, read_records
from qzoom_adapters.recipes.label_store import MANIFEST, LabelStore, LabelWriter, weights_fingerprint
from qzoom_adapters.recipes.run_folder import RUN_NAME
from qzoom_adapters.recipes.stage1 import make_stage1_labels, train_stage1
from qzoom_adapters.recipes.tiny import write_tiny_setup
from qzoom_adapters.recipes.trainer import DONE_NAME, Trainer, _Log


pytestmark = pytest.mark.usefixtures("one_thread")


# --- a toy trainer (no model): fast checks of the run folder ---------------------------------------
class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, batch):
        return ((self.w * batch).sum() - 1.0) ** 2


DATA = [torch.full((3,), float(i + 1) / 10) for i in range(4)]


def _toy(out, stop_after=None, settings=None, **train):
    cfg = TrainSection(**{"lr": 0.1, "batch_size": 1, "effective_batch": 1, "max_steps": 4, "save_every": 1,
                          "warmup_ratio": 0.0, **train})
    module = Toy()
    extra = {} if settings is None else {"settings": settings}
    return module, Trainer(module, DATA, lambda items: torch.stack(items), cfg, out, lambda m, o: None,
                           stop_after=stop_after, **extra)


def _steps(out):
    return [r["step"] for r in read_jsonl(out / "train_log.jsonl")]


def test_resume_with_other_settings_is_refused_naming_them(tmp_path):
    out = tmp_path / "run"
    assert _toy(out, stop_after=2, settings={"K": 3})[1].train() == {"step": 2, "finished": False}
    run = json.loads((out / RUN_NAME).read_text())
    assert run["settings"]["K"] == 3 and run["settings"]["train.lr"] == 0.1 and run["checkpoints"]
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(QZoomError, match=r"train\.lr: 0\.1 -> 0\.2.*train\.seed: 0 -> 5|K: 3 -> 4") as err:
        _toy(out, settings={"K": 4}, lr=0.2, seed=5)[1].train()
    msg = str(err.value)
    assert all(k in msg for k in ("K: 3 -> 4", "train.lr: 0.1 -> 0.2", "train.seed: 0 -> 5", "new `out`"))
    assert "save_every" not in msg and "\n" not in msg
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing touched
    # bookkeeping (how often to save/log, how many checkpoints to keep) may change on a resume
    result = _toy(out, settings={"K": 3}, save_every=2, keep_checkpoints=3)[1].train()
    assert result["finished"] and result["step"] == 4 and _steps(out) == [1, 2, 3, 4]


def test_train_refuses_a_folder_that_is_not_a_run_of_ours(tmp_path):
    out = tmp_path / "mine"
    (out / "checkpoints" / "step-1").mkdir(parents=True)
    (out / "checkpoints" / "step-1" / "notes.txt").write_text("mine")
    (out / "adapter_model.safetensors").write_bytes(b"earlier adapters")
    (out / "train_log.csv").write_text("my,own,log\n")
    (out / "train_log.jsonl").write_text('{"unrelated": 1}\n')  # once a KeyError: 'step'
    with pytest.raises(QZoomError, match="not empty .* holds no qzoom training run"):
        _toy(out)[1].train()
    assert (out / "checkpoints" / "step-1" / "notes.txt").read_text() == "mine"
    assert (out / "adapter_model.safetensors").read_bytes() == b"earlier adapters"
    assert (out / "train_log.csv").read_text() == "my,own,log\n" and not (out / RUN_NAME).exists()
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(QZoomError, match="is a file"):
        _toy(afile)[1].train()


def test_rotation_and_resume_touch_only_checkpoints_the_run_wrote(tmp_path):
    out = tmp_path / "run"
    _toy(out, stop_after=1, keep_checkpoints=1)[1].train()
    # a folder the user puts beside the run's checkpoints, shaped like one of them
    user = out / "checkpoints" / "step-0"
    user.mkdir()
    (user / "trainer_state.json").write_text(json.dumps({"step": 0}))
    (out / "checkpoints" / "step-9").mkdir()
    (out / "checkpoints" / "step-9" / "trainer_state.json").write_text(json.dumps({"step": 9}))  # never resumed from
    result = _toy(out, keep_checkpoints=1)[1].train()
    assert result["finished"] and result["step"] == 4 and _steps(out) == [1, 2, 3, 4]
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-0", "step-4", "step-9"]  # step-1..3 rotated away; the user's folders kept
    assert json.loads((out / RUN_NAME).read_text())["checkpoints"] == ["step-4"]


def test_torn_and_foreign_log_lines_do_not_block_a_resume(tmp_path):
    out = tmp_path / "run"
    _toy(out, stop_after=2)[1].train()
    with open(out / "train_log.jsonl", "a") as f:
        f.write('{"step": 3, "epo')  # killed while appending
    with pytest.warns(UserWarning, match="torn last line"):
        result = _toy(out)[1].train()
    assert result["finished"] and _steps(out) == [1, 2, 3, 4]
    assert [int(x.split(",")[0]) for x in (out / "train_log.csv").read_text().splitlines()[1:]] == [1, 2, 3, 4]
    # a line in the middle that is not a log row: dropped, named by its line number
    log = out / "train_log.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], '{"no step": true}', *lines[1:]]) + "\n")
    with pytest.warns(UserWarning, match=r"unreadable line\(s\) \[2\]"):
        _Log(out, True, resume_step=4)
    assert _steps(out) == [1, 2, 3, 4]


def test_log_rewrite_survives_a_crash_midway(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _toy(out, stop_after=3)[1].train()
    before = (out / "train_log.jsonl").read_text()
    real_open = builtins.open

    class Crashing(io.StringIO):
        """Writes half of what it is given to the real file, then fails (a kill mid-write)."""

        def __init__(self, f):
            super().__init__()
            self.f = f

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            self.f.close()
            raise OSError("injected crash")

        def __exit__(self, *exc):
            self.f.close()

    def crashing_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        return Crashing(f) if "train_log.jsonl" in str(file) and "w" in mode else f

    monkeypatch.setattr(builtins, "open", crashing_open)
    monkeypatch.setattr(io, "open", crashing_open)  # pathlib writes through io.open
    with pytest.raises(OSError, match="injected crash"):
        _Log(out, True, resume_step=2)
    monkeypatch.undo()
    assert (out / "train_log.jsonl").read_text() == before  # every row kept


def test_train_config_values_are_validated(tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("model: {path: m}\nK: 3\nstage1: {labels: l, out: o}\n")
    for bad, where in (("stage1.train.lr=-1", "stage1.train.lr"), ("stage1.train.lr=.nan", "stage1.train.lr"),
                       ("stage1.train.warmup_ratio=2", "warmup_ratio"), ("stage1.train.betas=[0.9, 1.5]", "betas")):
        with pytest.raises(QZoomError, match=where):
            load_config(cfg, [bad])
    assert load_config(cfg, ["stage1.train.grad_clip=0"]).stage1.train.grad_clip == 0  # 0: no clipping
    bud = tmp_path / "b.yaml"
    bud.write_text("model: {path: m}\nK: 3\nlabels_stage3: {records: r, out: o, budgets: [0, 1, 2]}\n")
    with pytest.raises(QZoomError, match=r"labels_stage3\.budgets: .*each at least 1 \(got \[0, 1, 2\]\)"):
        load_config(bud)
    listed = tmp_path / "list.yaml"
    listed.write_text("- model\n- K\n")
    with pytest.raises(QZoomError, match="top level must be a mapping"):
        load_config(listed)


def test_cli_prints_one_line_for_bad_configs(tmp_path, capsys):
    listed = tmp_path / "list.yaml"
    listed.write_text("[1, 2]\n")
    assert main(["labels", "stage1", "--config", str(listed)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "top level must be a mapping" in err
    good = tmp_path / "g.yaml"
    good.write_text("model: {path: m}\nK: 3\nstage1: {labels: l, out: o}\n")
    assert main(["train", "stage1", "--config", str(good), "--set", "stage1.train.lr=-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stage1.train.lr" in err and "greater than or equal to 0" in err


def test_bad_records_files_are_named_with_their_line(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(QZoomError, match="holds no records"):
        read_records(empty)
    utf16 = tmp_path / "u16.jsonl"
    utf16.write_text('{"id": "a", "image": "a.png", "question": "q"}\n', encoding="utf-16")
    with pytest.raises(QZoomError, match="not UTF-8"):
        read_records(utf16)
    rows = tmp_path / "rows.jsonl"
    good = '{"id": "a", "image": "a.png", "question": "q"}'
    rows.write_text(f"{good}\n\n" + '{"id": "b", "image": "b.png"}\n')  # the bad row is on line 3
    with pytest.raises(QZoomError, match=r"rows\.jsonl:3: not a sample record: question: Field required"):
        read_records(rows)
    rows.write_text(f"{good}\n[1, 2]\n")
    with pytest.raises(QZoomError, match=r"rows\.jsonl:2: a record must be a JSON object"):
        read_records(rows)
    rows.write_text(f"{good}\n{good}\n")
    with pytest.raises(QZoomError, match=r"rows\.jsonl:2: sample id 'a' already appears on line 1"):
        read_records(rows)


def test_appended_results_file_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b", "ans')
    with pytest.warns(UserWarning, match="torn last line"):
        app = JsonlAppender(path)
    assert app.done == {"a"}
    app.append([{"id": "b"}])
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b"]
    path.write_text('{"unrelated": 1}\n')
    with pytest.raises(QZoomError, match=r"answers\.jsonl:1: a row without an `id`"):
        JsonlAppender(path)


# --- tiny setup, demo out folders -------------------------------------------------------------------
def test_tiny_refuses_a_non_empty_folder_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "t"
    out.mkdir()
    (out / "records.jsonl").write_text("my records\n")
    assert main(["tiny", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "records.jsonl").read_text() == "my records\n" and sorted(p.name for p in out.iterdir()) == [
        "records.jsonl"]
    with pytest.raises(QZoomError, match="is a file"):
        write_tiny_setup(out / "records.jsonl")
    assert main(["tiny", "--out", str(out), "--samples", "2", "--overwrite"]) == 0
    assert len(read_records(out / "records.jsonl")) == 2


@pytest.fixture(scope="module")
def untrained_default(tmp_path_factory):
    from qzoom_adapters.benchmarks.zoomworld.shipped import write_untrained_default

    return write_untrained_default(tmp_path_factory.mktemp("default"))


def test_demo_out_never_writes_over_files_it_did_not_write(tmp_path, capsys, untrained_default):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert main(["demo", "--model", str(untrained_default), "--out", str(afile)]) == 2
    assert "is a file" in capsys.readouterr().err and afile.read_text() == "mine"
    user = tmp_path / "user"
    user.mkdir()
    (user / "summary.json").write_text("my summary")
    assert main(["demo", "--model", str(untrained_default), "--out", str(user), "--samples", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err and (user / "summary.json").read_text() == "my summary"
    assert not (user / "sample_0.png").exists()
    # its own outputs it may write again
    demo = tmp_path / "demo"
    for _ in range(2):
        assert main(["demo", "--model", str(untrained_default), "--out", str(demo), "--samples", "1"]) == 0
    assert (demo / "sample_0.png").is_file() and json.loads((demo / "summary.json").read_text())["n"] == 1
    assert main(["demo", "--model", str(untrained_default), "--out", str(user), "--samples", "1",
                 "--overwrite"]) == 0
    assert json.loads((user / "summary.json").read_text())["n"] == 1


# --- stage-1 labels and training on the tiny setup ----------------------------------------------------
@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A tiny setup of 4 records labelled by its teacher in 2 shards (copied by each test that changes it)."""
    torch.set_num_threads(1)
    root = write_tiny_setup(tmp_path_factory.mktemp("tiny") / "t", samples=4)
    cfg = load_config(root / "recipe.yaml", ["labels_stage1.shard_size=2"])
    assert make_stage1_labels(cfg, show_progress=False)["labelled"] == 4
    return root


def _copy(labelled, tmp_path):
    root = tmp_path / "t"
    shutil.copytree(labelled, root)
    return root, load_config(root / "recipe.yaml", ["labels_stage1.shard_size=2"])


def _maps(folder):
    store = LabelStore(folder)
    return {i: store.maps(i) for i in store.index}


def test_labels_record_what_they_depend_on_and_refuse_to_mix(labelled, tmp_path):
    root, cfg = _copy(labelled, tmp_path)
    out = root / "runs" / "labels1"
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["settings"]["weights"] == weights_fingerprint(cfg.model.path)
    assert all(len(s["hashes"]) == len(s["ids"]) and s["bytes"] == (out / s["file"]).stat().st_size
               for s in manifest["shards"])
    before = (out / MANIFEST).read_text()
    # a record changed under the same id: refused by labels and by training, naming it
    rows = read_jsonl(root / "records.jsonl")
    rows[1]["question"] = "What is written on the blue plate?"
    (root / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(QZoomError, match=r"1 record\(s\) changed .*\['tiny-0001'\]"):
        make_stage1_labels(cfg, show_progress=False)
    with pytest.raises(QZoomError, match=r"changed .*\['tiny-0001'\]"):
        train_stage1(cfg)
    # the teacher's weights changed under the same path
    from qzoom_adapters.recipes.models import load_backbone

    model, _, _ = load_backbone(cfg.model)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    model.save_pretrained(root / "model")
    with pytest.raises(QZoomError, match=r"\['weights'\]\); the teacher's weights at .* changed"):
        make_stage1_labels(cfg, show_progress=False)
    assert (out / MANIFEST).read_text() == before
    assert not (root / "runs" / "stage1").exists()


def test_lost_or_truncated_shards_are_named_then_rebuilt(labelled, tmp_path):
    root, cfg = _copy(labelled, tmp_path)
    out = root / "runs" / "labels1"
    first = _maps(out)
    (out / "shard-00000.safetensors").unlink()
    data = (out / "shard-00001.safetensors").read_bytes()
    (out / "shard-00001.safetensors").write_bytes(data[:-10])
    with pytest.raises(QZoomError, match=r"shard-00000\.safetensors \(missing\), shard-00001\.safetensors "
                                         r"\(truncated.*run `qzoom labels stage1`"):
        LabelStore(out)
    with pytest.raises(QZoomError, match=r"shard-00000\.safetensors \(missing\)"):
        train_stage1(cfg)
    with pytest.warns(UserWarning, match="dropped; their 4 samples are labelled again"):
        res = make_stage1_labels(cfg, show_progress=False)
    assert (res["labelled"], res["total"]) == (4, 4)
    again = _maps(out)
    assert again.keys() == first.keys()
    assert all(torch.equal(a, b) for i in first for a, b in zip(first[i], again[i]))
    # the broken files were the manifest's own: replaced, nothing else left behind
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "shard-00000.safetensors", "shard-00001.safetensors"]
    # a shard cut short after the store was opened: the error names the file
    store = LabelStore(out)
    (out / "shard-00000.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(QZoomError, match=r"shard-00000\.safetensors: cannot read label shard"):
        store.maps(store.manifest["shards"][0]["ids"][0])


def test_corrupt_manifest_is_a_clear_error(labelled, tmp_path):
    root, cfg = _copy(labelled, tmp_path)
    out = root / "runs" / "labels1"
    (out / MANIFEST).write_text('{"settings": {"grid": 4}, "shar')
    with pytest.raises(QZoomError, match=r"manifest\.json is corrupt .*new `out` folder"):
        LabelStore(out)
    with pytest.raises(QZoomError, match=r"manifest\.json is corrupt"):
        LabelWriter(out, {"grid": 4}, 2)
    (out / MANIFEST).write_text("[]")
    with pytest.raises(QZoomError, match=r"manifest\.json is corrupt"):
        LabelStore(out)


def test_stage1_resume_with_another_K_is_refused(labelled, tmp_path):
    root, cfg = _copy(labelled, tmp_path)
    over = ["stage1.train.batch_size=2", "stage1.train.effective_batch=2", "stage1.train.max_steps=2"]
    cfg = load_config(root / "recipe.yaml", over)
    assert train_stage1(cfg, stop_after=1) == {"step": 1, "finished": False}
    out = root / "runs" / "stage1"
    with pytest.raises(QZoomError, match=r"other settings \(K: 3 -> 2\)"):
        train_stage1(load_config(root / "recipe.yaml", [*over, "K=2"]))
    assert not (out / DONE_NAME).exists()
    assert train_stage1(cfg)["finished"]  # the same settings resume
