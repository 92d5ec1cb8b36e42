"""Recipe configs: one YAML file per backbone with a section per job (SPEC §4 defaults).

Relative paths in a YAML file are relative to that file's folder. `--set a.b=value` on the
command line overrides any field (the value is parsed as YAML).
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from qzoom_adapters.errors import QZoomError

Pairs = dict[int, list[int]]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a recipe must not be silently ignored


class ModelSection(_Section):
    path: str
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    attn_implementation: str | None = None  # None: the model's default (sdpa)


class TrainSection(_Section):
    """Optimisation (SPEC §4.2 defaults) and run bookkeeping."""

    lr: float = Field(1e-4, ge=0, allow_inf_nan=False, description="peak learning rate (0: weights stay as they are)")
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = Field(0.03, ge=0, le=1, allow_inf_nan=False)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; None = epochs over the data")
    batch_size: int = Field(8, ge=1, description="per process")
    effective_batch: int = Field(128, ge=1, description="batch_size x processes x accumulation")
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm; 0 = no clipping")
    seed: int = 0
    save_every: int = Field(50, ge=1, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, none on CPU
    num_workers: int = Field(0, ge=0)
    log_every: int = Field(1, ge=1)

    # bookkeeping: a resumed run may change these; every other field shapes the run and must match
    BOOKKEEPING: ClassVar[frozenset] = frozenset({"save_every", "keep_checkpoints", "num_workers", "log_every"})

    @field_validator("betas")
    @classmethod
    def _betas(cls, v):
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"AdamW betas must lie in [0, 1), got {list(v)}")
        return v

    def run_settings(self) -> dict:
        """The fields that shape the run (what a resume must not change), JSON-ready."""
        return self.model_dump(mode="json", exclude=set(self.BOOKKEEPING))


class LabelsStage1Section(_Section):
    """`qzoom labels stage1`: teacher responses at a fixed grid and their attention maps (SPEC §4.1)."""

    records: str
    out: str
    grid: int = 24
    max_new_tokens: int = 128
    batch_size: int = 8
    shard_size: int = 256
    num_workers: int = 0  # data-loader processes that read images and run the processor
    textual_pairs: Pairs
    natural_pairs: Pairs
    textual_sink_pairs: Pairs = Field(default_factory=dict)
    natural_sink_pairs: Pairs = Field(default_factory=dict)
    answer_suffix: str = "Answer the question using a single word or phrase."
    grounding_prompt: str = "Output the bounding box of the region needed to answer the question."


class LabelRules(_Section):
    """Thresholds of the tri-state labels, applied when a sample is loaded (SPEC §4.1)."""

    sink_threshold: float = 0.01
    fg_ratio: float = 0.25
    bg_ratio: float = 0.05
    max_box_fraction: float = 0.5
    min_peak: float = 5e-3
    # beyond SPEC: train only on samples whose teacher response matches a ground-truth answer (rule judge,
    # VQA accuracy >= 0.5). A weak teacher spreads its attention over every candidate when it is wrong.
    require_correct: bool = False


def distinct_budgets(v: list[int] | None) -> list[int] | None:
    """None, or distinct visual-token counts of at least 1."""
    if v is not None and (not v or any(b < 1 for b in v) or len(set(v)) != len(v)):
        raise ValueError(f"budgets must be distinct visual-token counts of at least 1 (got {v}); e.g. [64, 128, 256]")
    return v


class Stage1Section(_Section):
    """`qzoom train stage1`: the twig on the pseudo-labels; only layers < K and the twig run."""

    labels: str
    out: str
    records: str | None = None  # default: the records of `labels_stage1`
    init_adapters: str | None = None  # stage 2.5: continue from these adapters instead of copying layers
    rules: LabelRules = Field(default_factory=LabelRules)
    # beyond SPEC: visual-token budgets the twig is trained at. Each sample draws one per epoch (fixed by seed,
    # epoch and index) and is seen as at inference (the processor's own aspect-keeping view at that budget, no
    # square padding); the teacher's maps move onto that view's grid (`map_to_view`: area shares, mass kept) and
    # the tri-state rules apply there. None: the label grid's square view (SPEC §4.1-4.2)
    budgets: list[int] | None = None
    train: TrainSection = Field(default_factory=TrainSection)

    @field_validator("budgets")
    @classmethod
    def _distinct_budgets(cls, v):
        return distinct_budgets(v)


class MineSection(_Section):
    """`qzoom mine`: base direct answer (A) vs stage-1 always-zoomed answer (B), judged (SPEC §4.3)."""

    records: str
    adapters: str
    out: str
    judge: Literal["rule", "hf"] = "rule"
    judge_model: str | None = None
    metric: Literal["auto", "vqa", "anls", "relaxed"] = "auto"
    target: Literal["response", "ground_truth"] = "response"
    keep: Literal["regressions", "zoomed"] = "regressions"  # zoomed: every sample that got a crop (RoI-SFT)
    roi_threshold: float = 0.15
    roi_region: Literal["union", "largest"] = "union"  # ZoomConfig.roi_region
    roi_refine: int = Field(1, ge=1, le=16)  # ZoomConfig.roi_refine
    batch_size: int = 8
    max_new_tokens: int = 32


class LoraSection(_Section):
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])


class Stage2Section(_Section):
    """`qzoom train stage2`: post-SFT on global + RoI sequences with aligned positions."""

    data: str  # the regressions JSONL written by `qzoom mine`
    adapters: str  # the stage-1 adapters (frozen twig)
    out: str
    dtype: Literal["float32", "bfloat16"] = "float32"  # lr 1e-6 updates vanish in bf16 weights: keep fp32 masters
    position_mode: Literal["aligned", "sequential"] | None = None  # None: the backbone's default (aligned)
    roi_threshold: float = 0.15
    roi_region: Literal["union", "largest"] = "union"  # ZoomConfig.roi_region
    roi_refine: int = Field(1, ge=1, le=16)  # ZoomConfig.roi_refine
    box_noise: float = Field(0.8, ge=0.0, le=1.0)
    box_noise_sides: tuple[float, float] = (0.1, 0.6)
    lora: LoraSection | None = None
    # visual-token budgets: each sample draws one per epoch (fixed by seed, epoch and index) for its global view
    # and its crop, so the model learns the [global | RoI] sequence at every budget it will be run at; None: the
    # processor's own pixels for the global view and the adapters' crop pixels, as at inference
    budgets: list[int] | None = None
    # the first `frozen_layers` decoder layers stay as they are (and a LM head tied to the input embeddings too):
    # with frozen_layers >= K the layer-K states the twig and the gate read do not change, so the stage-1/3 adapters
    # stay valid without a stage-2.5 relabel
    frozen_layers: int = Field(0, ge=0)
    # the share of samples (drawn per epoch, fixed by seed, epoch and index) trained as plain [global | question |
    # answer] sequences, no RoI: the answers the gate leaves to the plain pass are rehearsed too, so post-SFT on
    # RoI sequences does not unlearn them (0: RoI sequences only, as SPEC §4.3)
    plain_replay: float = Field(0.0, ge=0.0, le=1.0)
    train: TrainSection = Field(default_factory=lambda: TrainSection(lr=1e-6))

    @field_validator("budgets")
    @classmethod
    def _distinct_budgets(cls, v):
        return distinct_budgets(v)


class LabelsStage3Section(_Section):
    """`qzoom labels stage3`: greedy answers at several visual-token budgets (SPEC §4.4)."""

    records: str
    out: str
    model: str | None = None  # default: the top-level model (use the stage-2 model)
    budgets: list[int] = Field(default_factory=lambda: [64, 128, 256, 576, 1024])
    max_new_tokens: int = 32
    batch_size: int = 8

    @field_validator("budgets")
    @classmethod
    def _increasing(cls, v):
        if len(v) < 3 or sorted(set(v)) != list(v) or v[0] < 1:
            raise ValueError(f"budgets must be at least 3 strictly increasing visual-token counts, each at least 1 "
                             f"(got {list(v)}); e.g. [64, 128, 256, 576, 1024]")
        return v


class Stage3Section(_Section):
    """`qzoom train stage3`: the gate on consistency-aware labels; only layers < K + the gate run."""

    answers: str  # written by `qzoom labels stage3`
    adapters: str  # the stage-2 adapters (their twig is kept beside the new gate)
    out: str
    model: str | None = None
    p_hard: float = 0.9
    reference: Literal["ground_truth", "top_budget"] = "ground_truth"  # top_budget: no ground truth needed
    train: TrainSection = Field(default_factory=lambda: TrainSection(effective_batch=256))


class RecipeConfig(_Section):
    model: ModelSection
    K: int = Field(ge=1)
    T: int = Field(3, ge=1)
    labels_stage1: LabelsStage1Section | None = None
    stage1: Stage1Section | None = None
    mine: MineSection | None = None
    stage2: Stage2Section | None = None
    labels_stage3: LabelsStage3Section | None = None
    stage3: Stage3Section | None = None

    def section(self, name: str):
        sec = getattr(self, name)
        if sec is None:
            raise QZoomError(f"the config has no `{name}:` section")
        return sec

    def run_settings(self, name: str) -> dict:
        """What shapes the training run of section `name` besides its `train:` settings (the Trainer adds those):
        model, K, T and the section's fields but `out`.

        Stored with the run's checkpoints; a resume with other values is refused (see `Trainer`).
        """
        sec = self.section(name)
        settings = {"stage": name, "model": self.model.model_dump(mode="json"), "K": self.K, "T": self.T}
        settings.update({f"{name}.{k}": v for k, v in sec.model_dump(mode="json", exclude={"out", "train"}).items()})
        return settings


_PATH_FIELDS = {"path", "records", "out", "labels", "init_adapters", "adapters", "judge_model", "data", "answers",
                "model"}


def _resolve_paths(node, base: Path):
    """Make relative paths absolute against the YAML file's folder (strings under known path keys)."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k in _PATH_FIELDS and isinstance(v, str) and not Path(v).is_absolute() and not v.startswith("hf:"):
                out[k] = str((base / v).resolve())
            else:
                out[k] = _resolve_paths(v, base)
        return out
    return node


def _apply_override(data: dict, item: str) -> None:
    if "=" not in item:
        raise QZoomError(f"--set expects key.path=value, got {item!r}")
    key, value = item.split("=", 1)
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise QZoomError(f"--set {key}: {p} is not a section")
    node[parts[-1]] = yaml.safe_load(value)


def load_config(path, overrides: list[str] = ()) -> RecipeConfig:
    """Read a recipe YAML file, apply `--set` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise QZoomError(f"no config file at {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise QZoomError(f"{path} is not UTF-8 text ({err.reason}); save the config as UTF-8") from err
    except yaml.YAMLError as err:
        raise QZoomError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise QZoomError(f"{path}: the top level must be a mapping of sections (model:, K:, stage1:, ...), "
                         f"not a {type(data).__name__}")
    for item in overrides:
        _apply_override(data, item)
    data = _resolve_paths(data, path.parent.resolve())
    try:
        return RecipeConfig(**data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise QZoomError(f"{path}: {where}: {first['msg']} ({len(err.errors())} problem(s) in all)") from err
