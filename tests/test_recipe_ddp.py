"""DDP on CPU (2 gloo processes under torchrun): the same adapters as one process at the same effective batch."""
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from qzoom_adapters import TwigRPN
from qzoom_adapters.recipes.cli import main
from qzoom_adapters.recipes.models import load_backbone
from qzoom_adapters.recipes.tiny import write_tiny_setup

ROOT = Path(__file__).resolve().parents[1]


def _train(cfg, out, nproc, batch_size):
    args = ["train", "stage1", "--config", str(cfg), "--set", f"stage1.out={out}",
            "--set", f"stage1.train.batch_size={batch_size}"]
    if nproc == 1:
        assert main(args) == 0
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                          "--master_port", "29517", "-m", "qzoom_adapters.recipes.cli", *args], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert '"processes": 2' in run.stdout


def test_two_process_ddp_equals_one_process(tmp_path):
    root = write_tiny_setup(tmp_path / "t")
    cfg = root / "recipe.yaml"
    assert main(["labels", "stage1", "--config", str(cfg)]) == 0
    _train(cfg, tmp_path / "one", 1, 4)  # 4 samples per step in one process
    _train(cfg, tmp_path / "two", 2, 2)  # 2 x 2 samples per step, gradients averaged by DDP
    one = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    two = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    model, _, _ = load_backbone(str(root / "model"))
    start = {f"twig.{k}": v for k, v in TwigRPN.from_backbone(model, K=3, T=3).state_dict().items()}
    assert one.keys() == two.keys() == start.keys()
    moved = max(float((one[k] - start[k]).abs().max()) for k in one)
    assert moved > 1e-4  # training changed the twig far more than the tolerance below
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=2e-6, rtol=1e-4)
