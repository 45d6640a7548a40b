"""What an exported model is and where it came from: the run record of a checkpoint, the lineage of stages,
the last per-domain perplexity of the run, and the model card (``README.md``) that says all of it."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from huggingface_hub import ModelCard, ModelCardData

from llmshear.checkpoints import describe
from llmshear.loggers import METRICS_FILE, read_metrics
from llmshear.sources import SMOLLM2, SMOLLM2_FILE

SUMMARY_FILE = "summary.json"
CARD_FILE = "README.md"
DOMAIN_LOSS = "DomainCrossEntropy"
# Evaluator labels, preferred first: ``eval_target`` measured the cut model during pruning, ``eval`` the model.
EVAL_LABELS = ("eval_target", "eval")
EMBEDDED = {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"}  # the `smollm2` source
REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass(frozen=True)
class Stage:
    """One training stage of an exported model's history."""

    stage: str  # "pruning" or "continued"
    source: str | None  # the run's model.pretrained, as recorded in its checkpoint
    checkpoint: str
    batches: int
    tokens: int


def read_stage(path: str | os.PathLike) -> Stage:
    """The :class:`Stage` a Composer checkpoint (full or sharded) records: its kind, source, and the batches and
    tokens it trained on (:func:`llmshear.checkpoints.describe`; no weight is read).

    Raises:
        FileNotFoundError / CheckpointError: see :func:`llmshear.checkpoints.load_checkpoint`.
    """
    info = describe(path)
    return Stage(info.kind, info.source, str(Path(path).resolve()), info.batch, info.tokens)


def lineage(stage: Stage) -> list[dict]:
    """The stages that made a model: those recorded in its source's ``summary.json`` (a model this project
    exported), then ``stage``."""
    earlier = []
    if stage.source is not None and (Path(stage.source) / SUMMARY_FILE).is_file():
        earlier = json.loads((Path(stage.source) / SUMMARY_FILE).read_text()).get("stages", [])
    return [*earlier, asdict(stage)]


def domain_perplexity(run_folder: str | os.PathLike, batch: int) -> dict | None:
    """The per-domain perplexity of the last evaluation at or before ``batch`` in ``run_folder/metrics.jsonl``.

    The cut model's evaluation (``eval_target``) is preferred over the masked model's. Returns ``{"batch",
    "evaluator", "perplexity": {domain: ppl}}``, or None when the file or an evaluation is missing.
    """
    path = Path(run_folder) / METRICS_FILE
    if not path.is_file():
        return None
    rows = [row for row in read_metrics(path) if isinstance(row.get("batch"), int) and row["batch"] <= batch]
    for label in EVAL_LABELS:
        prefix = f"metrics/{label}/{DOMAIN_LOSS}/"
        losses: dict[int, dict[str, float]] = {}
        for row in rows:
            for key, value in row.items():
                if key.startswith(prefix) and isinstance(value, int | float):
                    losses.setdefault(row["batch"], {})[key.removeprefix(prefix)] = float(value)
        if losses:
            last = max(losses)
            return {"batch": last, "evaluator": label,
                    "perplexity": {domain: math.exp(loss) for domain, loss in losses[last].items()}}
    return None


def source_metadata(source: str | None) -> dict:
    """``base_model`` and ``license`` of an original source, where known: the embedded SmolLM2; for an HF
    directory, the license of its own card (``README.md`` front matter) and the hub id its ``config.json``
    records (``_name_or_path``)."""
    if source is None:
        return {}
    path = Path(source)
    if source == SMOLLM2 or path.name == SMOLLM2_FILE:
        return dict(EMBEDDED)
    found = {}
    card = path / CARD_FILE
    if card.is_file():
        try:
            data = ModelCard.load(card).data
        except (ValueError, yaml.YAMLError):
            data = ModelCardData()
        found = {"license": data.license} if data.license else {}
    config = path / "config.json"
    if config.is_file():
        name = json.loads(config.read_text()).get("_name_or_path") or ""
        if REPO_ID.fullmatch(name) and not Path(name).exists():
            found["base_model"] = name
    return found


def card_metadata(summary: dict) -> ModelCardData:
    """The card's front matter: what the Hugging Face hub indexes (library, pipeline, tags, and the original
    source's base_model and license where :func:`source_metadata` knows them)."""
    stages = summary.get("stages") or []
    known = source_metadata(stages[0]["source"] if stages else None)
    return ModelCardData(library_name="transformers", pipeline_tag="text-generation",
                         tags=["llmshear", "pruned", "llama"], **known)


def render_card(name: str, summary: dict) -> str:
    """The model card (Markdown with Hugging Face front matter) of an exported model, from its ``summary.json``."""
    shape = summary["shape"]
    lines = [
        f"# {name}",
        "",
        "A LLaMA-family causal language model made by llmshear (structured pruning and continued pre-training).",
        "It loads with `transformers` alone:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")' if summary.get("tokenizer") else
        "# this export has no tokenizer: use the source model's",
        "```",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {summary['params']:,} |",
        f"| dtype | {summary['dtype']} |",
        *(f"| {key} | {value} |" for key, value in shape.items()),
        f"| tokenizer | {summary.get('tokenizer') or 'none saved'} |",
        "",
        "## How it was made",
        "",
        "| stage | source | batches | tokens | checkpoint |",
        "|---|---|---|---|---|",
        *(f"| {s['stage']} | {s['source']} | {s['batches']:,} | {s['tokens']:,} | {s['checkpoint']} |"
          for s in summary["stages"]),
        "",
        f"Command: `{summary['command']}`" if summary.get("command") else "",
    ]
    ppl = summary.get("perplexity")
    if ppl:
        lines += ["", f"## Perplexity per domain (the run's held-out evaluation `{ppl['evaluator']}` at batch "
                  f"{ppl['batch']})", "", "| domain | perplexity |", "|---|---|",
                  *(f"| {domain} | {value:.2f} |" for domain, value in ppl["perplexity"].items())]
    body = "\n".join(lines).rstrip() + "\n"
    return str(ModelCard(f"---\n{card_metadata(summary).to_yaml()}\n---\n\n{body}"))
