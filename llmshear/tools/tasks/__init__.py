"""Downstream tasks of our own, as lm-evaluation-harness task directories (YAML + local data files).

``TASKS_DIR`` is passed to ``lm_eval``'s ``TaskManager(include_path=...)`` by ``scripts/eval_downstream.py``;
``lm_eval --include_path llmshear/tools/tasks --tasks demo_continuation`` finds them too.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
LOCAL_TASKS = ("demo_continuation",)
