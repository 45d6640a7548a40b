"""Run configuration: YAML + ``key=value`` overrides (OmegaConf) → typed, validated sections.

Every problem is collected and reported at once, each naming its key (and, for keys written in the YAML
file, ``file:line``), before any weight or data is read. :mod:`llmshear.config_checks` holds the checks that
look at files (source model, MDS directories, checkpoints); this module holds the schema and the generic
type checking.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

import yaml
from llmshear.config_checks import check_run
from llmshear.datasets.proportions import RULES
from llmshear.models.l0 import STRUCTURES


class ConfigError(ValueError):
    """One or more configuration problems; ``problems`` lists them, each naming its key."""

    def __init__(self, problems: list[str], origin: str = "config"):
        self.problems = problems
        super().__init__(f"{origin}: {len(problems)} problem(s)\n  " + "\n  ".join(problems))


@dataclass
class ModelSection:
    """``pretrained``: HF directory, ``.gguf`` file, ``smollm2`` or a preset; ``init_device``: cpu or meta."""

    pretrained: str
    init_device: str = "cpu"
    attn_impl: str = "sdpa"


@dataclass
class PruningSection:
    """Present only in pruning runs: the target shape and the L0 module's options."""

    target: dict
    structures: list[str] = field(default_factory=lambda: list(STRUCTURES))
    lagrangian_warmup: int = 0
    init_log_alpha: float = 5.0
    log_alpha_limit: float = 10.0


@dataclass
class DistillSection:
    """Optional logit distillation from a frozen ``teacher`` (any model source)."""

    teacher: str
    alpha: float = 0.5
    temperature: float = 1.0


@dataclass
class DataSection:
    """MDS data under ``path/<split>/<domain>/`` and the dynamic-loading rule."""

    path: str
    domains: list[str]
    seq_len: int
    proportions: list[float] | None = None
    proportions_from: str | None = None
    reference_losses: list[float] | None = None
    update: str = "doremi"
    eta: float = 1.0
    smoothing: float = 1e-4
    floor: float = 0.0
    cap: float = 1.0
    train_split: str = "train"
    eval_split: str = "eval"
    num_workers: int = 0


@dataclass
class OptimizerSection:
    """DecoupledAdamW: ``lr`` for weights, ``lag_lr`` for gates and (as ascent) for the multipliers."""

    lr: float = 1e-4
    lag_lr: float = 1.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class SchedulerSection:
    """Linear warm-up over ``warmup`` batches, then cosine decay to ``alpha_f`` × the initial rate."""

    warmup: int = 0
    alpha_f: float = 0.1


@dataclass
class TrainSection:
    """Duration and batch sizes (in batches / sequences), evaluation cadence, precision and device."""

    max_batches: int
    global_batch_size: int
    micro_batch_size: int
    eval_interval: int
    eval_batches: int = -1
    eval_batch_size: int | None = None
    precision: str = "fp32"
    device: str | None = None
    log_interval: int = 1
    progress_bar: bool = False


@dataclass
class CheckpointSection:
    """Where the run lives and how it resumes."""

    save_folder: str
    save_interval: int = 0
    keep: int = -1
    autoresume: bool = False
    load_path: str | None = None
    load_weights_only: bool = False


@dataclass
class FsdpSection:
    """Fully sharded data parallelism (always full shard) through Composer's ``parallelism_config``."""

    enabled: bool = False
    version: int = 2
    activation_checkpointing: bool = False
    mixed_precision: str = "DEFAULT"


@dataclass
class RunConfig:
    """The whole run. ``pruning`` absent (null) means continued pre-training."""

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
    seed: int = 17


CHOICES = {
    "model.init_device": ("cpu", "meta"),
    "model.attn_impl": ("sdpa", "flash"),
    "data.update": tuple(RULES),
    "train.precision": ("fp32", "amp_bf16", "amp_fp16"),
    "train.device": ("cpu", "gpu", None),
    "fsdp.version": (1, 2),
    "fsdp.mixed_precision": ("DEFAULT", "PURE", "FULL"),
}


def load_raw(path: str | Path, overrides: list[str] = ()) -> tuple[dict, list[str]]:
    """Merge the YAML file and ``key=value`` overrides and resolve interpolations.

    Returns:
        The plain nested dict, and the problems met so far (an unresolvable interpolation names its key; its
        value becomes None).

    Raises:
        ConfigError: the file is missing or not YAML (with its line), or an override is malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: no such file"])
    try:
        conf = OmegaConf.load(path)
    except yaml.YAMLError as err:
        raise ConfigError([f"{path}: not valid YAML: {err}"]) from err
    if not isinstance(conf, DictConfig):
        raise ConfigError([f"{path}: the top level must be a mapping of sections"])
    try:
        conf = OmegaConf.merge(conf, OmegaConf.from_dotlist(list(overrides)))
    except Exception as err:  # OmegaConf raises several grammar/validation error types
        raise ConfigError([f"overrides {list(overrides)}: {err}"]) from err
    problems: list[str] = []
    return _resolve(conf, "", problems), problems


def _resolve(node, prefix: str, problems: list[str]):
    """Plain containers from an OmegaConf node, resolving each value alone so every failure is reported."""
    if isinstance(node, DictConfig):
        keys = list(node.keys())
        out = {}
        for key in keys:
            name = f"{prefix}{key}"
            try:
                value = node[key]
            except Exception as err:  # an interpolation error (missing env var, bad reference)
                problems.append(f"{name}: cannot resolve {OmegaConf.to_container(node)[key]!r}: {_first_line(err)}")
                value = None
            out[str(key)] = _resolve(value, f"{name}.", problems)
        return out
    if isinstance(node, ListConfig):
        return [_resolve(node[i], f"{prefix}{i}.", problems) for i in range(len(node))]
    return node


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def key_lines(path: str | Path) -> dict[str, int]:
    """``{dotted key: line number}`` of every mapping key written in a YAML file (for error messages)."""
    lines: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                name = f"{prefix}{key.value}"
                lines[name] = key.start_mark.line + 1
                walk(value, f"{name}.")

    try:
        walk(yaml.compose(Path(path).read_text()), "")
    except (OSError, yaml.YAMLError):
        pass
    return lines


def build_section(cls: type, values, prefix: str, problems: list[str]):
    """Instantiate dataclass ``cls`` from ``values``, appending every unknown / missing / mistyped key."""
    if not isinstance(values, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {_kind(values)}")
        return None
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    problems += [f"{prefix}{key}: unknown key (known: {', '.join(sorted(names))})" for key in values
                 if key not in names]
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if f.name not in values:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(f"{key}: missing (required)")
            continue
        kwargs[f.name] = _check_value(values[f.name], hints[f.name], key, problems)
    try:
        return cls(**kwargs)
    except TypeError:  # a required key was missing: already reported
        return None


def _check_value(value, hint, key: str, problems: list[str]):
    """``value`` if it matches the type ``hint`` (sections recurse), else report and return the value as is."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) not in options:
            problems.append(f"{key}: must not be null")
        return None
    options = tuple(o for o in options if o is not type(None))
    for option in options:
        if dataclasses.is_dataclass(option):
            return build_section(option, value, f"{key}.", problems)
        if _matches(value, option):
            return float(value) if option is float else value
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    problems.append(f"{key}: expected {names}, got {_kind(value)} {value!r}")
    return value


def _matches(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _kind(value) -> str:
    return {dict: "a mapping", list: "a list"}.get(type(value), type(value).__name__)


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


def annotate(problems: list[str], path: str | Path) -> list[str]:
    """Prefix each problem whose key was written in the YAML file with ``file:line``."""
    lines = key_lines(path)
    out = []
    for problem in problems:
        key = problem.split(":", 1)[0].split("=", 1)[0].strip()
        line = lines.get(key) or lines.get(key.rsplit(".", 1)[0])
        out.append(f"{path}:{line}: {problem}" if line else problem)
    return out


def load(path: str | Path, overrides: list[str] = (), world_size: int | None = None,
         cuda: bool | None = None) -> RunConfig:
    """Load, merge, type-check and validate a run config; nothing heavy is read.

    Args:
        path: the YAML recipe.
        overrides: ``key=value`` strings (OmegaConf dotlist), applied after the file.
        world_size: processes in the run (default: ``WORLD_SIZE`` of the environment, else 1).
        cuda: whether a GPU is usable (default: ``torch.cuda.is_available()``).

    Raises:
        ConfigError: listing every problem, each naming its key (with ``file:line`` where it is in the file).
    """
    world_size = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    cuda = cuda if cuda is not None else torch.cuda.is_available()
    raw, problems = load_raw(path, overrides)
    cfg, schema_problems = parse(raw)
    problems += schema_problems
    if cfg is not None:
        problems += check_run(cfg, world_size, cuda)
    if problems:
        raise ConfigError(annotate(problems, path), origin=str(path))
    return cfg
