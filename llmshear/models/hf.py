"""Hugging Face in and out: configs, loading a source (HF dir, GGUF, ``smollm2``, preset) and saving HF dirs.

Our parameter names are HF ``LlamaForCausalLM``'s, so weights are copied without renaming. Loading is strict
(see :mod:`llmshear.models.weights`): a continued run can never silently start from random weights.
Saved directories load with ``AutoModelForCausalLM.from_pretrained(out_dir)`` and no code of ours.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
import transformers
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file

from llmshear.files import new_directory, require_new_directory
from llmshear.models.build import CONFIG_ONLY, PRESETS, build_model, empty_model, reset_rotary
from llmshear.models.llama import LlamaConfig, LlamaLM
from llmshear.models.weights import (
    WEIGHT_FILES,
    WEIGHT_INDEXES,
    check_shapes,
    has_weights,
    load_strict,
    read_gguf_weights,
    read_hf_weights,
    weight_files,
)
from llmshear.sources import resolve_source

__all__ = ["PRESETS", "build_model", "check_weights", "config_from_hf", "config_to_hf", "load_config", "load_model",
           "save_pretrained"]

log = logging.getLogger(__name__)

# model_type → (config class, causal LM class name, q/k/v bias, o bias); None: read from `attention_bias`.
FAMILIES = {
    "llama": (transformers.LlamaConfig, "LlamaForCausalLM", None, None),
    "mistral": (transformers.MistralConfig, "MistralForCausalLM", False, False),
    "qwen2": (transformers.Qwen2Config, "Qwen2ForCausalLM", True, False),
}
ROPE_TYPES = ("default", "linear", "llama3")
# Files of a previous save that a new save into the same directory replaces (they would shadow the new weights).
STALE_WEIGHTS = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")


def _check_supported(hf_config, origin: str) -> tuple[str, bool, bool]:
    """Model type, q/k/v bias and o bias of an HF config; ValueError naming what is unsupported and ``origin``."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"{origin}: model_type {model_type!r} is not supported (supported: {sorted(FAMILIES)})")
    _, arch, qkv_bias, o_bias = FAMILIES[model_type]
    for name in getattr(hf_config, "architectures", None) or []:
        if name != arch:
            raise ValueError(f"{origin}: architecture {name!r} is not supported for {model_type} (only {arch})")
    if getattr(hf_config, "hidden_act", "silu") != "silu" or getattr(hf_config, "mlp_bias", False):
        raise ValueError(f"{origin}: only a bias-free SiLU (SwiGLU) MLP is supported")
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    if scaling.get("rope_type", scaling.get("type", "default")) not in ROPE_TYPES:
        raise ValueError(f"{origin}: rope_scaling {scaling} is not supported (types: {ROPE_TYPES})")
    if qkv_bias is None:
        qkv_bias = o_bias = bool(getattr(hf_config, "attention_bias", False))
    return model_type, qkv_bias, o_bias


def _sliding_window_extra(hf_config, model_type: str, origin: str) -> dict:
    """Sliding-window settings to carry through unchanged; our attention is always full (warned)."""
    if model_type == "mistral" and hf_config.sliding_window is not None:
        log.warning("%s: sliding_window=%s is ignored, llmshear uses full attention", origin, hf_config.sliding_window)
        return {"sliding_window": hf_config.sliding_window}
    if model_type == "qwen2" and hf_config.use_sliding_window:
        log.warning("%s: use_sliding_window is ignored, llmshear uses full attention", origin)
        return {key: getattr(hf_config, key) for key in ("use_sliding_window", "sliding_window", "max_window_layers")}
    return {}


def config_from_hf(hf_config: transformers.PretrainedConfig, origin: str = "config") -> LlamaConfig:
    """Our :class:`LlamaConfig` from an HF llama / mistral / qwen2 config.

    Args:
        hf_config: a ``transformers`` config object.
        origin: where it came from (a file path), for error messages.

    Raises:
        ValueError: an unsupported model type, architecture, activation, MLP bias or rope scaling.
    """
    model_type, qkv_bias, o_bias = _check_supported(hf_config, origin)
    n_heads = hf_config.num_attention_heads
    scaling = getattr(hf_config, "rope_scaling", None)
    return LlamaConfig(
        vocab_size=hf_config.vocab_size,
        d_model=hf_config.hidden_size,
        n_layers=hf_config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(hf_config, "num_key_value_heads", None) or n_heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads,
        intermediate_size=hf_config.intermediate_size,
        rms_norm_eps=hf_config.rms_norm_eps,
        rope_theta=hf_config.rope_theta,
        rope_scaling=dict(scaling) if scaling else None,
        max_seq_len=hf_config.max_position_embeddings,
        tie_word_embeddings=bool(hf_config.tie_word_embeddings),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        hf_model_type=model_type,
        bos_token_id=hf_config.bos_token_id,
        eos_token_id=hf_config.eos_token_id,
        pad_token_id=hf_config.pad_token_id,
        extra=_sliding_window_extra(hf_config, model_type, origin),
    )


def config_to_hf(cfg: LlamaConfig) -> transformers.PretrainedConfig:
    """The HF config (``LlamaConfig`` / ``MistralConfig`` / ``Qwen2Config``) describing ``cfg``.

    Raises:
        ValueError: the biases of ``cfg`` cannot be expressed by its ``hf_model_type``.
    """
    if cfg.hf_model_type not in FAMILIES:
        raise ValueError(f"hf_model_type {cfg.hf_model_type!r} is not supported (supported: {sorted(FAMILIES)})")
    config_class, arch, qkv_bias, o_bias = FAMILIES[cfg.hf_model_type]
    family = {"attention_bias": cfg.qkv_bias} if qkv_bias is None else {}
    if (cfg.qkv_bias, cfg.o_bias) != ((cfg.qkv_bias, cfg.qkv_bias) if qkv_bias is None else (qkv_bias, o_bias)):
        raise ValueError(f"{cfg.hf_model_type} cannot express qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}")
    if cfg.hf_model_type == "mistral":
        family["sliding_window"] = None
    return config_class(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        intermediate_size=cfg.intermediate_size,
        hidden_act="silu",
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        rope_scaling=dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        architectures=[arch],
        **{**family, **cfg.extra},
    )


def load_config(source: str | os.PathLike) -> LlamaConfig:
    """The config of a source without loading any weights.

    Args:
        source: a preset name (:data:`PRESETS`), ``"smollm2"``, a ``.gguf`` file (metadata only) or an HF
            directory with ``config.json``.

    Raises:
        FileNotFoundError: the directory / file / config.json does not exist (the path is named).
        ValueError: the config is not a supported LLaMA-family config (the key and file are named).
    """
    if str(source) in PRESETS:
        return PRESETS[str(source)]()
    location = resolve_source(source)
    if location.gguf_file is not None:
        path = location.directory / location.gguf_file
        return config_from_hf(transformers.AutoConfig.from_pretrained(location.directory, gguf_file=path.name),
                              origin=str(path))
    path = location.directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{location.directory} has no config.json: not a Hugging Face model directory")
    raw = json.loads(path.read_text())
    if raw.get("model_type") not in FAMILIES:
        raise ValueError(f"{path}: key 'model_type' is {raw.get('model_type')!r}; supported: {sorted(FAMILIES)}")
    return config_from_hf(transformers.AutoConfig.from_pretrained(location.directory), origin=str(path))


def check_weights(source: str | os.PathLike) -> None:
    """Check an HF directory's weight files without reading a tensor (what a config check can afford).

    The index is readable and every shard it names exists; every safetensors header reads (a truncated file or a
    corrupt header fails here) and records the keys and shapes that ``config.json`` implies. ``pytorch_model*.bin``
    files are only checked to exist. Presets, GGUF files and a directory without any weights (a config-only
    shape) pass: :func:`require_weights` refuses the last when a run needs them.

    Raises:
        FileNotFoundError / ValueError: see :func:`load_config`; :class:`~llmshear.models.weights.WeightFileError`
            or :class:`~llmshear.models.weights.CheckpointMismatchError` naming the file and tensor.
    """
    if str(source) in PRESETS:
        return
    location = resolve_source(source)
    if location.gguf_file is not None or not has_weights(location.directory):
        return
    model = empty_model(load_config(source), device="meta")
    files, _ = weight_files(location.directory)
    if all(path.suffix == ".safetensors" for path in files):
        check_shapes(model, read_hf_weights(location.directory), str(location.directory))


def require_weights(source: str | os.PathLike) -> None:
    """What a run needs beyond :func:`check_weights`: weights at all (no file is read).

    Raises:
        FileNotFoundError: ``source`` is a preset of a public shape only, or an HF directory without weight files.
    """
    if str(source) in CONFIG_ONLY:
        raise FileNotFoundError(f"{source!r} is a preset of a public shape without weights (for scripts/plan.py); "
                                "a run needs the model's directory")
    if str(source) in PRESETS:
        return
    location = resolve_source(source)
    if location.gguf_file is None and not has_weights(location.directory):
        raise FileNotFoundError(f"{location.directory} has a config.json but no weights (none of "
                                f"{', '.join(WEIGHT_INDEXES + WEIGHT_FILES)}): a run needs them; a config-only "
                                "directory serves scripts/plan.py")


def load_model(source: str | os.PathLike, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> LlamaLM:
    """Load a source into a :class:`LlamaLM` (in eval mode), strictly.

    Args:
        source: an HF directory (config.json + safetensors / ``pytorch_model*.bin``, sharded or not), a ``.gguf``
            file, ``"smollm2"`` (the embedded SmolLM2-135M GGUF), or a ``tiny-*`` preset (random weights, seed 0).
        dtype: parameter dtype (checkpoint tensors are cast).
        device: where the parameters live.

    Raises:
        CheckpointMismatchError: a missing or unexpected key, or a shape mismatch (the key is named).
        FileNotFoundError / ValueError: see :func:`load_config`; a config-only preset.
    """
    name = str(source)
    if name in CONFIG_ONLY:
        raise ValueError(f"preset {name!r} is a shape only: use build_model(load_config({name!r}), device='meta')")
    if name in PRESETS:
        return build_model(PRESETS[name](), device=device, seed=0, dtype=dtype).eval()
    cfg = load_config(source)
    location = resolve_source(source)
    model = empty_model(cfg, device=device, dtype=dtype)
    if location.gguf_file is not None:
        origin = location.directory / location.gguf_file
        lazy = read_gguf_weights(origin, model)
    else:
        origin = location.directory
        lazy = read_hf_weights(origin)
    load_strict(model, lazy, str(origin))
    reset_rotary(model)
    log.info("loaded %s: %d parameters", origin, model.num_params())
    return model.eval()


def _write_weights(model: LlamaLM, directory: Path, max_shard_size: str | int) -> None:
    """safetensors (sharded with an index above ``max_shard_size``); a tied lm_head is stored once, as HF does."""
    state = {name: param.detach().cpu().contiguous() for name, param in model.named_parameters()}
    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({name: state[name] for name in names}, directory / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_extra(directory: Path, extra_files: dict) -> None:
    """``str`` → text, ``bytes`` → binary, ``dict``/``list`` → JSON (``*.safetensors`` with a dict of tensors)."""
    for name, content in extra_files.items():
        if Path(name).name != name:
            raise ValueError(f"extra file name {name!r} must be a plain file name")
        path = directory / name
        if name.endswith(".safetensors") and isinstance(content, dict):
            save_file({k: v.detach().cpu().contiguous() for k, v in content.items()}, path)
        elif isinstance(content, str):
            path.write_text(content)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, dict | list):
            path.write_text(json.dumps(content, indent=2) + "\n")
        else:
            raise TypeError(f"extra file {name!r}: cannot write a {type(content).__name__}")


def _move_into(staging: Path, out_dir: Path) -> None:
    """Move the staged files into the existing ``out_dir``, then drop weight files of an earlier save that were not
    replaced (``overwrite``: other files stay)."""
    written = {path.name for path in staging.iterdir()}
    for name in written:
        os.replace(staging / name, out_dir / name)
    for path in out_dir.iterdir():
        if path.name not in written and STALE_WEIGHTS.fullmatch(path.name):
            path.unlink()


def save_pretrained(model: LlamaLM, out_dir: str | os.PathLike, tokenizer=None, extra_files: dict | None = None,
                    overwrite: bool = False, max_shard_size: str | int = "5GB") -> Path:
    """Write ``model`` as an HF directory: config.json, generation_config.json, safetensors, tokenizer, extras.

    Everything is written to a staging directory next to ``out_dir`` first and moved in at the end
    (:func:`~llmshear.files.new_directory`), so a crash never leaves a half-written model behind, and a second
    save into the same ``out_dir`` is refused while the first runs, or when the first finished meanwhile.

    Args:
        model: the model (any device; meta is refused).
        out_dir: the directory to create.
        tokenizer: a ``transformers`` tokenizer to save alongside, or None.
        extra_files: ``{file name: content}`` written next to the model (see :func:`_write_extra`).
        overwrite: allow writing into an existing non-empty directory (same-named files are replaced).
        max_shard_size: shard the safetensors above this size (HF notation, e.g. ``"5GB"``).

    Returns:
        ``out_dir`` as a Path.

    Raises:
        FileExistsError: ``out_dir`` is non-empty (or a file) and ``overwrite`` is False.
        ValueError: a weight holds NaN or inf (nothing is written).
    """
    if overwrite and Path(out_dir).is_dir():
        out_dir = Path(out_dir)
    else:
        out_dir = require_new_directory(out_dir, "pass overwrite=True to write into it")
    if any(param.is_meta for param in model.parameters()):
        raise ValueError("cannot save a model on the meta device: it has no weights")
    broken = [name for name, param in model.named_parameters() if not torch.isfinite(param).all()]
    if broken:
        raise ValueError(f"refusing to save {out_dir}: {len(broken)} weight tensors hold NaN or inf (first: "
                         f"{broken[0]}); the run diverged, export an earlier checkpoint")
    if model.cfg.tie_word_embeddings != (model.lm_head.weight is model.model.embed_tokens.weight):
        raise ValueError("tie_word_embeddings does not match whether lm_head shares the embedding")
    with new_directory(out_dir, overwrite, what="the model", replace=_move_into) as staging:
        hf_config = config_to_hf(model.cfg)
        hf_config.dtype = model.lm_head.weight.dtype
        hf_config.save_pretrained(staging)
        if model.cfg.bos_token_id is not None or model.cfg.eos_token_id is not None:
            transformers.GenerationConfig.from_model_config(hf_config).save_pretrained(staging)
        _write_weights(model, staging, max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        _write_extra(staging, extra_files or {})
    log.info("saved %s (%d parameters)", out_dir, model.num_params())
    return out_dir
