"""Downstream accuracy through EleutherAI's lm-evaluation-harness: the paper's tasks, or ours offline.

A model is evaluated by ``lm_eval.simple_evaluate`` on its ``HFLM`` wrapper: an HF directory (or a hub name)
is loaded by lm-eval itself; ``smollm2`` and ``.gguf`` files are loaded by our strict loader and handed over as
a ``transformers`` model with the same weights. Tasks are lm-eval names with an optional shot count
(``arc_challenge:25``); ours live in :data:`llmshear.tools.tasks.TASKS_DIR` and need no network.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from llmshear.tools.tasks import LOCAL_TASKS, TASKS_DIR

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskSpec:
    """One task: its lm-eval name, few-shot examples (None: the task's default) and the metric reported."""

    name: str
    shots: int | None = None
    metric: str = "acc"


# Sheared-LLaMA's downstream evaluation (Xia et al., 2023, Table 2), with the shots and metrics of its harness runs.
PAPER_TASKS = (
    TaskSpec("sciq", 0, "acc"),
    TaskSpec("piqa", 0, "acc"),
    TaskSpec("winogrande", 0, "acc"),
    TaskSpec("arc_easy", 0, "acc"),
    TaskSpec("arc_challenge", 25, "acc_norm"),
    TaskSpec("hellaswag", 10, "acc_norm"),
    TaskSpec("logiqa", 0, "acc_norm"),
    TaskSpec("boolq", 32, "acc"),
    TaskSpec("lambada_openai", 0, "acc"),
    TaskSpec("mmlu", 5, "acc"),
)
KNOWN = {spec.name: spec for spec in PAPER_TASKS} | {"nq_open": TaskSpec("nq_open", 32, "exact_match"),
                                                     "demo_continuation": TaskSpec("demo_continuation", 0, "acc")}


def parse_task(text: str) -> TaskSpec:
    """``name`` or ``name:shots``; a paper task keeps the paper's shots and metric unless shots are given.

    Raises:
        ValueError: an empty name or shots that are not a non-negative integer (the argument is named).
    """
    name, _, shots = text.partition(":")
    if not name or (shots and not shots.isdigit()):
        raise ValueError(f"--tasks {text!r}: expected NAME or NAME:SHOTS with SHOTS a non-negative integer")
    known = KNOWN.get(name, TaskSpec(name, None, "acc"))
    return TaskSpec(name, int(shots) if shots else known.shots, known.metric)


def all_local(specs: list[TaskSpec]) -> bool:
    """Whether every task is one of ours (then no dataset is downloaded and lm-eval's own index is not built)."""
    return all(spec.name in LOCAL_TASKS for spec in specs)


def is_local_model(source: str) -> bool:
    """An existing path or ``smollm2``: anything else is a hub name."""
    from llmshear.sources import SMOLLM2

    return source == SMOLLM2 or Path(source).exists()


def _looks_like_path(source: str) -> bool:
    """Not a hub name (``NAME`` or ``ORG/NAME``): a ``.gguf`` file, or absolute, relative or nested."""
    return source.endswith(".gguf") or source.startswith((".", "/", "~")) or source.count("/") > 1


def go_offline(datasets: bool, hub: bool) -> None:
    """Set ``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE`` so nothing tries the network (before datasets is imported)."""
    if datasets:
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    if hub:
        os.environ["HF_HUB_OFFLINE"] = "1"


def task_manager(specs: list[TaskSpec]):
    """lm-eval's ``TaskManager`` with our tasks; lm-eval's own ~15k are indexed only when one is asked for.

    Raises:
        ValueError: an unknown task name (the names are listed).
    """
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=not all_local(specs))
    unknown = [spec.name for spec in specs if spec.name not in manager.all_tasks]
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {unknown}; ours: {list(LOCAL_TASKS)}, lm-eval's: "
                         "`lm_eval ls tasks` (with hub access)")
    return manager


def to_transformers(model):
    """``transformers``' causal LM of our ``LlamaLM``'s config, with its weights (same dtype and device)."""
    from transformers import AutoModelForCausalLM

    from llmshear.models.hf import config_to_hf

    weight = model.lm_head.weight
    hf = AutoModelForCausalLM.from_config(config_to_hf(model.cfg), dtype=weight.dtype)
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf.to(weight.device).eval()


def load_lm(source: str, tokenizer: str | None = None, device: str = "cpu", dtype: str = "float32",
            batch_size: int | str = 8):
    """lm-eval's ``HFLM`` for a source: an HF directory, ``smollm2``, a ``.gguf`` file or a hub name.

    Args:
        source: the model.
        tokenizer: where its tokenizer is, when not in ``source`` (an HF dir, ``.gguf`` or ``smollm2``).
        device: torch device.
        dtype: a key of :data:`llmshear.models.llama.DTYPES`.
        batch_size: sequences per forward pass, or ``"auto"``.

    Raises:
        FileNotFoundError: a local model or tokenizer that does not exist, or a directory without a tokenizer.
        ValueError: a source our loader refuses (named).
    """
    from lm_eval.models.huggingface import HFLM

    from llmshear.models.hf import load_model
    from llmshear.models.llama import DTYPES
    from llmshear.sources import SMOLLM2, has_tokenizer, load_tokenizer, resolve_source

    if not is_local_model(source) and _looks_like_path(source):
        raise FileNotFoundError(f"--model {source}: not found (expected an HF directory, a .gguf file, smollm2 or "
                                "a hub name ORG/NAME)")
    if source.endswith(".gguf") or source == SMOLLM2:
        model = to_transformers(load_model(source, dtype=DTYPES[dtype], device=device))
        return HFLM(pretrained=model, tokenizer=load_tokenizer(tokenizer or source), batch_size=batch_size)
    if Path(source).exists():
        directory = resolve_source(source).directory
        if tokenizer is None and not has_tokenizer(directory):
            raise FileNotFoundError(f"--model {source}: the directory has no tokenizer; pass --tokenizer SOURCE "
                                    "(the model it was pruned from, e.g. smollm2)")
    hf_tokenizer = load_tokenizer(tokenizer) if tokenizer else None
    return HFLM(pretrained=source, tokenizer=hf_tokenizer, device=device, dtype=dtype, batch_size=batch_size)


def evaluate(lm, specs: list[TaskSpec], manager, limit: int | None = None) -> dict[str, dict]:
    """Every task's reported metric (and its standard error) for one model.

    Tasks with the same shot count run in one ``simple_evaluate`` call.

    Returns:
        ``{task: {"metric", "value", "stderr", "shots", "samples"}}``, in the order of ``specs``.
    """
    from lm_eval import simple_evaluate

    results, samples = {}, {}
    for shots in dict.fromkeys(spec.shots for spec in specs):
        names = [spec.name for spec in specs if spec.shots == shots]
        out = simple_evaluate(lm, tasks=names, num_fewshot=shots, limit=limit, task_manager=manager,
                              log_samples=False)
        results.update(out["results"])
        samples.update({name: n.get("effective") for name, n in out.get("n-samples", {}).items()})
    table = {}
    for spec in specs:
        row = results[spec.name]
        metric = spec.metric if f"{spec.metric},none" in row else _first_metric(row, spec.name)
        stderr = row.get(f"{metric}_stderr,none")
        table[spec.name] = {"metric": metric, "value": row[f"{metric},none"],
                            "stderr": stderr if isinstance(stderr, float) else None, "shots": spec.shots,
                            "samples": samples.get(spec.name)}
    return table


def _first_metric(row: dict, task: str) -> str:
    """The first number lm-eval reports for a task whose metric is not ``acc`` (e.g. ``exact_match``)."""
    names = [key.split(",")[0] for key, value in row.items()
             if key.endswith(",none") and "_stderr" not in key and isinstance(value, int | float)]
    if not names:
        raise ValueError(f"task {task!r}: lm-eval reported no metric ({sorted(row)})")
    return names[0]


def format_table(results: dict[str, dict[str, dict]]) -> str:
    """Tasks (with shots and metric) down, models across, values in percent; a mean row when several tasks."""
    models = list(results)
    tasks = list(next(iter(results.values())))
    width = max(12, *(len(m) for m in models)) + 2
    first = next(iter(results.values()))
    shots = {t: "default shots" if first[t]["shots"] is None else f"{first[t]['shots']}-shot" for t in tasks}
    label = {t: f"{t} ({shots[t]}, {first[t]['metric']})" for t in tasks}
    left = max(16, *(len(v) for v in label.values())) + 2
    rows = [f"{'task':<{left}}" + "".join(f"{m:>{width}}" for m in models)]
    rows += [f"{label[t]:<{left}}" + "".join(f"{100 * results[m][t]['value']:>{width}.1f}" for m in models)
             for t in tasks]
    if len(tasks) > 1:
        means = [100 * sum(results[m][t]["value"] for t in tasks) / len(tasks) for m in models]
        rows.append(f"{'mean':<{left}}" + "".join(f"{v:>{width}.1f}" for v in means))
    return "\n".join(rows)
