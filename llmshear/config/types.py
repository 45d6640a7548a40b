"""Typed configuration from YAML: OmegaConf merge and resolution, dataclass type checking, YAML line numbers.

Generic machinery behind :mod:`llmshear.config`: every function collects problems (strings that start with the
dotted key) instead of stopping at the first one.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from llmshear.config.foreign import foreign_hint


class ConfigError(ValueError):
    """One or more configuration problems; ``problems`` lists them, each naming its key."""

    def __init__(self, problems: list[str], origin: str = "config"):
        self.problems = problems
        super().__init__(f"{origin}: {len(problems)} problem(s)\n  " + "\n  ".join(problems))


def load_raw(path: str | Path, overrides: list[str] = ()) -> tuple[dict, list[str]]:
    """Merge the YAML file and ``key=value`` overrides and resolve interpolations.

    Returns:
        The plain nested dict, and the problems met so far (an unresolvable interpolation names its key; its
        value becomes None; an override without ``=`` is reported as the command line's and left out).

    Raises:
        ConfigError: the file is missing or not YAML (with its line), or an override is malformed.
    """
    path = Path(path)
    problems = [f"command line: {item!r} is not key=value (to set it, write {item.strip()}=VALUE)"
                for item in overrides if not override_key(item)]
    overrides = [item for item in overrides if override_key(item)]
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
        raise ConfigError([f"command line: overrides {list(overrides)}: {err}"]) from err
    return _resolve(conf, "", problems), problems


def override_key(item: str) -> str:
    """The dotted key of a ``key=value`` override, or ``""`` when it has no ``=`` or no key."""
    key, equals, _ = item.partition("=")
    return key.strip() if equals else ""


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
    known = "known: " + ", ".join(sorted(names))
    problems += [f"{prefix}{key}: unknown key ({foreign_hint(prefix + str(key)) or known})" for key in values
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
            if not _finite(value):
                problems.append(f"{key}: must be a finite number, got {value!r}")
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


def _finite(value) -> bool:
    """False for a NaN or infinite float, also inside a list (YAML's ``.nan`` / ``.inf`` type-check as floats)."""
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def _kind(value) -> str:
    return {dict: "a mapping", list: "a list"}.get(type(value), type(value).__name__)


def annotate(problems: list[str], path: str | Path, overrides: list[str] = ()) -> list[str]:
    """Prefix each problem with where its key was set: ``command line`` when an override set the key (or a
    section above it), else ``file:line`` when it was written in the YAML file."""
    lines = key_lines(path)
    given = [override_key(item) for item in overrides if override_key(item)]
    out = []
    for problem in problems:
        key = problem.split(":", 1)[0].split("=", 1)[0].strip()
        line = lines.get(key) or lines.get(key.rsplit(".", 1)[0])
        if any(key == k or key.startswith(f"{k}.") for k in given):
            out.append(f"command line: {problem}")
        else:
            out.append(f"{path}:{line}: {problem}" if line else problem)
    return out
