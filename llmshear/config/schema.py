"""The run configuration's schema: one dataclass per section, the enumerated choices, and :func:`parse`.

Every section documents its keys; docs/recipes.md shows them in recipes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmshear.choices import CONSTRAINTS, DTYPE_NAMES, EVAL_MASKS, GATE_SCHEDULES, HARDEN_BY, LAYER_CHOICES, STRUCTURES
from llmshear.config.types import build_section
from llmshear.datasets.proportions import RULES


@dataclass
class ModelSection:
    """``pretrained``: HF directory, ``.gguf`` file, ``smollm2`` or a preset; ``init_device``: cpu or meta."""

    pretrained: str
    init_device: str = "cpu"
    attn_impl: str = "sdpa"


@dataclass
class PruningSection:
    """Present only in pruning runs: the target shape and the L0 module's options (see docs/pruning.md).

    ``init``: ``importance`` (logits ranked by activation importance on ``init_batches`` calibration batches,
    see :mod:`llmshear.models.importance`) or ``constant`` (every gate logit ``init_log_alpha``, the paper's).
    ``sparsity_warmup`` and ``harden_from`` are fractions of ``train.max_batches``: the target sparsity ramps
    up over the first, and from the second on the masks are frozen as 0/1 (1.0: never, the paper's), keeping the
    units ranked first by ``harden_by``: ``usage`` (mean ``P(z != 0)`` since the ramp's end) or ``logits``.
    ``layer_choice``: ``loss`` lets the layers whose gates are still undecided at the freeze be chosen by a
    forward-only comparison of at most ``layer_candidates`` cuts on the freeze batch's tokens; ``ranking`` keeps
    the layers ``harden_by`` ranks first.
    ``eval_masks``: what the evaluations during pruning (and so dynamic loading) measure, the ``current``
    model or the ``target`` cut; ``eval_target`` adds a second evaluation of the target cut, logged only.
    ``compact``: masked steps compute only the units whose gate is not exactly 0 (same loss and gradients, FLOPs
    that fall as units leave); ``false`` computes every unit of the source, as the paper's code does.
    """

    target: dict
    structures: list[str] = field(default_factory=lambda: list(STRUCTURES))
    constraint: str = "exact"
    temperature: float = 0.1
    final_temperature: float = 0.05
    layer_final_temperature: float | None = 0.002
    sparsity_warmup: float = 0.4
    harden_from: float = 0.7
    harden_by: str = "usage"
    layer_choice: str = "ranking"
    layer_candidates: int = 8
    eval_masks: str = "current"
    eval_target: bool = True
    init_log_alpha: float = 4.6
    log_alpha_limit: float = 10.0
    init: str = "importance"
    init_batches: int = 4
    compact: bool = True


@dataclass
class DistillSection:
    """Optional logit distillation from a frozen ``teacher`` (any model source), its weights held in ``dtype``."""

    teacher: str
    alpha: float = 0.5
    temperature: float = 1.0
    dtype: str = "float32"


@dataclass
class DataSection:
    """MDS data under ``path/<split>/<domain>/`` and the dynamic-loading rule.

    ``train_range``: the fraction ``[begin, end]`` of each domain's train sequences this run reads; pruning and
    continued pre-training take adjacent ranges so they never read the same sequence (docs/data.md).
    """

    path: str
    domains: list[str]
    seq_len: int
    proportions: list[float] | None = None
    proportions_from: str | None = None
    reference_losses: list[float] | None = None
    reference_losses_from: str | None = None
    update: str = "doremi"
    eta: float = 1.0
    smoothing: float = 1e-4
    floor: float = 0.0
    cap: float = 1.0
    train_split: str = "train"
    eval_split: str = "eval"
    train_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    num_workers: int = 0


@dataclass
class OptimizerSection:
    """DecoupledAdamW: ``lr`` for weights, ``lag_lr`` for gates and (as ascent) for the multipliers.

    ``gate_schedule``: the gates and multipliers keep a ``constant`` rate, or follow the weights' warm-up and
    decay (``shared``). ``clip_norm``: the global gradient norm is clipped to it (0: no clipping; unset: 1.0, or
    ``algorithms.gradient_clipping.clipping_threshold``).
    """

    lr: float = 1e-4
    lag_lr: float = 1.0
    gate_schedule: str = "constant"
    clip_norm: float | None = None
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class SchedulerSection:
    """Linear warm-up over ``warmup`` batches (or a duration string), then cosine decay to ``alpha_f`` × the
    initial rate."""

    warmup: int | str = 0
    alpha_f: float = 0.1


@dataclass
class TrainSection:
    """Duration and batch sizes (in batches / sequences), evaluation cadence, precision and device.

    The duration is ``max_batches``, or ``max_duration`` as Composer writes it (``3200ba``, tokens ``tok``,
    samples ``sp``); ``eval_interval`` and ``log_interval`` take either form too (see :mod:`llmshear.durations`).
    ``micro_batch_size: auto`` lets Composer find the largest that fits (GPU only).
    ``max_nonfinite``: the run stops (exit 3) once the training loss has been NaN or infinite for this many
    consecutive batches (see :class:`~llmshear.callbacks.nonfinite.NonFiniteLossGuard`).
    """

    global_batch_size: int
    micro_batch_size: int | str
    eval_interval: int | str
    max_batches: int | None = None
    max_duration: str | int | None = None
    eval_batches: int = -1
    eval_batch_size: int | None = None
    precision: str = "fp32"
    device: str | None = None
    log_interval: int | str = 1
    progress_bar: bool = False
    max_nonfinite: int = 3


@dataclass
class CheckpointSection:
    """Where the run lives and how it resumes (``save_interval``: batches or a duration).

    ``save_folder`` and ``load_path`` are local (or mounted) paths. ``remote``: ``s3://bucket/prefix``, a mirror
    of the run folder in an object store (:mod:`llmshear.remote`): uploaded after each checkpoint and at the end,
    and downloaded at an ``autoresume`` whose folder holds no complete checkpoint; full checkpoints only.
    """

    save_folder: str
    save_interval: int | str = 0
    keep: int = -1
    autoresume: bool = False
    load_path: str | None = None
    load_weights_only: bool = False
    remote: str | None = None


@dataclass
class FsdpSection:
    """Fully sharded data parallelism (always full shard) through Composer's ``parallelism_config``.

    ``state_dict_type``: checkpoints as one ``full`` file gathered on rank 0, or ``sharded`` (FSDP2 only): a
    directory where every rank writes and reads its own shard (see docs/recipes.md, checkpoints at scale).
    """

    enabled: bool = False
    version: int = 2
    state_dict_type: str = "full"
    activation_checkpointing: bool = False
    mixed_precision: str = "DEFAULT"


@dataclass
class RunConfig:
    """The whole run. ``pruning`` absent (null) means continued pre-training. ``loggers``, ``callbacks`` and
    ``algorithms`` name Composer's pieces with their keyword arguments (:mod:`llmshear.composer_parts`)."""

    run_name: str
    model: ModelSection
    data: DataSection
    train: TrainSection
    checkpoint: CheckpointSection
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    fsdp: FsdpSection = field(default_factory=FsdpSection)
    pruning: PruningSection | None = None
    distill: DistillSection | None = None
    loggers: dict = field(default_factory=dict)
    callbacks: dict = field(default_factory=dict)
    algorithms: dict = field(default_factory=dict)
    seed: int = 17


CHOICES = {
    "model.init_device": ("cpu", "meta"),
    "model.attn_impl": ("sdpa", "flash"),
    "data.update": tuple(RULES),
    "pruning.init": ("constant", "importance"),
    "pruning.constraint": CONSTRAINTS,
    "pruning.eval_masks": EVAL_MASKS,
    "pruning.harden_by": HARDEN_BY,
    "pruning.layer_choice": LAYER_CHOICES,
    "optimizer.gate_schedule": GATE_SCHEDULES,
    "train.precision": ("fp32", "amp_bf16", "amp_fp16"),
    "train.device": ("cpu", "gpu", None),
    "fsdp.version": (1, 2),
    "fsdp.state_dict_type": ("full", "sharded"),
    "fsdp.mixed_precision": ("DEFAULT", "PURE", "FULL"),
    "distill.dtype": DTYPE_NAMES,
}


def check_choices(cfg: RunConfig) -> list[str]:
    """Every enumerated key whose value is not one of its choices."""
    problems = []
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name, None)
        if getattr(cfg, section) is not None and value not in choices:
            problems.append(f"{key}: {value!r} is not one of {list(choices)}")
    return problems


def parse(raw: dict) -> tuple[RunConfig | None, list[str]]:
    """Typed :class:`RunConfig` from the plain dict, and the schema problems (unknown keys, types, choices)."""
    problems: list[str] = []
    cfg = build_section(RunConfig, raw, "", problems)
    if cfg is not None:
        problems += check_choices(cfg)
    return cfg, problems
