"""Reading weights of an HF directory or a GGUF file lazily, and copying them into a model strictly.

A checkpoint is read as a *lazy state dict*: ``{hf_parameter_name: thunk}`` where calling the thunk reads (and for
GGUF dequantises) that one tensor. Key sets are compared before any tensor is read, so a checkpoint that does not
match the config fails fast and names the keys.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from llmshear.models.llama import LlamaLM

log = logging.getLogger(__name__)

LazyStateDict = dict[str, Callable[[], torch.Tensor]]

# Buffers some old checkpoints contain; our rotary tables are recomputed from the config instead.
IGNORED_KEYS = re.compile(r"model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq")
# GGUF tensors with no HF parameter: llama.cpp's precomputed llama3 rope factors (HF reads them from the config).
IGNORED_GGUF_TENSORS = frozenset({"rope_freqs.weight"})
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes differ from the model's; the message names the keys."""


def _weight_files(directory: Path) -> list[Path]:
    """The weight files of an HF directory, safetensors preferred, sharded or not."""
    for index in WEIGHT_INDEXES:
        if (directory / index).is_file():
            weight_map = json.loads((directory / index).read_text())["weight_map"]
            return [directory / name for name in sorted(set(weight_map.values()))]
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return [directory / name]
    raise FileNotFoundError(f"{directory} has no weights: expected one of {WEIGHT_INDEXES + WEIGHT_FILES}")


def read_hf_weights(directory: Path) -> LazyStateDict:
    """Lazy state dict of an HF model directory (safetensors or ``pytorch_model*.bin``, sharded or not)."""
    lazy: LazyStateDict = {}
    for path in _weight_files(directory):
        if path.suffix == ".safetensors":
            handle = safe_open(str(path), framework="pt")
            lazy.update({key: (lambda h=handle, k=key: h.get_tensor(k)) for key in handle.keys()})
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            lazy.update({key: (lambda s=state, k=key: s[k]) for key in state})
    return lazy


def read_gguf_weights(path: Path, model: LlamaLM) -> LazyStateDict:
    """Lazy state dict of a GGUF file, in HF parameter names (llama.cpp's q/k row permutation undone).

    Args:
        path: the ``.gguf`` file.
        model: the model to load into (may be on the meta device); only its names and config are used.

    Raises:
        CheckpointMismatchError: a tensor of the file has no HF parameter name.
    """
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    reader = GGUFReader(path)
    field = reader.fields["general.architecture"]
    arch = bytes(field.parts[field.data[0]]).decode()
    cfg = model.cfg
    names = _gguf_names(model, arch, path)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(
        config={"num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads})

    def read(tensor) -> torch.Tensor:
        weights = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name).weights
        return torch.from_numpy(weights.copy())

    lazy: LazyStateDict = {}
    unknown = []
    for tensor in reader.tensors:
        if tensor.name in IGNORED_GGUF_TENSORS:
            log.warning("%s: ignoring tensor %s (rope scaling comes from the config)", path, tensor.name)
        elif tensor.name in names:
            lazy[names[tensor.name]] = lambda t=tensor: read(t)
        else:
            unknown.append(tensor.name)
    if unknown:
        raise CheckpointMismatchError(f"{path}: GGUF tensors with no model parameter: {_listed(unknown)}")
    return lazy


def _gguf_names(model: LlamaLM, arch: str, path: Path) -> dict[str, str]:
    """``{gguf tensor name: HF parameter name}`` for every parameter of ``model`` (tied aliases included)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch_ids = [key for key, name in MODEL_ARCH_NAMES.items() if name == arch]
    if not arch_ids:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is unknown to the installed gguf package")
    name_map = get_tensor_name_map(arch_ids[0], model.cfg.n_layers)
    names = {}
    for hf_name, _ in model.named_parameters(remove_duplicate=False):
        module, _, kind = hf_name.rpartition(".")
        gguf_module = name_map.get_name(module)
        if gguf_module is not None:
            names[f"{gguf_module}.{kind}"] = hf_name
    return names


def _listed(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_keys(model: nn.Module, keys: set[str], origin: str) -> None:
    """Raise :class:`CheckpointMismatchError` when ``keys`` miss a parameter of ``model`` or have an extra one.

    A tied parameter (e.g. ``lm_head.weight`` aliasing the embedding) may be absent; ignored buffers
    (:data:`IGNORED_KEYS`) may be present.
    """
    expected = {name for name, _ in model.named_parameters()}
    aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)} - expected
    missing = sorted(expected - keys)
    unexpected = sorted(k for k in keys - expected - aliases if not IGNORED_KEYS.fullmatch(k))
    problems = []
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listed(unexpected)}")
    if problems:
        raise CheckpointMismatchError(f"{origin} does not match the model config; " + "; ".join(problems))


@torch.no_grad()
def load_strict(model: nn.Module, lazy: LazyStateDict, origin: str) -> None:
    """Copy every tensor of ``lazy`` into ``model`` (cast to its dtype/device); nothing missing, extra or misshapen.

    A checkpoint of a tied model may carry the tied alias (``lm_head.weight``) as well: it must then equal the
    embedding it aliases, otherwise the checkpoint is not tied and the config is wrong.

    Raises:
        CheckpointMismatchError: naming the missing / unexpected keys or the key whose shape differs.
    """
    check_keys(model, set(lazy), origin)
    params = dict(model.named_parameters(remove_duplicate=False))
    primary = {name for name, _ in model.named_parameters()}
    for name in sorted(set(lazy) & set(params), key=lambda n: n not in primary):
        tensor, param = lazy[name](), params[name]
        if tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointMismatchError(
                f"{origin}: shape mismatch for {name}: checkpoint {tuple(tensor.shape)}, model {tuple(param.shape)}")
        if name in primary:
            param.copy_(tensor)
        elif not torch.equal(tensor.to(device=param.device, dtype=param.dtype), param):
            raise CheckpointMismatchError(
                f"{origin}: {name} differs from the parameter it is tied to; set tie_word_embeddings false")
