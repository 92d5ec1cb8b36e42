"""ZoomWorld: deterministic per seed, boxes inside images, well-posed questions, a scorer that can fail."""
import numpy as np
import pytest

from qzoom_adapters.benchmarks.zoomworld import box_hit, exact_match, make_sample, score, split
from qzoom_adapters.benchmarks.zoomworld.generator import VAL_SEED, make_scene, train_stream


def test_deterministic_per_seed():
    a, b = make_sample(VAL_SEED + 3), make_sample(VAL_SEED + 3)
    assert (a.question, a.answer, a.box, a.plates) == (b.question, b.answer, b.box, b.plates)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    c = make_sample(VAL_SEED + 4)
    assert not np.array_equal(np.asarray(a.image.resize((64, 64))), np.asarray(c.image.resize((64, 64))))


def test_scenes_are_well_posed():
    samples = split("val", 40)
    kinds = {s.kind for s in samples}
    assert kinds == {"code", "count", "largest_colour"}
    for s in samples:
        W, H = s.image.size
        assert 0.9e6 <= W * H <= 2.1e6
        assert 2 <= len(s.plates) <= 5 and len({p.colour for p in s.plates}) == len(s.plates)
        for p in s.plates:
            x1, y1, x2, y2 = p.box
            assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H  # every recorded box is inside its image
            assert len(p.code) == 3 and p.code.isalnum() and p.code.upper() == p.code
        areas = sorted((p.area for p in s.plates), reverse=True)
        assert areas[0] >= 1.4 * areas[1]  # "the largest plate" is unambiguous
        if s.kind == "code":
            assert [p.code for p in s.plates if p.box == s.box] == [s.answer]
        if s.kind == "count":
            assert s.answer == str(len(s.plates)) and s.box is None
    for s in samples:  # plates do not overlap
        for i, p in enumerate(s.plates):
            for q in s.plates[i + 1:]:
                assert p.box[2] <= q.box[0] or q.box[2] <= p.box[0] or p.box[3] <= q.box[1] or q.box[3] <= p.box[1]


def test_splits_and_stream_are_disjoint():
    val = {s.seed for s in split("val", 5)}
    test = {s.seed for s in split("test", 5)}
    stream = train_stream()
    train = {next(stream).seed for _ in range(5)}
    assert not (val & test or val & train or test & train)
    with pytest.raises(ValueError, match="split"):
        split("train", 3)


def test_scorer():
    assert exact_match(" jk5.", "JK5") and not exact_match("JKS", "JK5") and not exact_match("", "")
    assert box_hit((0, 0, 10, 10), (0, 0, 10, 10)) and box_hit((0, 0, 5, 10), (0, 0, 10, 10))
    assert not box_hit((0, 0, 4, 10), (0, 0, 10, 10)) and not box_hit(None, (0, 0, 1, 1))
    samples = split("val", 6)
    preds = [{"answer": s.answer if i % 2 == 0 else "nope", "box": s.box} for i, s in enumerate(samples)]
    out = score(samples, preds)
    assert out["accuracy"]["all"] == pytest.approx(3 / 6)
    detail = [s for s in samples if s.family == "detail"]
    assert out["boxes_scored"] == len(detail) and (out["box_hit_rate"] == 1.0 if detail else True)
    with pytest.raises(ValueError):
        score(samples, preds[:-1])


def test_scene_is_a_function_of_the_seed_only():
    img1, plates1 = make_scene(42)
    make_scene(7)  # unrelated calls in between change nothing
    img2, plates2 = make_scene(42)
    assert plates1 == plates2 and np.array_equal(np.asarray(img1), np.asarray(img2))


def test_default_model_trains_and_saves_a_small_hf_folder(tmp_path):
    """Two steps of the from-scratch training script: finite loss, answer-only labels, an HF folder <= 16 MB."""
    import torch

    from qzoom_adapters.benchmarks.zoomworld.model import new_model
    from qzoom_adapters.benchmarks.zoomworld.train import AnswerCollate, StreamDataset, train
    from qzoom_adapters.recipes.models import load_backbone

    model, processor = new_model()
    assert sum(p.numel() for p in model.parameters()) <= 8e6
    ds = StreamDataset(4)
    batch = AnswerCollate(processor)([ds[0], ds[1]])
    tok = processor.tokenizer
    for b, i in enumerate((0, 1)):
        kept = batch["labels"][b][batch["labels"][b] != -100].tolist()
        assert kept == [t for _, a in ds[i]["qas"] for t in tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    result = train(tmp_path / "run", steps=5, batch_size=2, max_seconds=0.0)  # a time budget ends it after step 1
    assert result["finished"] and (result["step"], result["planned_steps"]) == (1, 5)
    assert torch.isfinite(torch.tensor(result["final_loss"]))
    folder = tmp_path / "run" / "model"
    assert sum(f.stat().st_size for f in folder.iterdir()) <= 16e6
    loaded, proc, spec = load_backbone(str(folder))
    assert spec.family == "qwen2_5_vl" and proc.tokenizer.eos_token_id == tok.eos_token_id


def test_shipped_default_reproduces_its_record(tmp_path):
    """The shipped files alone: <= 8M parameters, <= 16 MB, and the recorded demo check repeats (answers may
    differ in at most one sample across transformers versions and CPUs)."""
    import json

    from qzoom_adapters.benchmarks.zoomworld.shipped import DEFAULT_DIR, load_default, recorded_check

    size = sum(f.stat().st_size for f in DEFAULT_DIR.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".json",
                                                                                                 ".jinja"))
    assert size <= 16e6
    zoom, _, _ = load_default(DEFAULT_DIR)
    assert sum(p.numel() for p in zoom.model.parameters()) <= 8e6
    recorded = json.loads((DEFAULT_DIR / "record.json").read_text())["check"]
    now = recorded_check(DEFAULT_DIR, tmp_path)
    same = sum(a == b for a, b in zip(now["answers"], recorded["answers"]))
    assert len(now["answers"]) == len(recorded["answers"]) and same >= len(recorded["answers"]) - 1
    assert abs(now["accuracy"] - recorded["accuracy"]) <= 1 / recorded["n"] + 1e-9
    assert abs(now["mean_visual_tokens"] - recorded["mean_visual_tokens"]) <= 0.05 * recorded["mean_visual_tokens"]


@pytest.mark.parametrize("budget", [64, 256])
def test_fast_training_inputs_equal_the_processor(budget):
    """Worker-side uint8 patches + device-side normalisation == the HF processor via spec.chat_inputs."""
    import torch

    from qzoom_adapters.benchmarks.zoomworld.batches import FastChatInputs
    from qzoom_adapters.benchmarks.zoomworld.model import FACTOR, new_model
    from qzoom_adapters.spec import get_spec

    model, processor = new_model()
    samples = [make_sample(VAL_SEED + i) for i in range(3)]
    images, questions = [s.image for s in samples], [s.question for s in samples]
    ref = get_spec(model).chat_inputs(processor, images, questions, pixels=budget * FACTOR**2)
    fast = FastChatInputs(processor)
    got = fast(images, questions, budget * FACTOR**2)
    for key in ("input_ids", "attention_mask", "image_grid_thw") + (("mm_token_type_ids",) if "mm_token_type_ids" in ref
                                                                     else ()):
        assert torch.equal(ref[key], got[key]), key
    assert got["pixel_values_u8"].dtype == torch.uint8
    torch.testing.assert_close(fast.layout.normalize(got["pixel_values_u8"]), ref["pixel_values"], atol=1e-5, rtol=0)


def test_glyph_targets_name_the_character_under_each_feature():
    """Every glyph target row lies inside its image's features and names a code character of a plate in view."""
    from qzoom_adapters.benchmarks.zoomworld.model import zoomworld_processor
    from qzoom_adapters.benchmarks.zoomworld.train import AnswerCollate, StreamDataset

    processor = zoomworld_processor()
    ds = StreamDataset(4, crop_p=1.0)
    items = [ds[i] for i in range(4)]
    batch = AnswerCollate(processor, (256,))(items)
    grids = batch["inputs"]["image_grid_thw"]
    total = int((grids[:, 1] * grids[:, 2]).sum()) // 4
    rows, ids = batch["glyph_rows"], batch["glyph_ids"]
    assert len(rows) > 0 and int(rows.max()) < total and len(set(rows.tolist())) == len(rows)
    chars = {c for it in items for c, *_ in it["glyphs"]}
    assert set(processor.tokenizer.convert_ids_to_tokens(ids.tolist())) <= chars


def test_a_config_saved_by_5x_loads_on_either_line(tmp_path):
    """5.x writes rope settings only as `rope_parameters`: load_backbone must still build the same M-RoPE model
    (4.57 used to lose `mrope_section` and crash)."""
    import json

    import torch

    from qzoom_adapters.benchmarks.zoomworld.model import new_model
    from qzoom_adapters.recipes.models import load_backbone

    model, processor = new_model()
    model.eval().save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for sub in (cfg, cfg["text_config"]):  # the 5.x form, whichever line wrote it
        sub.pop("rope_scaling", None)
        sub.pop("rope_theta", None)
    cfg["text_config"]["rope_parameters"] = {"mrope_section": [8, 8, 8], "rope_theta": 10000.0, "rope_type": "default",
                                             "type": "mrope"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded, _, spec = load_backbone(str(tmp_path), device="cpu")
    inputs = spec.chat_inputs(processor, [make_sample(VAL_SEED).image], ["What is written on the red plate?"],
                              pixels=64 * 28 * 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)


def test_recipe_setup_loads_as_a_recipe(tmp_path):
    """`qzoom_adapters.benchmarks.zoomworld.recipe` writes records the recipes read (boxes on the stage-1 ones) and a valid YAML."""
    from qzoom_adapters.benchmarks.zoomworld.recipe import write_setup
    from qzoom_adapters.recipes.config import load_config
    from qzoom_adapters.recipes.data import read_records

    setup = write_setup(tmp_path / "run", tmp_path / "model", n=2, grid=4)
    cfg = load_config(setup / "recipe.yaml")
    stage1, pool = read_records(setup / "records.jsonl"), read_records(setup / "pool.jsonl")
    assert cfg.K == 4 and cfg.stage2 is not None and cfg.mine.keep == "zoomed"
    assert len(stage1) == len(pool) == 2 and all(r.box is not None for r in stage1)
    assert all((setup / r.image).is_file() for r in stage1 + pool) and {r.id for r in stage1}.isdisjoint(r.id for r in pool)


def test_recipe_setup_with_workers_writes_the_same_records_and_images(tmp_path):
    """Scenes drawn in worker processes are the serial ones, byte for byte, and the recipe's data loaders
    get the worker count."""
    from qzoom_adapters.benchmarks.zoomworld.recipe import write_setup
    from qzoom_adapters.recipes.config import load_config

    serial = write_setup(tmp_path / "serial", tmp_path / "model", n=3, grid=4, n_gate=3)
    parallel = write_setup(tmp_path / "parallel", tmp_path / "model", n=3, grid=4, n_gate=3, workers=2)
    for name in ("records.jsonl", "pool.jsonl", "gate.jsonl"):
        assert (serial / name).read_text() == (parallel / name).read_text()
    images = sorted(q.name for q in (serial / "images").iterdir())
    assert images == sorted(q.name for q in (parallel / "images").iterdir()) and len(images) == 9
    assert all((serial / "images" / f).read_bytes() == (parallel / "images" / f).read_bytes() for f in images)
    cfg = load_config(parallel / "recipe.yaml")
    assert cfg.labels_stage1.num_workers == 2 and cfg.stage1.train.num_workers == 2
    with pytest.raises(ValueError, match="workers"):
        write_setup(tmp_path / "bad", tmp_path / "model", n=1, workers=-1)


def test_code_size_is_set_in_visual_tokens():
    """A character advances about one merged token (28 px) of the 1024-token view, and the code is a few
    pixels high at 64 tokens (too small to read), whatever the scene's size."""
    from qzoom_adapters.benchmarks.zoomworld.batches import budget_size
    from qzoom_adapters.benchmarks.zoomworld.generator import ADVANCE_1024

    lo, hi = ADVANCE_1024
    plain = []
    for seed in range(12):
        image, plates = make_scene(VAL_SEED + seed)
        W, H = image.size
        largest = max(plates, key=lambda p: p.area)
        h, w = budget_size(W, H, 1024 * 28 * 28, 28)
        h64, _ = budget_size(W, H, 64 * 28 * 28, 28)
        for p in plates:
            (_, (a1, _, _, _)), _, (_, (c1, _, _, _)) = p.glyphs
            advance = (c1 - a1) / 2 * w / W  # first to last character, per character (glyph widths vary)
            scale = 1.0  # every plate, the largest too
            assert 0.8 * lo * scale <= advance <= 1.5 * hi * scale, (seed, p.colour, advance)
            plain.append(advance)
            assert max(g[1][3] - g[1][1] for g in p.glyphs) * h64 / H <= 10.0 * scale  # px high at 64 tokens
    assert 0.9 * lo <= sum(plain) / len(plain) <= 1.1 * hi


def test_oracle_box_cells_cover_exactly_the_cells_the_box_touches():
    from qzoom_adapters.benchmarks.zoomworld.probes import box_cells

    m = box_cells((150, 0, 151, 99), (1000, 500), 5, 10)  # x in cell 1, y 0..99 -> row 0 only (100 px per row)
    assert m.sum() == 1 and m[0, 1] == 1
    m = box_cells((95, 95, 305, 105), (1000, 500), 5, 10)  # touches columns 0..3 and rows 0..1
    assert m.nonzero().tolist() == [[r, c] for r in (0, 1) for c in range(4)]
    assert box_cells((0, 0, 1000, 500), (1000, 500), 5, 10).all()


def test_training_script_runs_under_two_processes(tmp_path):
    """`torchrun --nproc_per_node 2 -m qzoom_adapters.benchmarks.zoomworld.train` (gloo on CPU): the run reports two processes
    and its planned steps, one model folder is saved; --plan-seconds is refused there with a clear error."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
            "-m", "qzoom_adapters.benchmarks.zoomworld.train", "--batch-size", "1", "--num-workers", "0", "--budgets", "64",
            "--crop-p", "1.0"]
    run = subprocess.run(base + ["--out", str(tmp_path / "ddp"), "--steps", "2"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    done = json.loads((tmp_path / "ddp" / "training_complete.json").read_text())
    assert done["processes"] == 2 and done["step"] == 2 and (tmp_path / "ddp" / "model" / "config.json").is_file()
    refused = subprocess.run(base + ["--out", str(tmp_path / "plan"), "--plan-seconds", "5"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "--plan-seconds measures one process" in refused.stderr


def test_detail_samples_ask_every_plate_and_the_largest_is_large_by_its_margin():
    """The largest plate's code is drawn at the same scale as the others (no question filter is needed); it
    is asked like any other plate."""
    from qzoom_adapters.benchmarks.zoomworld.generator import make_scene

    asked_largest = 0
    for i in range(40):
        s = make_sample(VAL_SEED + i, "detail")
        largest = max(s.plates, key=lambda p: p.area)
        assert s.kind == "code" and s.answer == next(p.code for p in s.plates if p.box == s.box)
        asked_largest += s.box == largest.box
    assert asked_largest >= 5
    for seed in range(12):
        _, plates = make_scene(VAL_SEED + seed)
        heights = [max(g[1][3] - g[1][1] for g in p.glyphs) for p in plates]
        largest = max(range(len(plates)), key=lambda k: plates[k].area)
        others = [h for k, h in enumerate(heights) if k != largest]
        if others:  # font sizes are drawn from one range for every plate
            assert heights[largest] <= 1.4 * max(others), (seed, heights)


def test_grounding_answers_round_trip_and_stay_on_the_grid():
    from qzoom_adapters.benchmarks.zoomworld.generator import box_text, grounding_questions, make_scene, parse_box_text

    image, plates = make_scene(VAL_SEED + 1)
    for q, a, family, kind, box in grounding_questions(plates, image.size):
        assert family == "grounding"
        if kind == "reverse":
            assert a == next(p.colour for p in plates if p.box == box) and "reads" in q
            continue
        back = parse_box_text(a, image.size)
        assert all(abs(u - v) <= max(image.size) / 1000 + 1 for u, v in zip(back, box))
        assert all(0 <= int(v) <= 1000 for v in a.strip("[]").split(","))
    assert box_text((0, 0, 50, 10), (100, 100)) == "[0,0,500,100]"
    assert parse_box_text("[5,5,5,9]", (100, 100)) is None and parse_box_text("red", (100, 100)) is None


def test_training_items_carry_grounding_in_view_coordinates():
    from qzoom_adapters.benchmarks.zoomworld.generator import parse_box_text
    from qzoom_adapters.benchmarks.zoomworld.train import StreamDataset

    ds = StreamDataset(40, crop_p=0.3, square_p=0.5)
    kinds = set()
    for i in range(40):
        it = ds[i]
        for q, a in it["qas"]:
            if a.startswith("["):
                box = parse_box_text(a, it["image"].size)
                assert box is not None
                kinds.add("box")
                # the box in the view's coordinates is a plate: its pixels are not the grey pad nor clutter grey
                x1, y1, x2, y2 = box
                px = it["image"].getpixel(((x1 + x2) // 2, y1 + max(2, (y2 - y1) // 8)))
                assert max(px) - min(px) > 60, (i, q, a, px)
            elif "reads" in q:
                kinds.add("reverse")
    assert kinds == {"box", "reverse"}
    assert all(q for q, _ in StreamDataset(5, grounding=False)[0]["qas"])
    assert not any(a.startswith("[") for i in range(5) for _, a in StreamDataset(5, grounding=False)[i]["qas"])


def test_threshold_choice_maximises_the_worst_rate_over_budgets():
    from qzoom_adapters.benchmarks.zoomworld.threshold import choose, rates

    fam = ["detail"] * 4 + ["global"] * 4
    probs = {64: [0.9, 0.8, 0.7, 0.95, 0.1, 0.75, 0.2, 0.3], 128: [0.85, 0.6, 0.75, 0.9, 0.1, 0.1, 0.65, 0.2]}
    got = choose(probs, fam)
    # no threshold separates both budgets; the worst rate is at most 3/4, reached in the gaps 0.3-0.6 (one global
    # question fires at each budget) and 0.65-0.7 (a 128-token detail question is missed): the wider one wins
    assert got["threshold"] == pytest.approx(0.45) and got["worst_rate"] == 0.75
    assert got["rates"] == rates(probs, fam, 0.45)
    assert got["rates"][64] == {"fires_detail": 1.0, "skips_global": 0.75, "detail_needing": 4}
    assert got["rates"][128] == {"fires_detail": 1.0, "skips_global": 0.75, "detail_needing": 4}
    sep = choose({64: [0.99, 0.97, 0.2, 0.5]}, ["detail", "detail", "global", "global"])
    assert sep["worst_rate"] == 1.0 and sep["threshold"] == pytest.approx(0.735)  # the middle of the widest gap


def test_threshold_counts_only_the_detail_questions_the_budget_gets_wrong():
    """A detail question the budget already answers needs no zoom: missing it costs nothing."""
    from qzoom_adapters.benchmarks.zoomworld.threshold import choose, rates

    fam = ["detail", "detail", "global", "global"]
    probs = {64: [0.9, 0.3, 0.5, 0.1]}
    assert rates(probs, fam, 0.6)[64]["fires_detail"] == 0.5
    need = {64: [True, False, False, False]}  # the 2nd detail question is answered right at 64 tokens
    assert rates(probs, fam, 0.6, need)[64] == {"fires_detail": 1.0, "skips_global": 1.0, "detail_needing": 1}
    got = choose(probs, fam, need)
    assert got["worst_rate"] == 1.0 and 0.5 < got["threshold"] < 0.9
    assert choose(probs, fam)["worst_rate"] < 1.0  # without `need` the 0.3 question must fire too


def test_binding_targets_point_at_the_asked_plate_and_the_loss_reads_them():
    """The binding loss's rows are an answer's first row (a box's first rows) and the question's colour word;
    their targets are exactly the image tokens whose merged cells touch the asked plate."""
    import torch

    from qzoom_adapters.benchmarks.zoomworld.model import FACTOR, new_model
    from qzoom_adapters.benchmarks.zoomworld.probes import box_cells
    from qzoom_adapters.benchmarks.zoomworld.train import AnswerCollate, AnswerObjective, stream_item

    model, processor = new_model(0)
    item = stream_item(3_000_001, crop_p=0.0, square_p=0.0)
    (q, a), box = item["qas"][0], item["boxes"][0]
    assert box is not None, "seed chosen so that the first question is about a plate"
    one = dict(item, qas=[(q, a)], boxes=[box])
    batch = AnswerCollate(processor, (64,))([one])
    ids, tok = batch["inputs"]["input_ids"][0], processor.tokenizer
    rows = batch["bind_rows"][0][batch["bind_valid"][0]].tolist()
    texts = [tok.decode(ids[r]) for r in rows]
    assert texts[0] == "\n"  # the row before the answer: the end of the assistant header
    n_answer = min(len(a), 8) if a.startswith("[") else 1
    colour = next(c for c in ("red", "blue", "green", "yellow", "purple", "orange") if f" {c} " in q)
    assert len(rows) == n_answer + 1 and texts[-1] == colour[-1]
    _, gh, gw = batch["inputs"]["image_grid_thw"][0].tolist()
    cells = box_cells(box, one["image"].size, gh * 14 // FACTOR, gw * 14 // FACTOR).flatten().bool()
    image_pos = (ids == tok.convert_tokens_to_ids("<|image_pad|>")).nonzero().flatten()
    for r in range(len(rows)):
        assert torch.equal(batch["bind_target"][0, r].nonzero().flatten(), image_pos[cells])
    objective = AnswerObjective(model, processor, bind_weight=1.0)
    total, answer, glyph, bind = objective(batch, parts=True)
    assert bind > 0 and torch.isclose(total, answer + glyph + bind, atol=1e-5)
    objective.bind_weight = 0.0
    assert torch.isclose(objective(batch), answer + glyph, atol=1e-5)


def test_box_probe_at_fraction_zero_is_the_whole_image():
    """`box_probe`: fraction 0 keeps every pixel (the whole image: hit 1, the largest area); its SPEC row is the
    pipeline's own box."""
    from qzoom_adapters.benchmarks.zoomworld.box_probe import peak_box, probe
    import torch

    m = torch.zeros(4, 6)
    m[1, 2] = 1.0
    assert peak_box(m, (60, 40), 0.0) == (0, 0, 60, 40)
    x1, y1, x2, y2 = peak_box(m, (60, 40), 0.9)  # the one lit cell, spans 10 px: inside it, smaller than it
    assert 20 <= x1 < x2 <= 30 and 10 <= y1 < y2 <= 20 and (x2 - x1) < 10
    report = probe(n_val=4, budgets=[64], fractions=[0.0, 0.7], batch_size=4)
    rows = report["budgets"][64]
    assert rows["peak_0"]["box_hit_rate"] == 1.0 and report["n_detail"] == 2
    assert rows["peak_0"]["box_area_median"] >= rows["spec"]["box_area_median"]  # the whole image is the largest
    assert set(rows) == {"spec", "peak_0", "peak_0.7"} and all(0 <= r["box_iou_mean"] <= 1 for r in rows.values())
