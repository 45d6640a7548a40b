"""Read the language model out of a Composer training checkpoint and save it as a Hugging Face directory."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from llmshear.checkpoints import CheckpointError, kind_of, read_model_state
from llmshear.models.hf import save_pretrained
from llmshear.models.llama import LlamaConfig, LlamaLM
from llmshear.models.prune import model_from_state

log = logging.getLogger(__name__)


def model_from_checkpoint(path: str | os.PathLike) -> LlamaLM:
    """The :class:`LlamaLM` of a continued-pre-training checkpoint, rebuilt strictly from its stored config.

    Raises:
        ValueError: see :func:`llmshear.checkpoints.read_model_state`; a checkpoint without the model config; a
            pruning checkpoint (those are cut by ``scripts/prune.py``); weights that do not match the config.
    """
    state = read_model_state(path)
    if kind_of(state) != "continued":
        raise CheckpointError(f"{path} is a pruning checkpoint (it has L0 masks): cut it with scripts/prune.py "
                              "instead")
    extra = state.get("_extra_state")
    if not isinstance(extra, dict) or "model_config" not in extra:
        raise ValueError(f"{path} carries no model config (_extra_state): not a checkpoint of llmshear's train.py")
    weights = {key.removeprefix("model."): value for key, value in state.items() if key.startswith("model.")}
    return model_from_state(LlamaConfig(**extra["model_config"]), weights)


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, tokenizer=None) -> dict:
    """Save the model of ``checkpoint`` as an HF directory ``out_dir`` (new or empty; checked before reading).

    Returns:
        A JSON-ready summary: the output directory, parameter count and shape.

    Raises:
        FileExistsError: ``out_dir`` exists and is not an empty directory; nothing is read or written.
        ValueError: see :func:`model_from_checkpoint`.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty directory; nothing was written")
    model = model_from_checkpoint(checkpoint)
    save_pretrained(model, out_dir, tokenizer=tokenizer)
    cfg = model.cfg
    shape = {k: getattr(cfg, k) for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "intermediate_size")}
    return {"out": str(out_dir), "params": model.num_params(), "shape": shape}
