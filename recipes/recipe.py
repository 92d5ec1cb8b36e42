"""The stages as Python objects (what `qzoom labels|mine|train` call), torchtune-style: a config in, steps out.

    from qzoom_adapters.recipes import Stage1Recipe
    s1 = Stage1Recipe("qwen2_5_vl_7b.yaml", overrides=["stage1.train.max_steps=100"])
    s1.label(); s1.train()
"""
from __future__ import annotations

from .config import RecipeConfig, load_config


class _Recipe:
    def __init__(self, config: RecipeConfig | str, overrides: list[str] = ()):
        self.config = config if isinstance(config, RecipeConfig) else load_config(config, list(overrides))


class Stage1Recipe(_Recipe):
    """Pseudo-labels from the backbone's attention, then the twig (SPEC §4.1-§4.2; stage 2.5 via init_adapters)."""

    def label(self, show_progress: bool = True) -> dict:
        from .stage1 import make_stage1_labels

        return make_stage1_labels(self.config, show_progress)

    def train(self, stop_after: int | None = None) -> dict:
        from .stage1 import train_stage1

        return train_stage1(self.config, stop_after)


class Stage2Recipe(_Recipe):
    """Mining of zoom regressions, then post-SFT on global + RoI sequences (SPEC §4.3)."""

    def mine(self, show_progress: bool = True) -> dict:
        from .stage2 import mine

        return mine(self.config, show_progress)

    def train(self, stop_after: int | None = None) -> dict:
        from .stage2 import train_stage2

        return train_stage2(self.config, stop_after)


class Stage3Recipe(_Recipe):
    """Answers at several budgets, then the gate on consistency-aware labels (SPEC §4.4)."""

    def label(self, show_progress: bool = True) -> dict:
        from .stage3 import answer_at_budgets

        return answer_at_budgets(self.config, show_progress)

    def train(self, stop_after: int | None = None) -> dict:
        from .stage3 import train_stage3

        return train_stage3(self.config, stop_after)
