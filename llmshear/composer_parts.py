"""Composer's loggers, callbacks and algorithms, and anyone's, named in a recipe's ``loggers:``, ``callbacks:`` and
``algorithms:`` sections with their keyword arguments (see docs/recipes.md).

A section maps names to keyword arguments (``{}`` or null: the class's defaults); a name is one of the short
names below or a class by import path (a subclass of Composer's ``LoggerDestination``, ``Callback`` or
``Algorithm``)::

    loggers:
      tensorboard: {}                                   # <save_folder>/tensorboard/
      wandb: {project: shear, init_kwargs: {mode: offline}}
    callbacks:
      speed_monitor: {window_size: 10}
      composer.callbacks.EarlyStopper: {monitor: LanguageCrossEntropy, dataloader_label: eval, patience: 4ba}
      my_pkg.my_module.MyCallback: {every: 10}
    algorithms:
      gradient_clipping: {clipping_type: norm, clipping_threshold: 1.0}

:func:`check_parts` rejects at config time an unknown name, a class path that does not import or is not of the
section's kind, a logger whose package is not installed (naming the
pip extra) and an argument the class does not take (read from its signature); values are Composer's to check.
``metrics.jsonl`` (:class:`llmshear.loggers.JSONLinesLogger`) is always written: the plots, the resume checks and
``scripts/`` read it, so it is not a choice.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import netrc
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse


@dataclass(frozen=True)
class Part:
    """A Composer class by module and name; ``package``: what must be importable, ``extra``: the pip extra."""

    module: str
    name: str
    package: str | None = None
    extra: str | None = None

    def cls(self) -> type:
        return getattr(importlib.import_module(self.module), self.name)


LOGGERS = {
    "tensorboard": Part("composer.loggers.tensorboard_logger", "TensorboardLogger", "tensorboard", "tensorboard"),
    "wandb": Part("composer.loggers.wandb_logger", "WandBLogger", "wandb", "wandb"),
    "mlflow": Part("composer.loggers.mlflow_logger", "MLFlowLogger", "mlflow", "mlflow"),
    "file": Part("composer.loggers.file_logger", "FileLogger"),
}
CALLBACKS = {
    "speed_monitor": Part("composer.callbacks.speed_monitor", "SpeedMonitor"),
    "lr_monitor": Part("composer.callbacks.lr_monitor", "LRMonitor"),
    "memory_monitor": Part("composer.callbacks.memory_monitor", "MemoryMonitor"),
    "runtime_estimator": Part("composer.callbacks.runtime_estimator", "RuntimeEstimator"),
    "optimizer_monitor": Part("composer.callbacks.optimizer_monitor", "OptimizerMonitor"),
}
# Composer's GradientClipping algorithm fails under FSDP2 when sharded (DTensor) and plain gradients mix, so
# ``gradient_clipping`` maps onto our clipper (llmshear.callbacks.clipping), which clips the global L2 norm only.
CLIPPING_ARGS = ("clipping_type", "clipping_threshold")
DEFAULT_CLIP_NORM = 1.0


def _argument_problems(key: str, part: Part, kwargs: dict) -> list[str]:
    """Arguments ``part``'s class does not take, and required ones missing, each naming ``key.<argument>``."""
    signature = inspect.signature(part.cls())
    params = {name: p for name, p in signature.parameters.items() if name != "self"}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    known = [name for name, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    problems = [f"{key}.{name}: unknown argument of {part.name} (known: {', '.join(known)})"
                for name in kwargs if name not in known]
    problems += [f"{key}.{name}: missing (required by {part.name})" for name, p in params.items()
                 if p.default is inspect.Parameter.empty and name not in kwargs
                 and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    return problems


def _wandb_key_problem(kwargs: dict) -> list[str]:
    """An online W&B run without an API key fails inside the Trainer; say so at config time instead."""
    init = kwargs.get("init_kwargs") or {}
    mode = init.get("mode") if isinstance(init, dict) and init.get("mode") else os.environ.get("WANDB_MODE", "online")
    if mode in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return []
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        if netrc.netrc(os.environ.get("NETRC")).authenticators(host):
            return []
    except (OSError, netrc.NetrcParseError):
        pass
    return [f"loggers.wandb: mode {mode!r} needs a W&B API key (WANDB_API_KEY, or `wandb login`), none found; "
            f"without network use loggers.wandb.init_kwargs.mode=offline (or WANDB_MODE=offline) and `wandb sync` "
            f"the run folder's wandb/ later"]


# What a class named by import path must be, per section: (module, class) of Composer's base.
BASES = {"loggers": ("composer.loggers", "LoggerDestination"), "callbacks": ("composer.core", "Callback"),
         "algorithms": ("composer.core", "Algorithm")}
IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


def by_import_path(section: str, name: str) -> tuple[Part | None, str | None]:
    """``pkg.module.Class`` as a :class:`Part`, or the reason it is not one: not importable, no such class, not a
    subclass of Composer's base for ``section`` (:data:`BASES`)."""
    module, _, cls_name = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), cls_name, None)
    except ImportError as err:
        return None, f"cannot import {module} ({err})"
    base = getattr(importlib.import_module(BASES[section][0]), BASES[section][1])
    if not (inspect.isclass(cls) and issubclass(cls, base)):
        why = f"{module} has no class {cls_name}" if cls is None else f"not a subclass of Composer's {base.__name__}"
        return None, why
    return Part(module, cls_name), None


def part_of(section: str, table: dict[str, Part], name: str,
            also: tuple[str, ...] = ()) -> tuple[Part | None, str | None]:
    """The part a recipe names in ``section``: one of ``table``'s short names, or a class by import path; else
    None and why (``also``: more short names to list)."""
    if name in table:
        return table[name], None
    if IMPORT_PATH.fullmatch(str(name)):
        return by_import_path(section, name)
    return None, (f"unknown (known: {', '.join([*table, *also])}; or a class by import path, "
                  f"my_pkg.my_module.MyClass)")


def _check_table(section: str, table: dict[str, Part], values: dict, also: tuple[str, ...] = ()) -> list[str]:
    problems = []
    for name, kwargs in values.items():
        key = f"{section}.{name}"
        part, why = part_of(section, table, name, also)
        if part is None:
            problems.append(f"{key}: {why}")
        elif kwargs is not None and not isinstance(kwargs, dict):
            problems.append(f"{key}: expected a mapping of keyword arguments (or {{}}), got {kwargs!r}")
        elif part.package and importlib.util.find_spec(part.package) is None:
            problems.append(f"{key}: the {part.package!r} package is not installed (pip install -e "
                            f"'.[{part.extra}]', or `make setup`, which installs every logger)")
        else:
            problems += _argument_problems(key, part, kwargs or {})
            problems += _wandb_key_problem(kwargs or {}) if key == "loggers.wandb" else []
    return problems


def _check_algorithms(algorithms: dict, clip_norm: float | None) -> list[str]:
    others = {name: kwargs for name, kwargs in algorithms.items() if name != "gradient_clipping"}
    problems = _check_table("algorithms", {}, others, also=("gradient_clipping",))
    if "gradient_clipping" not in algorithms:
        return problems
    args = algorithms["gradient_clipping"] or {}
    key = "algorithms.gradient_clipping"
    if not isinstance(args, dict):
        return problems + [f"{key}: expected a mapping {{clipping_type: norm, clipping_threshold: X}}"]
    problems += [f"{key}.{name}: unknown argument (known: {', '.join(CLIPPING_ARGS)})" for name in args
                 if name not in CLIPPING_ARGS]
    if args.get("clipping_type", "norm") != "norm":
        problems.append(f"{key}.clipping_type={args['clipping_type']!r}: only 'norm' is supported (the global L2 "
                        f"norm, clipped by our FSDP2-safe clipper; Composer's 'value' and 'adaptive' clipping "
                        f"run through its GradientClipping algorithm, which fails on FSDP2's mixed gradients)")
    threshold = args.get("clipping_threshold")
    if not isinstance(threshold, int | float) or isinstance(threshold, bool) or threshold <= 0:
        problems.append(f"{key}.clipping_threshold={threshold!r}: must be a positive number")
    elif clip_norm is not None and clip_norm != threshold:
        problems.append(f"{key}.clipping_threshold={threshold} / optimizer.clip_norm={clip_norm}: both set the "
                        f"gradient clipping threshold; set one of them (or the same value)")
    return problems


def check_parts(cfg, world_size: int = 1, cuda: bool = False) -> list[str]:
    """Problems of the ``loggers``, ``callbacks`` and ``algorithms`` sections of a :class:`RunConfig`."""
    problems = (_check_table("loggers", LOGGERS, cfg.loggers) + _check_table("callbacks", CALLBACKS, cfg.callbacks)
                + _check_algorithms(cfg.algorithms, cfg.optimizer.clip_norm))
    if "optimizer_monitor" in cfg.callbacks and world_size > 1 and not cuda:
        problems.append("callbacks.optimizer_monitor: needs a GPU when several processes run (Composer 0.32.1's "
                        "DecoupledAdamW reduces the norms across ranks on the CUDA device); one process on CPU works")
    return problems


def clip_threshold(cfg) -> float:
    """The global gradient-norm threshold (0: no clipping): ``algorithms.gradient_clipping.clipping_threshold``,
    else ``optimizer.clip_norm``, else 1.0 (the paper's)."""
    clipping = cfg.algorithms.get("gradient_clipping") or {}
    if "clipping_threshold" in clipping:
        return float(clipping["clipping_threshold"])
    return DEFAULT_CLIP_NORM if cfg.optimizer.clip_norm is None else cfg.optimizer.clip_norm


def _in_run_folder(name: str, kwargs: dict, folder: Path) -> dict:
    """Default output locations inside the run folder, for arguments the recipe leaves out."""
    kwargs = dict(kwargs)
    if name == "tensorboard":
        kwargs.setdefault("log_dir", str(folder / "tensorboard"))
    elif name == "wandb":
        kwargs["init_kwargs"] = {"dir": str(folder), **(kwargs.get("init_kwargs") or {})}
    elif name == "mlflow" and "MLFLOW_TRACKING_URI" not in os.environ:
        kwargs.setdefault("tracking_uri", (folder / "mlruns").resolve().as_uri())
    elif name == "file":
        # Composer's FileLogger rewrites its file: a start time in the name keeps a resumed run's earlier log.
        kwargs.setdefault("filename", str(folder / f"logs-{time.strftime('%Y%m%d-%H%M%S')}-rank{{rank}}.txt"))
    return kwargs


def build_loggers(cfg) -> list:
    """The ``loggers:`` of the recipe, writing into the run folder unless told otherwise."""
    folder = Path(cfg.checkpoint.save_folder)
    return [part_of("loggers", LOGGERS, name)[0].cls()(**_in_run_folder(name, kwargs or {}, folder))
            for name, kwargs in cfg.loggers.items()]


def build_composer_callbacks(cfg) -> list:
    """The ``callbacks:`` of the recipe (Composer's, or classes by import path; ours are built from their own
    sections)."""
    return [part_of("callbacks", CALLBACKS, name)[0].cls()(**(kwargs or {})) for name, kwargs in cfg.callbacks.items()]


def build_algorithms(cfg) -> list:
    """The ``algorithms:`` of the recipe named by import path (``gradient_clipping`` is our clipper, a callback)."""
    return [part_of("algorithms", {}, name)[0].cls()(**(kwargs or {})) for name, kwargs in cfg.algorithms.items()
            if name != "gradient_clipping"]
