"""Loading a run configuration: YAML + ``key=value`` overrides → a typed, resolved, checked :class:`RunConfig`.

The steps, in order, each collecting problems rather than stopping at the first:

1. :func:`~llmshear.config.types.load_raw`: merge the file and the overrides (OmegaConf), resolve interpolations;
2. :func:`~llmshear.config.schema.parse`: types and enumerated choices against the schema;
3. :func:`~llmshear.durations.resolve_durations`: Composer-style durations (``3200ba``) to whole batches;
4. :func:`resolve_files`: the values that ``*_from`` keys name are read into the config;
5. :func:`~llmshear.config.preflight.check_run`: numbers, files and the machine.
"""

from __future__ import annotations

import os
from pathlib import Path

from llmshear.config.schema import RunConfig, parse
from llmshear.config.types import ConfigError, annotate, load_raw
from llmshear.datasets.proportions import read_domain_values
from llmshear.durations import resolve_durations

FROM_FILES = ("proportions", "reference_losses")  # data.<key> may come from data.<key>_from


def resolve_files(cfg: RunConfig) -> tuple[frozenset[str], list[str]]:
    """Fill ``data.proportions`` / ``data.reference_losses`` from the files their ``*_from`` keys name.

    Returns:
        The keys filled, and the problems: a file that cannot be read (its value stays unset). A key set both
        ways is not read; :func:`~llmshear.config.preflight.check_proportions` reports it.
    """
    d = cfg.data
    resolved, problems = set(), []
    for key in FROM_FILES:
        source = getattr(d, f"{key}_from")
        if source is None or getattr(d, key) is not None:
            continue
        try:
            setattr(d, key, read_domain_values(source, d.domains, key))
            resolved.add(key)
        except ValueError as err:
            problems.append(f"data.{key}_from: {err}")
    return frozenset(resolved), problems


def load(path: str | Path, overrides: list[str] = (), world_size: int | None = None,
         cuda: bool | None = None, files: bool = True) -> RunConfig:
    """Load, merge, type-check, resolve and validate a run config; nothing heavy is read.

    Args:
        path: the YAML recipe.
        overrides: ``key=value`` strings (OmegaConf dotlist), applied after the file.
        world_size: processes in the run (default: ``WORLD_SIZE`` of the environment, else 1).
        cuda: whether a GPU is usable (default: ``torch.cuda.is_available()``).
        files: read the ``*_from`` files and check the data and the checkpoints (False: the resource planner,
            which runs before any of them exists, reads only the model configs).

    Raises:
        ConfigError: listing every problem, each naming its key (with ``file:line`` where it is in the file).
    """
    from llmshear.config.preflight import check_run  # the checks read models, data and checkpoints: the runtime

    world_size = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    raw, problems = load_raw(path, overrides)
    cfg, schema_problems = parse(raw)
    problems += schema_problems
    if cfg is not None:
        problems += resolve_durations(cfg)
        resolved = frozenset()
        if files:
            try:
                resolved, file_problems = resolve_files(cfg)
                problems += file_problems
            except (TypeError, AttributeError):  # data.domains of the wrong type, already reported
                pass
        problems += check_run(cfg, world_size, cuda, files, resolved)
    if problems:
        raise ConfigError(annotate(problems, path, overrides), origin=str(path))
    return cfg
