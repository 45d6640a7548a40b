"""Turn Composer training checkpoints into Hugging Face directories a user can take anywhere.

``export_checkpoint`` saves a run's model: a pruning run's cut to its target shape, a continued run's as it is;
``prune_one_shot`` cuts a recipe's source by activation importance, with no training. Both
write the weights (in the chosen dtype), config, generation config, the tokenizer, a ``summary.json`` (shape,
parameters, the stages and tokens that made the model, the run's last per-domain perplexity) and a model card
``README.md``; the directory loads with ``transformers`` alone.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import replace
from pathlib import Path

import torch

from llmshear.builders import run_calibration_batches
from llmshear.checkpoints import CheckpointError, kind_of, read_model_state
from llmshear.config import RunConfig
from llmshear.files import require_new_directory
from llmshear.models.cut import cut_model, model_from_state, prune_summary
from llmshear.models.hf import load_model, save_pretrained
from llmshear.models.importance import importance_masks
from llmshear.models.l0 import TARGET_KEYS, L0Module, TargetShape, l0_from_state_dict
from llmshear.models.llama import DTYPES, LlamaConfig, LlamaLM
from llmshear.remote import local_checkpoint
from llmshear.sources import has_tokenizer, load_tokenizer
from llmshear.tools.model_card import (
    CARD_FILE,
    SUMMARY_FILE,
    Stage,
    domain_perplexity,
    lineage,
    read_stage,
    render_card,
)

log = logging.getLogger(__name__)

RUN_SOURCE = "<the run's source>"  # ``tokenizer`` value: the source recorded in the checkpoint


def model_from_checkpoint(path: str | os.PathLike) -> LlamaLM:
    """The :class:`LlamaLM` of a continued-pre-training checkpoint, rebuilt strictly from its stored config.

    Raises:
        ValueError: see :func:`~llmshear.checkpoints.read_model_state`; a checkpoint without the model config; a
            pruning checkpoint (:func:`load_pruning_checkpoint` reads those); weights that do not match the config.
    """
    return _continued_model(read_model_state(path), path)


def load_pruning_checkpoint(path: str | os.PathLike) -> tuple[LlamaLM, L0Module]:
    """The model and L0 module of a Composer checkpoint of a pruning run (full or sharded).

    ``state['model']`` holds ``model.<LlamaLM keys>`` and ``l0.<L0Module keys>``; ``l0._extra_state`` carries
    the source config and the target, so nothing else is needed. The checkpoint is unpickled: load only
    checkpoints your own runs wrote.

    Raises:
        ValueError: see :func:`~llmshear.checkpoints.read_model_state` (missing, truncated, corrupt, not a Composer
            checkpoint); no L0 module in it; weights that do not match the stored config.
    """
    return _pruning_model(read_model_state(path), path)


def _continued_model(state: dict, path: str | os.PathLike) -> LlamaLM:
    """:func:`model_from_checkpoint` of the model state ``state`` read from ``path``."""
    if kind_of(state) != "continued":
        raise CheckpointError(f"{path} is a pruning checkpoint (it has L0 masks): read it with "
                              "load_pruning_checkpoint, or export (and cut) it with scripts/export_hf.py")
    extra = state.get("_extra_state")
    if not isinstance(extra, dict) or "model_config" not in extra:
        raise ValueError(f"{path} carries no model config (_extra_state): not a checkpoint of llmshear's train.py")
    return model_from_state(LlamaConfig(**extra["model_config"]), _weights(state))


def _pruning_model(state: dict, path: str | os.PathLike) -> tuple[LlamaLM, L0Module]:
    """:func:`load_pruning_checkpoint` of the model state ``state`` read from ``path``."""
    l0_state = {k.removeprefix("l0."): v for k, v in state.items() if k.startswith("l0.")}
    if "_extra_state" not in l0_state:
        raise CheckpointError(f"{path} is a continued checkpoint (it has no L0 module, l0._extra_state), not a "
                              "checkpoint of a pruning run: read it with model_from_checkpoint")
    l0 = l0_from_state_dict(l0_state)
    return model_from_state(l0.source, _weights(state)), l0


def _weights(state: dict) -> dict:
    """The :class:`LlamaLM` weights of a checkpoint's model state (its ``model.*`` entries, prefix removed)."""
    return {key.removeprefix("model."): value for key, value in state.items() if key.startswith("model.")}


def resolve_tokenizer(tokenizer, recorded_source: str | None):
    """``(tokenizer, where it came from)`` for an export.

    Args:
        tokenizer: None (save none), :data:`RUN_SOURCE` (the run's recorded source; none, with a warning, when
            that source has no tokenizer, e.g. a preset), a source name to load it from, or a tokenizer object.
        recorded_source: the source the checkpoint records (None for checkpoints of older versions).

    Raises:
        FileNotFoundError / ValueError: a named source without a readable tokenizer (see ``load_tokenizer``).
    """
    if tokenizer is None:
        return None, None
    if isinstance(tokenizer, str) and tokenizer == RUN_SOURCE:
        if recorded_source is None or not has_tokenizer(recorded_source):
            log.warning("no tokenizer saved: the run's source %s has none; pass --tokenizer SOURCE to add one",
                        recorded_source or "(not recorded in this checkpoint)")
            return None, None
        tokenizer = recorded_source
    if isinstance(tokenizer, str | os.PathLike):
        return load_tokenizer(tokenizer), str(tokenizer)
    return tokenizer, getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def _stage(checkpoint: str | os.PathLike, local: Path) -> Stage:
    """The stage ``local`` records, naming the checkpoint as the user gave it when it was downloaded."""
    stage = read_stage(local)
    return replace(stage, checkpoint=str(checkpoint)) if "://" in str(checkpoint) else stage


def _save(model: LlamaLM, out_dir: Path, stage, tokenizer, dtype: str | None, command: str | None,
          extra: dict, extra_files: dict, run_folder: Path) -> dict:
    """Write ``model`` with its tokenizer, summary and card (the perplexity from ``run_folder/metrics.jsonl``);
    returns the summary."""
    tokenizer, tokenizer_name = tokenizer
    if tokenizer is not None and len(tokenizer) > model.cfg.vocab_size:
        raise ValueError(f"--tokenizer {tokenizer_name}: {len(tokenizer)} tokens, more than the model's "
                         f"{model.cfg.vocab_size} embedding rows: text that uses the extra ids would fail in the "
                         "exported model; name the source's tokenizer (or 'none'); nothing was written")
    if dtype is not None:
        model = model.to(DTYPES[dtype])
    summary = {
        "out": str(out_dir),
        "params": model.num_params(),
        "shape": {k: getattr(model.cfg, k) for k in TARGET_KEYS},
        "dtype": str(model.lm_head.weight.dtype).removeprefix("torch."),
        "tokenizer": tokenizer_name,
        "stages": lineage(stage),
        "perplexity": domain_perplexity(run_folder, stage.batches),
        "command": command,
        **extra,
    }
    files = {**extra_files, SUMMARY_FILE: summary, CARD_FILE: render_card(out_dir.name, summary)}
    save_pretrained(model, out_dir, tokenizer=tokenizer, extra_files=files)
    return summary


def _save_cut(model: LlamaLM, masks: dict, cut: LlamaLM, out_dir: Path, stage: Stage, tokenizer,
              dtype: str | None, command: str | None, run_folder: Path) -> dict:
    """Save ``cut`` (``model`` cut with ``masks``) with ``masks.pt`` and the cut's summary; returns the summary."""
    buffer = io.BytesIO()
    torch.save(masks, buffer)
    summary = _save(cut, out_dir, stage, tokenizer, dtype, command, prune_summary(model, masks, cut),
                    {"masks.pt": buffer.getvalue()}, run_folder)
    log.info("cut (%s of %s): %d -> %d parameters, saved %s", stage.stage, stage.source, summary["params_before"],
             summary["params_after"], out_dir)
    return summary


def prune_one_shot(cfg: RunConfig, out_dir: str | os.PathLike, tokenizer=None, dtype: str | None = None,
                   command: str | None = None) -> dict:
    """One-shot structured pruning (no training): the recipe's source scored by activation importance on the
    calibration batches its run would draw for ``pruning.init: importance`` (``pruning.init_batches`` batches of
    ``train.micro_batch_size`` sequences from the recipe's part of the train split, with its proportions and
    seed), cut to ``pruning.target`` and saved as :func:`export_checkpoint` saves a cut.

    Raises:
        FileExistsError: ``out_dir`` exists and is not empty (checked before anything is read).
        ValueError / FileNotFoundError: a source, data or tokenizer that cannot be read; non-finite weights.
    """
    out_dir = require_new_directory(out_dir)
    source = cfg.model.pretrained
    tokenizer = resolve_tokenizer(tokenizer, source)
    model = load_model(source)
    target = TargetShape.from_dict(cfg.pruning.target, model.cfg)
    batches = run_calibration_batches(cfg, model.cfg.vocab_size)
    stage = Stage("one-shot pruning", source, "(none: activation importance, no training)", 0,
                  sum(b.numel() for b in batches))
    masks = importance_masks(model, target, batches)
    return _save_cut(model, masks, cut_model(model, masks), out_dir, stage, tokenizer, dtype, command, out_dir)


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, tokenizer=None,
                      dtype: str | None = None, command: str | None = None) -> dict:
    """Save the model of a ``train.py`` checkpoint as an HF directory ``out_dir`` (new or empty), by its kind: a
    pruning run's is cut to its target with its deterministic masks (``masks.pt`` and the cut's summary,
    :func:`~llmshear.models.cut.prune_summary`, beside it), a continued run's is saved as it is. The directory
    appears complete or not at all; the checkpoint is read once.

    Args:
        checkpoint: a local checkpoint (file or sharded directory), or ``s3://bucket/prefix/ep<E>-ba<N>-rank0.pt``
            (``s3://bucket/prefix``: a mirrored run's newest), downloaded with the run's ``metrics.jsonl`` into a
            temporary directory (:func:`llmshear.remote.local_checkpoint`); the summary names it as given.
        tokenizer: see :func:`resolve_tokenizer`.
        dtype: a key of :data:`DTYPES` for the saved weights (default: as trained, float32).
        command: the command line that made the export, for the model card.

    Returns:
        The summary (also written as ``summary.json``): output directory, parameters, shape, dtype, tokenizer,
        stages, the run's last per-domain perplexity, command; for a cut also what it removed.

    Raises:
        FileExistsError: ``out_dir`` exists and is not an empty directory (checked before anything is read).
        ValueError / FileNotFoundError: a missing, truncated, corrupt or foreign checkpoint (see
            :func:`~llmshear.checkpoints.read_model_state`), a tokenizer that cannot be loaded, non-finite weights.
    """
    out_dir = require_new_directory(out_dir)
    with local_checkpoint(checkpoint) as local:
        stage = _stage(checkpoint, local)
        tokenizer = resolve_tokenizer(tokenizer, stage.source)
        state = read_model_state(local)
        if kind_of(state) == "continued":
            return _save(_continued_model(state, local), out_dir, stage, tokenizer, dtype, command, {}, {},
                         local.parent)
        model, l0 = _pruning_model(state, local)
        del state
        masks = l0.deterministic_masks()
        cut = cut_model(model, masks)
        if cut.cfg != l0.target.to_config(l0.source):
            raise ValueError(f"cut config {cut.cfg} differs from the target {l0.target}")
        return _save_cut(model, masks, cut, out_dir, stage, tokenizer, dtype, command, local.parent)


def tokenizer_argument(value: str | None):
    """``--tokenizer`` as :func:`resolve_tokenizer` takes it: unset → :data:`RUN_SOURCE`, ``none`` → None."""
    if value is None:
        return RUN_SOURCE
    return None if value.lower() == "none" else value
