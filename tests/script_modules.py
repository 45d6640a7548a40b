"""The repository's command-line scripts (``scripts/*.py``) imported as modules, for tests to call their ``main``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def script(name: str):
    """``scripts/<name>.py`` as the module ``<name>_script`` (imported once; registered in ``sys.modules``, where
    dataclasses look their module up)."""
    module_name = f"{name}_script"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]
