"""The library's imports point down its layers and never close a circle.

Only module-level imports count: an import inside a function runs when the function does (the config's loader
reaches the preflight checks that way, and the checks reach the runtime), so it is how a light module calls a
heavy one without loading it.
"""

from __future__ import annotations

import ast
from fnmatch import fnmatchcase
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "llmshear"

# Lowest first; a module may import, at module level, modules of its own layer and of the layers below.
LAYERS = (
    ("leaves", ("llmshear", "llmshear.batch", "llmshear.checkpoints", "llmshear.choices", "llmshear.composer_parts",
                "llmshear.durations", "llmshear.files", "llmshear.loggers", "llmshear.progress", "llmshear.ranks",
                "llmshear.costs", "llmshear.slurm", "llmshear.sources", "llmshear.datasets.proportions",
                "llmshear.datasets.vocab")),
    ("config", ("llmshear.config", "llmshear.config.foreign", "llmshear.config.types", "llmshear.config.schema",
                "llmshear.config.loading")),
    ("data", ("llmshear.datasets", "llmshear.datasets.*", "llmshear.metrics")),
    ("models and their optimizer", ("llmshear.models", "llmshear.models.*", "llmshear.optim")),
    ("run folder and stores", ("llmshear.run_folder", "llmshear.remote", "llmshear.mirror")),
    ("callbacks", ("llmshear.callbacks", "llmshear.callbacks.*")),
    ("wiring and checks", ("llmshear.builders", "llmshear.config.preflight")),
    ("run", ("llmshear.run",)),
    ("offline tools", ("llmshear.tools", "llmshear.tools.*")),
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(LIBRARY.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path) -> set[str]:
    """The ``llmshear`` modules ``path`` imports outside any function or class."""
    found = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("llmshear"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("llmshear"))
    return found


def layer_of(module: str) -> int | None:
    """The layer whose patterns name ``module`` most exactly (a name before a wildcard), or None."""
    for exact in (True, False):
        for index, (_, patterns) in enumerate(LAYERS):
            if any((pattern == module) if exact else fnmatchcase(module, pattern) for pattern in patterns):
                return index
    return None


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in LIBRARY.rglob("*.py")}
    graph = {}
    for module, path in modules.items():
        # `from llmshear.models import cut` names the package; the module it means is the deeper one if it exists
        graph[module] = {name for name in top_level_imports(path) if name in modules}
    return graph


def test_every_module_has_a_layer():
    assert [m for m in import_graph() if layer_of(m) is None] == []


def test_no_import_runs_up_a_layer():
    upward = [f"{module} ({LAYERS[layer_of(module)][0]}) imports {name} ({LAYERS[layer_of(name)][0]})"
              for module, names in sorted(import_graph().items()) for name in sorted(names)
              if layer_of(name) > layer_of(module)]
    assert upward == []


def test_no_import_circle():
    graph, state, circles = import_graph(), {}, []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for name in sorted(graph[module]):
            if state.get(name) == "open":
                circles.append(" -> ".join(path[path.index(name):] + [name]))
            elif name not in state:
                visit(name, path + [name])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_module_level_imports_count_and_imports_inside_a_function_do_not(tmp_path):
    module = tmp_path / "module.py"
    module.write_text("import os\nfrom llmshear.run import main\nimport llmshear.files\n\n\ndef later():\n"
                      "    from llmshear.tools.plan import plan\n")
    assert top_level_imports(module) == {"llmshear.run", "llmshear.files"}
    assert layer_of("llmshear.run") > layer_of("llmshear.models.l0") > layer_of("llmshear.config.schema")
    assert layer_of("llmshear.config.preflight") > layer_of("llmshear.models.hf") > layer_of("llmshear.config")
