"""Issue 19, inference side: bad input, damaged files and misuse give one clear error, never a silent wrong result."""
from __future__ import annotations

import json
import os
import shutil
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import qzoom_adapters as qz
from qzoom_adapters.backbones.qwen2_5_vl import Qwen2_5_VLSpec
from qzoom_adapters.backbones.tiny_processor import TINY_VOCAB_SIZE, tiny_llava_processor, tiny_qwen2_5_vl_processor
from qzoom_adapters.hooks import capture_layer_input
from qzoom_adapters.images import load_image, source_image
from qzoom_adapters.model_files import load_model
from qzoom_adapters.recipes.cli import main
from qzoom_adapters.testing import synthetic_image

K, T = 3, 3
Q = "What is written on the red plate?"


def _model(seed: int = 3):
    torch.manual_seed(seed)
    cfg = Qwen2_5_VLSpec.tiny_config(text={"vocab_size": TINY_VOCAB_SIZE})
    model = Qwen2_5_VLSpec.model_class()._from_config(cfg).eval()
    model.generation_config.eos_token_id = 2
    return model


@pytest.fixture(scope="module")
def proc():
    return tiny_qwen2_5_vl_processor()


@pytest.fixture(scope="module")
def zoom(proc):
    model = _model()
    twig, gate = qz.TwigRPN.from_backbone(model, K, T), qz.DynamicGate.from_backbone(model, K, T)
    return qz.QZoom(model, proc, twig=twig, gate=gate, config=qz.ZoomConfig(gate_threshold=0.0, roi_threshold=0.0))


@pytest.fixture(scope="module")
def image():
    return synthetic_image(300, 200, 6)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, zoom, proc):
    """model/ (with its processor) and adapters/ written once for the file tests."""
    root = tmp_path_factory.mktemp("saved")
    zoom.model.save_pretrained(root / "model")
    proc.save_pretrained(root / "model")
    zoom.save_pretrained(root / "adapters")
    return root


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _cli(capsys, *argv):
    rc = main(["infer", *argv])
    err = capsys.readouterr().err
    return rc, err


# --- 1. max_new_tokens ---------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -2, 1.5, "3", True])
def test_max_new_tokens_must_be_a_positive_int(zoom, image, bad):
    with pytest.raises(qz.QZoomError, match="max_new_tokens"):
        zoom.generate([image], [Q], max_new_tokens=bad)
    inputs = zoom.spec.chat_inputs(zoom.processor, [image], [Q])
    with pytest.raises(qz.QZoomError, match="max_new_tokens"):
        zoom.generate_from_inputs(inputs, [image], max_new_tokens=bad)


# --- 2. threads ------------------------------------------------------------------------------
def test_two_threads_share_one_qzoom(zoom, image):
    images = [image, synthetic_image(200, 260, 5)]
    expected = [zoom.generate([im], [Q], max_new_tokens=4)[0].tokens for im in images]
    barrier, results, errors = threading.Barrier(2), {}, []

    def run(j):
        try:
            barrier.wait()
            results[j] = [zoom.generate([images[j]], [Q], max_new_tokens=4)[0].tokens for _ in range(3)]
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(j,)) for j in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == {j: [expected[j]] * 3 for j in range(2)}
    assert "serialized" in qz.QZoom.generate.__doc__


def test_capture_hook_ignores_other_threads(zoom, image):
    """A forward of the same model in another thread passes our stop-hook untouched."""
    spec = zoom.spec
    inputs = spec.chat_inputs(zoom.processor, [image], [Q])
    errors, done = [], []

    def other():
        try:
            out = zoom.model(**inputs, use_cache=False)
            done.append(out.logits.shape)
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    with capture_layer_input(spec.layers[K], stop=True) as cap:
        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert cap.hidden is None  # the other thread's forward was not captured
    assert not errors and len(done) == 1


# --- 7. reference checkpoints ------------------------------------------------------------------
@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A released-layout checkpoint (twig/gate tensors inside model.safetensors, Q-Zoom config fields)."""
    path = tmp_path_factory.mktemp("released")
    model = _model(11)
    twig, gate = qz.TwigRPN.from_backbone(model, K, T), qz.DynamicGate.from_backbone(model, K, T)
    model.save_pretrained(path)
    tensors = load_file(str(path / "model.safetensors"))
    tensors.update({f"model.twig_{k}": v for k, v in twig.state_dict().items()})
    tensors.update({f"model.high_res_{k}": v for k, v in gate.state_dict().items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg.update({"twig_K": K, "twig_T": T, "high_res_K": K, "high_res_T": T, "reuse_src_pos": True,
                "high_res_thresh": 0.1, "roi_conf_thresh": 0.2})
    (path / "config.json").write_text(json.dumps(cfg))
    return path, twig


def test_reference_checkpoint_reads_only_its_own_weights(released, tmp_path, proc):
    src, twig = released
    path = _copy(src, tmp_path / "ck")
    stray = {f"model.twig_{k}": torch.full_like(v, float("nan")) for k, v in twig.state_dict().items()}
    save_file(stray, str(path / "zz_stray.safetensors"))
    loaded = qz.QZoom.from_reference_checkpoint(path, proc)
    for (name, a), b in zip(loaded.twig.state_dict().items(), twig.state_dict().values()):
        assert torch.equal(a, b), name
    # sharded layout: the index decides; without model.safetensors or an index two files are ambiguous
    (path / "model.safetensors").rename(path / "model-00001-of-00001.safetensors")
    with pytest.raises(qz.QZoomError, match="several \\*.safetensors files"):
        qz.QZoom.from_reference_checkpoint(path, proc)
    keys = load_file(str(path / "model-00001-of-00001.safetensors")).keys()
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in keys}}))
    loaded = qz.QZoom.from_reference_checkpoint(path, proc)
    assert all(torch.isfinite(p).all() for p in loaded.twig.parameters())


@pytest.mark.parametrize("key,value", [("high_res_thresh", "abc"), ("twig_K", "x"), ("high_res_K", 2.5),
                                       ("roi_conf_thresh", float("nan"))])
def test_reference_config_bad_values_name_the_key(released, tmp_path, proc, key, value):
    path = _copy(released[0], tmp_path / "ck")
    cfg = json.loads((path / "config.json").read_text())
    cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(qz.QZoomError, match=key):
        qz.QZoom.from_reference_checkpoint(path, proc)


# --- non-finite pixel values, thresholds ---------------------------------------------------------
def test_non_finite_pixel_values_are_refused(zoom, image):
    inputs = zoom.spec.chat_inputs(zoom.processor, [image], [Q])
    for bad in (float("nan"), float("inf")):
        pv = inputs["pixel_values"].clone()
        pv[3, 5] = bad
        with pytest.raises(qz.QZoomError, match="NaN or inf"):
            zoom.generate_from_inputs({**inputs, "pixel_values": pv}, [image], max_new_tokens=2)


@pytest.mark.parametrize("field,value", [("roi_threshold", float("nan")), ("roi_threshold", 15.0),
                                         ("roi_threshold", -5.0), ("roi_threshold", float("inf")),
                                         ("gate_threshold", float("nan")), ("gate_threshold", -1.0)])
def test_thresholds_are_validated(zoom, saved, field, value):
    with pytest.raises(ValueError, match=field):
        qz.ZoomConfig(**{field: value})
    with pytest.raises(qz.QZoomError, match=field):
        qz.QZoom.from_pretrained(saved / "adapters", zoom.model, **{field: value})
    before = zoom.config
    with pytest.raises(qz.QZoomError, match=field):  # model_copy(update=) skips pydantic: the setter checks
        zoom.config = before.model_copy(update={field: value})
    assert zoom.config is before
    # the documented sentinels stay valid: gate > 1 = never, roi < 0 = whole grid, roi >= 1 = never a box
    qz.ZoomConfig(gate_threshold=2.0, roi_threshold=-1.0)
    qz.ZoomConfig(roi_threshold=2.0)


@pytest.mark.parametrize("flag,value", [("--gate-threshold", "-1"), ("--gate-threshold", "nan"),
                                        ("--roi-threshold", "nan")])
def test_cli_bad_threshold_is_one_line(tmp_path, capsys, flag, value):
    rc, err = _cli(capsys, "--model", str(tmp_path), "--adapters", str(tmp_path), "--image", "x.png",
                   "--question", "q", flag, value)
    assert rc == 2 and flag.strip("-").replace("-", "_") in err and len(err.strip().splitlines()) == 1


# --- images: modes, paths, arrays ------------------------------------------------------------
def test_sixteen_bit_images_are_scaled_not_clipped(zoom, tmp_path):
    arr16 = np.linspace(0, 65535, 120 * 160).reshape(120, 160).astype(np.uint16)
    im16 = Image.fromarray(arr16)
    assert im16.mode == "I;16"
    rgb = source_image(im16)
    expected = np.round(arr16.astype(np.float64) / 257).astype(np.uint8)  # 65535 / 255 = 257
    assert rgb.mode == "RGB" and np.array_equal(np.asarray(rgb), np.repeat(expected[..., None], 3, axis=2))
    assert np.asarray(im16.convert("RGB")).mean() > 250  # what PIL alone does: (nearly) all white
    im16.save(tmp_path / "g16.png")
    assert np.array_equal(np.asarray(load_image(tmp_path / "g16.png")), np.asarray(rgb))
    # the pipeline sees the scaled image, for the global view and the crop
    out16 = zoom.generate([im16], [Q], max_new_tokens=3)[0]
    out8 = zoom.generate([Image.fromarray(expected).convert("RGB")], [Q], max_new_tokens=3)[0]
    assert (out16.tokens, out16.bbox) == (out8.tokens, out8.bbox)
    with pytest.raises(qz.QZoomError, match="floating-point"):
        source_image(Image.fromarray(np.zeros((40, 40), np.float32)))


def test_images_as_paths_arrays_or_none(zoom, image, tmp_path):
    image.save(tmp_path / "img.png")
    by_path = zoom.generate([str(tmp_path / "img.png")], [Q], max_new_tokens=3)[0]
    by_pil = zoom.generate([image], [Q], max_new_tokens=3)[0]
    assert (by_path.tokens, by_path.bbox) == (by_pil.tokens, by_pil.bbox)
    with pytest.raises(qz.QZoomError, match="ndarray.*fromarray"):
        zoom.generate([np.asarray(image)], [Q], max_new_tokens=3)
    with pytest.raises(qz.QZoomError, match="images\\[0\\] is None"):
        zoom.generate([None], [Q], max_new_tokens=3)
    with pytest.raises(qz.QZoomError, match="one source image per sample"):
        zoom.generate(image, [Q], max_new_tokens=3)


def test_decompression_bomb_is_a_clear_error(tmp_path, monkeypatch, capsys):
    synthetic_image(120, 100).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 12000 px > 2 x limit: what a 225 MP file hits
    with pytest.raises(qz.QZoomError, match="too large to decode safely"):
        load_image(tmp_path / "big.png")
    rc, err = _cli(capsys, "--model", str(tmp_path), "--adapters", str(tmp_path), "--image", str(tmp_path / "big.png"),
                   "--question", "q")
    assert rc == 2 and "too large to decode safely" in err and len(err.strip().splitlines()) == 1


# --- adapter files ------------------------------------------------------------------------------
def _edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def test_damaged_or_edited_adapters_are_refused(zoom, saved, tmp_path):
    model = zoom.model
    path = _copy(saved / "adapters", tmp_path / "nan")
    tensors = load_file(str(path / "adapter_model.safetensors"))
    name = sorted(k for k in tensors if k.startswith("twig."))[2]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt", "K": str(K), "T": str(T)})
    with pytest.raises(qz.QZoomError, match=f"tensor '{name}' holds NaN"):
        qz.QZoom.from_pretrained(path, model=model)
    for changes, match in (({"K": 4}, "says K=4 but adapter_model.safetensors was saved with K=3"),
                           ({"num_hidden_layers": 99}, "99 decoder layers"),
                           ({"model_type": "bert"}, "model_type 'bert'")):
        path = _copy(saved / "adapters", tmp_path / f"edit{len(list(tmp_path.iterdir()))}")
        _edit_config(path, **changes)
        with pytest.raises(qz.QZoomError, match=match):
            qz.QZoom.from_pretrained(path, model=model)


def test_truncated_weights_name_the_file(saved, tmp_path, zoom):
    adapters = _copy(saved / "adapters", tmp_path / "adapters")
    data = (adapters / "adapter_model.safetensors").read_bytes()
    (adapters / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(qz.QZoomError, match="adapter_model.safetensors.*truncated"):
        qz.QZoom.from_pretrained(adapters, model=zoom.model)
    model_dir = _copy(saved / "model", tmp_path / "model")
    data = (model_dir / "model.safetensors").read_bytes()
    (model_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(qz.QZoomError, match="model.safetensors.*truncated"):
        load_model(model_dir)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_weights_fifo_is_refused_not_waited_on(saved, tmp_path, zoom, capsys):
    adapters = _copy(saved / "adapters", tmp_path / "adapters")
    (adapters / "adapter_model.safetensors").unlink()
    os.mkfifo(adapters / "adapter_model.safetensors")
    with pytest.raises(qz.QZoomError, match="not a regular file"):
        qz.QZoom.from_pretrained(adapters, model=zoom.model)
    model_dir = _copy(saved / "model", tmp_path / "model")
    (model_dir / "model.safetensors").unlink()
    os.mkfifo(model_dir / "model.safetensors")
    with pytest.raises(qz.QZoomError, match="not a regular file"):
        load_model(model_dir)
    os.mkfifo(tmp_path / "img.png")
    rc, err = _cli(capsys, "--model", str(model_dir), "--adapters", str(adapters), "--image", str(tmp_path / "img.png"),
                   "--question", "q")
    assert rc == 2 and "not a regular file" in err


# --- grids and inputs ----------------------------------------------------------------------------
def test_grid_and_source_image_must_agree(zoom, image):
    inputs = zoom.spec.chat_inputs(zoom.processor, [image], [Q])
    t, h, w = inputs["image_grid_thw"][0].tolist()
    assert h != w
    swapped = {**inputs, "image_grid_thw": torch.tensor([[t, w, h]])}
    with pytest.raises(qz.QZoomError, match="h and w swapped"):
        zoom.generate_from_inputs(swapped, [image], max_new_tokens=2)
    with pytest.raises(qz.QZoomError, match="another aspect ratio"):  # not the image that was encoded
        zoom.generate_from_inputs(inputs, [synthetic_image(120, 400, 1)], max_new_tokens=2)
    # a larger original of the same picture is fine (the processor saw a downscaled copy)
    zoom.generate_from_inputs(inputs, [image.resize((600, 400))], max_new_tokens=2)


def test_bad_batches_and_grids(zoom, image):
    with pytest.raises(qz.QZoomError, match="empty batch"):
        zoom.generate([], [], max_new_tokens=2)
    inputs = zoom.spec.chat_inputs(zoom.processor, [image], [Q])
    empty = {k: (v[:0] if k in ("input_ids", "attention_mask") else v) for k, v in inputs.items()}
    with pytest.raises(qz.QZoomError, match="empty batch"):
        zoom.generate_from_inputs(empty, [], max_new_tokens=2)
    few = {**inputs, "pixel_values": inputs["pixel_values"][:-4]}
    with pytest.raises(qz.QZoomError, match="patch rows"):
        zoom.generate_from_inputs(few, [image], max_new_tokens=2)
    t, h, w = inputs["image_grid_thw"][0].tolist()
    video = {**inputs, "image_grid_thw": torch.tensor([[2, h, w]])}
    with pytest.raises(qz.QZoomError, match="t=1"):
        zoom.generate_from_inputs(video, [image], max_new_tokens=2)


# --- config and processor misuse -------------------------------------------------------------------
def test_config_as_dict_is_validated(zoom):
    before = zoom.config
    try:
        zoom.config = {"gate_threshold": 2.0, "roi_threshold": 0.3}
        assert isinstance(zoom.config, qz.ZoomConfig) and zoom.config.gate_threshold == 2.0
        assert zoom.config.position_mode == "aligned"
        with pytest.raises(qz.QZoomError, match="gate_threshold"):
            zoom.config = {"gate_threshold": "often"}
        with pytest.raises(qz.QZoomError, match="ZoomConfig or a dict"):
            zoom.config = 0.5
    finally:
        zoom.config = before


def test_processor_of_another_family_is_named(zoom):
    with pytest.raises(qz.QZoomError, match="processor belongs to another model"):
        qz.QZoom(zoom.model, tiny_llava_processor(), twig=zoom.twig)


def test_huge_crop_budget_is_refused(zoom):
    with pytest.raises(qz.QZoomError, match="crop_min_pixels=100000000.*limit"):
        qz.QZoom(zoom.model, zoom.processor, twig=zoom.twig, config=qz.ZoomConfig(crop_min_pixels=1e8))
    with pytest.raises(qz.QZoomError, match="crop_max_pixels"):
        zoom.config = zoom.config.model_copy(update={"crop_max_pixels": 10**9})
    spec, ip = zoom.spec, zoom.image_processor  # recipes call process_crops directly: checked there too
    with pytest.raises(qz.QZoomError, match="crop_min_pixels"):
        spec.process_crops(ip, [synthetic_image(40, 40)], 10**8, 10**8)


# --- qzoom infer: everything checked before the model loads --------------------------------------------
def test_cli_bad_images_fail_before_loading(saved, tmp_path, capsys, image):
    (tmp_path / "empty.png").write_bytes(b"")
    image.save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 3])
    (tmp_path / "text.png").write_text("not an image")
    nowhere = str(tmp_path / "no-model")  # the image error must come first: no model is ever loaded
    for name, match in (("empty.png", "empty file"), ("trunc.png", "truncated or corrupt"),
                        ("text.png", "not an image"), ("missing.png", "does not exist"), (".", "is a folder")):
        rc, err = _cli(capsys, "--model", nowhere, "--adapters", nowhere, "--image", str(tmp_path / name),
                       "--question", "q")
        assert rc == 2 and match in err and len(err.strip().splitlines()) == 1, (name, err)


def test_cli_bad_model_paths(saved, tmp_path, capsys, image):
    image.save(tmp_path / "img.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "config_only").mkdir()
    shutil.copy(saved / "model" / "config.json", tmp_path / "config_only")
    img = ["--image", str(tmp_path / "img.png"), "--question", "q"]
    for argv, match in (
        (["--model", str(tmp_path / "nowhere"), "--adapters", str(saved / "adapters")], "nowhere does not exist"),
        (["--reference", str(tmp_path / "nowhere")], "nowhere does not exist"),
        (["--model", str(tmp_path / "empty"), "--adapters", str(saved / "adapters")], "no config.json"),
        (["--model", str(tmp_path / "config_only"), "--adapters", str(saved / "adapters")], "holds no model weights"),
        (["--model", str(saved / "model"), "--adapters", str(tmp_path / "nowhere")], "adapter folder"),
        (["--model", str(saved / "model"), "--adapters", str(saved / "adapters"), "--processor",
          str(tmp_path / "empty")], "cannot load a processor"),
    ):
        rc, err = _cli(capsys, *argv, *img)
        assert rc == 2 and match in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_cli_heatmap_target_is_checked_and_never_the_input(saved, tmp_path, capsys, image):
    image.save(tmp_path / "img.png")
    before = (tmp_path / "img.png").read_bytes()
    (tmp_path / "old.png").write_bytes(b"keep me")
    base = ["--model", str(saved / "model"), "--adapters", str(saved / "adapters"), "--image",
            str(tmp_path / "img.png"), "--question", "q", "--max-new-tokens", "2"]
    for heat, extra, match in ((tmp_path / "no" / "h.png", [], "does not exist"),
                               (tmp_path / "h.txt", [], "not an image format"),
                               (tmp_path / "old.png", [], "pass --overwrite"),
                               (tmp_path / "img.png", ["--overwrite"], "is the input image"),
                               (tmp_path, [], "is a folder")):
        rc, err = _cli(capsys, *base, "--heatmap", str(heat), *extra)
        assert rc == 2 and match in err, (heat, err)
    assert (tmp_path / "img.png").read_bytes() == before and (tmp_path / "old.png").read_bytes() == b"keep me"
    rc, _ = _cli(capsys, *base, "--heatmap", str(tmp_path / "old.png"), "--overwrite")
    assert rc == 0
    with Image.open(tmp_path / "old.png") as heat:
        assert heat.size == image.size


def test_truncated_images_are_refused_even_when_pil_is_told_to_pad_them(tmp_path, image):
    """lmms-eval sets PIL's process-wide LOAD_TRUNCATED_IMAGES on import; our loader still refuses a cut file and
    leaves the flag as it found it."""
    from PIL import ImageFile

    from qzoom_adapters.images import load_image

    image.save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 3])
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with pytest.raises(qz.QZoomError, match="truncated or corrupt"):
            load_image(tmp_path / "trunc.png")
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved
