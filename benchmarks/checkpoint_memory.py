"""Peak host memory of loading a released Q-Zoom checkpoint at real scale (no download).

A synthetic checkpoint with the shapes of Qwen2.5-VL-7B (its public config, `benchmarks.speed.SHAPES`) is written
in the released layout (SPEC §6: transformers 4.51 keys `model.layers.*` / `visual.*`, the Q-Zoom tensors under
`model.twig_layers.*` / `model.high_res_layers.*` / `model.high_res_head.*`, bf16, sharded with an index), with
random weights, one shard at a time. Then a fresh process loads it with `QZoom.from_reference_checkpoint`
(`torch_dtype="auto"`) and reports its peak resident memory (Linux `VmHWM`, reset after the imports) during the
load and after reading every weight once (transformers may leave weights mmap-backed, resident only once read),
next to the checkpoint's size. Held once, the peak after reading is about the checkpoint's bytes (the base model
plus the twig and gate, whose tensors the checkpoint holds too); holding a second copy (`--control`) adds as much
again.

`--device cuda` (or cuda:N) loads onto that GPU instead, through the loader's device-map path (`device=` becomes
`device_map={"": "cuda:N"}`), and also reports the GPU's peak allocated memory (`torch.cuda.max_memory_allocated`,
counted from the CUDA context being up) next to the checkpoint's size: about 1x held once; the host's peak RSS is
then what the load passed through host memory on the way (0 for none, 1x for all of it at once).

    python -m qzoom_adapters.benchmarks.checkpoint_memory --out ckpt_memory.json [--layers 28] [--dir DIR]
        [--device cuda]

`--layers` (decoder layers, default 28 = the full 7B) and `--vocab` shrink the shape to what a machine's memory
and disk allow; the report gives the per-layer cost so the full shape can be extrapolated.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

SHAPE = "qwen2_5_vl_7b"
SHARD_BYTES = 2 << 30  # 2 GiB per shard, as released checkpoints are sharded


@dataclass
class CheckpointShape:
    """The synthetic checkpoint's shape: the 7B widths with `layers` decoder layers, `vocab` tokens and
    `vision_depth` vision blocks (None: the 7B's own)."""

    layers: int = 28
    vocab: int | None = None
    vision_depth: int | None = None
    intermediate: int | None = None
    K: int = 18
    T: int = 3


@dataclass
class MemoryReport:
    """What one measurement found (bytes unless named otherwise)."""

    shape: dict
    checkpoint_bytes: int
    adapter_bytes: int
    parameters: int
    baseline_rss: int  # after importing torch, transformers and qzoom_adapters
    peak_rss_during_load: int  # VmHWM after the load, counted from the reset after the imports
    peak_rss_after_reading: int  # VmHWM after also reading every weight once (mmap-backed pages become resident)
    peak_over_checkpoint: float  # (after reading - baseline) / checkpoint bytes: ~1 held once, ~2 held twice
    control_peak_over_checkpoint: float | None  # the same with a second copy of every tensor held (held twice)
    device: str  # where the weights were loaded: "cpu" or "cuda:N"
    gpu: str | None  # the CUDA device's name
    cuda_peak_during_load: int | None  # torch.cuda.max_memory_allocated over the load, past what was allocated before
    cuda_peak_after_reading: int | None  # the same after also reading every weight once
    cuda_peak_over_checkpoint: float | None  # cuda_peak_after_reading / checkpoint bytes: ~1 held once on the GPU
    control_cuda_peak_over_checkpoint: float | None  # the same with a second copy of every tensor on the GPU
    load_seconds: float
    torch: str
    transformers: str


def _config(shape: CheckpointShape):
    from qzoom_adapters.backbones.qwen2_5_vl import Qwen2_5_VLSpec

    from .speed import SHAPES

    base = SHAPES[SHAPE]
    text = dict(base["text"], num_hidden_layers=shape.layers)
    if shape.vocab:  # special tokens inside the smaller vocabulary
        text.update(vocab_size=shape.vocab, bos_token_id=0, eos_token_id=1)
    if shape.intermediate:
        text["intermediate_size"] = shape.intermediate
    vision = dict(base["vision"], **({"depth": shape.vision_depth} if shape.vision_depth else {}))
    if shape.vision_depth:
        vision["fullatt_block_indexes"] = [i for i in vision["fullatt_block_indexes"] if i < shape.vision_depth]
    return Qwen2_5_VLSpec, Qwen2_5_VLSpec.model_class().config_class(text_config=text, vision_config=vision,
                                                                      **Qwen2_5_VLSpec.TINY_IDS, **text)


def _legacy_key(key: str) -> str:
    """A current state-dict key in the released (transformers 4.51) layout."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return "visual." + key[len("model.visual."):]
    return key


def write_checkpoint(out, shape: CheckpointShape = CheckpointShape(), seed: int = 0) -> dict:
    """Write the synthetic released checkpoint into folder `out`; returns its size facts. Memory: one shard."""
    import torch
    from safetensors.torch import save_file

    spec_cls, cfg = _config(shape)
    if shape.K + shape.T > shape.layers:
        raise ValueError(f"K + T = {shape.K + shape.T} needs at least that many layers, got {shape.layers}")
    with torch.device("meta"):
        model = spec_cls.model_class()._from_config(cfg, dtype=torch.bfloat16)
    entries = [(_legacy_key(k), v.shape) for k, v in model.state_dict().items()]
    layer = "model.language_model.layers."
    for name, dest in (("twig", "model.twig_layers."), ("gate", "model.high_res_layers.")):
        for i in range(shape.T):
            prefix = f"{layer}{shape.K + i}."
            entries += [(f"{dest}{i}.{k[len(prefix):]}", v.shape) for k, v in model.state_dict().items()
                        if k.startswith(prefix)]
    entries += [("model.high_res_head.weight", (1, cfg.text_config.hidden_size)), ("model.high_res_head.bias", (1,))]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map, shard, shard_bytes, files = {}, {}, 0, []
    total = adapters = params = 0

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            files.append(name)
            weight_map.update(dict.fromkeys(shard, name))
            shard, shard_bytes = {}, 0

    for key, size in entries:
        t = (torch.randn(size, generator=gen) * 0.02).to(torch.bfloat16)
        if key.endswith("norm.weight") or "layernorm" in key or key.endswith(("norm1.weight", "norm2.weight", "ln_q.weight")):
            t = torch.ones(size, dtype=torch.bfloat16)
        nbytes = t.numel() * t.element_size()
        if shard_bytes + nbytes > SHARD_BYTES:
            flush()
        shard[key], shard_bytes = t, shard_bytes + nbytes
        total, params = total + nbytes, params + t.numel()
        adapters += nbytes if key.startswith(("model.twig_layers.", "model.high_res_")) else 0
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    raw = cfg.to_dict()
    raw.update({"torch_dtype": "bfloat16", "dtype": "bfloat16", "architectures": [spec_cls.model_class().__name__],
                "enable_twig": True, "twig_K": shape.K, "twig_T": shape.T, "enable_high_res": True,
                "high_res_K": shape.K, "high_res_T": shape.T, "reuse_src_pos": True, "high_res_thresh": 0.02,
                "roi_conf_thresh": 0.03})
    (out / "config.json").write_text(json.dumps(raw, indent=1, default=str))
    return {"checkpoint_bytes": total, "adapter_bytes": adapters, "parameters": params, "files": files}


_CHILD = r"""
import json, sys, time
from pathlib import Path

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field + " not in /proc/self/status")

import torch, transformers
import qzoom_adapters as qz
from qzoom_adapters.spec import registered_families
registered_families()  # the backbone modules imported before the baseline
device = sys.argv[3]
cuda = device != "cpu"
if cuda:  # the CUDA context (and its host memory) is up before the baselines
    torch.zeros(1, device=device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    cuda_base = torch.cuda.memory_allocated(device)

def cuda_peak():
    if not cuda:
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - cuda_base

Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
baseline = status("VmRSS")
t0 = time.perf_counter()
zoom = qz.QZoom.from_reference_checkpoint(sys.argv[1], torch_dtype="auto", **({"device": device} if cuda else {}))
cuda_load = cuda_peak()
seconds = time.perf_counter() - t0
peak_load = status("VmHWM")
with torch.no_grad():  # read every weight once: mmap-backed weights become resident (what inference does)
    for module in (zoom.model, zoom.twig, zoom.gate):
        for t in list(module.parameters()) + list(module.buffers()):
            t.sum()
if sys.argv[2] == "control":  # a second, materialised copy of every tensor where the model is: "held twice"
    from safetensors.torch import load_file
    held = [{k: v.clone() for k, v in load_file(str(f), device=device).items()}
            for f in sorted(Path(sys.argv[1]).glob("*.safetensors"))]
assert next(zoom.model.parameters()).dtype == torch.bfloat16
places = {str(p.device) for m in (zoom.model, zoom.twig, zoom.gate) for p in m.parameters()}
assert places == {device}, f"weights on {sorted(places)}, not all on {device}"
print(json.dumps({"baseline_rss": baseline, "peak_rss_during_load": peak_load,
                  "peak_rss_after_reading": status("VmHWM"), "load_seconds": seconds,
                  "cuda_peak_during_load": cuda_load, "cuda_peak_after_reading": cuda_peak(),
                  "gpu": torch.cuda.get_device_name(device) if cuda else None,
                  "torch": torch.__version__, "transformers": transformers.__version__}))
"""


def measure(path, control: bool = False, device: str = "cpu") -> dict:
    """Load the checkpoint at `path` in a fresh process onto `device` ("cpu" or "cuda:N"); its baseline and peak
    RSS (bytes), on CUDA the GPU's peak allocated bytes, and the load time. `control`: also hold a materialised copy
    of every tensor (on `device`) after the load, to show what holding the weights twice measures (a loader keeping
    its own state dict beside the model's)."""
    done = subprocess.run([sys.executable, "-c", _CHILD, str(path), "control" if control else "load", device],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"loading {path} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(shape: CheckpointShape, folder=None, control: bool = False, device: str = "cpu") -> MemoryReport:
    """Write the checkpoint (in `folder`, else a temporary one that is removed), measure on `device` ("cpu" or
    "cuda:N", as `resolve_device` checked it), and the control when asked; report."""
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        facts = write_checkpoint(Path(tmp) / "ckpt", shape)
        got = measure(Path(tmp) / "ckpt", device=device)
        twice = measure(Path(tmp) / "ckpt", control=True, device=device) if control else None
    size = facts["checkpoint_bytes"]

    def ratio_of(m):
        return (m["peak_rss_after_reading"] - m["baseline_rss"]) / size

    def cuda_ratio(m):
        return None if m is None or m["cuda_peak_after_reading"] is None else m["cuda_peak_after_reading"] / size

    return MemoryReport(shape=asdict(shape), checkpoint_bytes=size, adapter_bytes=facts["adapter_bytes"],
                        parameters=facts["parameters"], baseline_rss=got["baseline_rss"],
                        peak_rss_during_load=got["peak_rss_during_load"],
                        peak_rss_after_reading=got["peak_rss_after_reading"], peak_over_checkpoint=ratio_of(got),
                        control_peak_over_checkpoint=None if twice is None else ratio_of(twice), device=device,
                        gpu=got["gpu"], cuda_peak_during_load=got["cuda_peak_during_load"],
                        cuda_peak_after_reading=got["cuda_peak_after_reading"],
                        cuda_peak_over_checkpoint=cuda_ratio(got), control_cuda_peak_over_checkpoint=cuda_ratio(twice),
                        load_seconds=got["load_seconds"], torch=got["torch"], transformers=got["transformers"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=28, help="decoder layers (the 7B has 28)")
    p.add_argument("--vocab", type=int, help="vocabulary size (default: the 7B's 152064)")
    p.add_argument("--vision-depth", type=int, help="vision blocks (default: the 7B's 32)")
    p.add_argument("--intermediate", type=int, help="MLP width (default: the 7B's 18944)")
    p.add_argument("--K", type=int, default=18, help="branch layer of the Q-Zoom tensors (the 7B's 18)")
    p.add_argument("--T", type=int, default=3, help="twig / gate depth (3)")
    p.add_argument("--control", action="store_true", help="also measure a load that holds a second copy of every tensor")
    p.add_argument("--dir", help="where the temporary checkpoint is written (default: the system's temp folder)")
    p.add_argument("--device", default="cpu", help="load onto cpu (default) or a GPU (cuda, cuda:N): the GPU's peak "
                                                   "allocated memory is reported too")
    p.add_argument("--out", help="write the report as JSON here")
    args = p.parse_args(argv)
    from qzoom_adapters.devices import device_name
    from qzoom_adapters.errors import QZoomError

    try:  # before the (slow) checkpoint is written
        device = device_name(args.device)
    except QZoomError as err:
        p.error(str(err))
    shape = CheckpointShape(layers=args.layers, vocab=args.vocab, vision_depth=args.vision_depth,
                            intermediate=args.intermediate, K=args.K, T=args.T)
    report = run(shape, args.dir, args.control, device)
    text = json.dumps(asdict(report), indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
