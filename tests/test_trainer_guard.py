"""The trainer skips an update whose gradient is not finite (weights untouched) and fails after too many."""
import warnings

import pytest
import torch
from torch import nn

from qzoom_adapters.errors import QZoomError
from qzoom_adapters.recipes.config import TrainSection
from qzoom_adapters.recipes.trainer import Trainer


class Toy(nn.Module):
    """loss = (w * x).sum(): a batch holding nan gives a nan gradient."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, batch):
        return (self.w * batch).sum()


def _run(tmp_path, data, name):
    cfg = TrainSection(lr=0.1, batch_size=1, effective_batch=1, max_steps=len(data), save_every=100, warmup_ratio=0.0)
    module = Toy()
    trainer = Trainer(module, data, lambda items: torch.stack(items), cfg, tmp_path / name, lambda m, out: None)
    return module, trainer


def test_non_finite_gradient_skips_the_update(tmp_path):
    good = torch.ones(3)
    bad = torch.tensor([1.0, float("nan"), 1.0])
    _, trainer = _run(tmp_path, [good, good], "clean")
    assert trainer.train()["skipped_steps"] == 0
    guarded, trainer = _run(tmp_path, [good, bad, good], "guarded")
    result = trainer.train()
    assert result["skipped_steps"] == 1 and result["finished"]
    assert torch.isfinite(guarded.w).all()
    assert not torch.equal(guarded.w.detach(), torch.ones(3))  # the good batches were applied


def test_too_many_non_finite_steps_fail_clearly(tmp_path):
    bad = torch.tensor([float("inf"), 1.0, 1.0])
    module, trainer = _run(tmp_path, [bad] * 4, "bad")
    trainer.max_skipped = 2
    with pytest.raises(QZoomError, match="non-finite gradients"):
        trainer.train()
    assert torch.equal(module.w.detach(), torch.ones(3))  # never updated


def test_a_skipped_first_update_does_not_step_the_schedule_early(tmp_path):
    """The schedule advances only after a real update: skipping the first one raises no scheduler-order warning."""
    bad = torch.tensor([1.0, float("nan"), 1.0])
    cfg = TrainSection(lr=0.1, batch_size=1, effective_batch=1, max_steps=3, save_every=100, warmup_ratio=0.0)
    trainer = Trainer(Toy(), [bad] * 3, lambda items: torch.stack(items), cfg, tmp_path / "run", lambda m, out: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = trainer.train()
    assert result["skipped_steps"] == 3 and result["finished"]
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
