"""Reading weights of an HF directory or a GGUF file lazily, and copying them into a model strictly.

A source's weights are read as a *lazy state dict*: ``{hf_parameter_name: thunk}`` where calling the thunk reads
(and for GGUF dequantises) that one tensor. Key sets, and for safetensors the shapes in the file headers, are
compared before any tensor is read, so weights that do not match the config fail fast and name the keys. A missing
shard, an unreadable index or a truncated or corrupt file is a :class:`WeightFileError` naming the file (and
tensor).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
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


class WeightFileError(ValueError):
    """A weight file or index is missing, truncated or corrupt; the message names the file (and the tensor)."""


@dataclass(frozen=True)
class LazyTensor:
    """One tensor of a weight file, read when called; ``shape`` as the file's header records it."""

    file: Path
    read: Callable[[], torch.Tensor]
    shape: tuple[int, ...]

    def __call__(self) -> torch.Tensor:
        return self.read()


def has_weights(directory: Path) -> bool:
    """Whether an HF directory has a weight index or an unsharded weight file."""
    return any((directory / name).is_file() for name in WEIGHT_INDEXES + WEIGHT_FILES)


def weight_files(directory: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files of an HF directory (safetensors preferred, sharded or not) and the index's weight map.

    Raises:
        FileNotFoundError: no weights at all.
        WeightFileError: the index is unreadable or names a shard that is not there.
    """
    for index in WEIGHT_INDEXES:
        path = directory / index
        if path.is_file():
            try:
                weight_map = dict(json.loads(path.read_text())["weight_map"])
                names = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise WeightFileError(f"{path}: not a readable weight index ({err!r})") from err
            missing = [name for name in names if not (directory / name).is_file()]
            if missing:
                raise WeightFileError(f"{path} names shard(s) missing from {directory}: {_listed(missing)}")
            return [directory / name for name in names], weight_map
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return [directory / name], None
    raise FileNotFoundError(f"{directory} has no weights: expected one of {WEIGHT_INDEXES + WEIGHT_FILES}")


def _safetensors_tensors(path: Path) -> dict[str, LazyTensor]:
    """The tensors of a safetensors file; only its header is read (and checked against the file's size)."""
    try:
        handle = safe_open(str(path), framework="pt")
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise WeightFileError(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}") from err
    return {key: LazyTensor(path, partial(handle.get_tensor, key), shape) for key, shape in shapes.items()}


def _pickled_tensors(path: Path) -> dict[str, LazyTensor]:
    """The tensors of a ``pytorch_model*.bin`` file (memory-mapped, so only what is used is read)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch.load raises zip, pickle, EOF and runtime errors for a broken file
        raise WeightFileError(f"{path}: not a readable PyTorch weight file (truncated or corrupt?): {err}") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightFileError(f"{path}: not a state dict of tensors")
    return {key: LazyTensor(path, partial(state.__getitem__, key), tuple(t.shape)) for key, t in state.items()}


def read_hf_weights(directory: Path) -> LazyStateDict:
    """Lazy state dict of an HF model directory (safetensors or ``pytorch_model*.bin``, sharded or not).

    Raises:
        FileNotFoundError: no weights. WeightFileError: a missing shard, an unreadable index or file, or an index
            that puts a tensor in a shard that lacks it (the file and tensor are named).
    """
    files, weight_map = weight_files(directory)
    lazy: dict[str, LazyTensor] = {}
    for path in files:
        lazy.update(_safetensors_tensors(path) if path.suffix == ".safetensors" else _pickled_tensors(path))
    misplaced = [f"{key} (in {name})" for key, name in (weight_map or {}).items()
                 if key not in lazy or lazy[key].file.name != name]
    if misplaced:
        index = next(directory / i for i in WEIGHT_INDEXES if (directory / i).is_file())
        raise WeightFileError(f"{index} lists tensors its shards do not hold: {_listed(misplaced)}")
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


def _shape_error(lazy: LazyStateDict, name: str, shape: tuple, param: torch.Tensor, origin: str) -> str:
    file = getattr(lazy[name], "file", origin)
    return (f"{file}: shape mismatch for {name}: checkpoint {shape}, model {tuple(param.shape)} (from the config of "
            f"{origin})")


def check_shapes(model: nn.Module, lazy: LazyStateDict, origin: str) -> None:
    """:func:`check_keys`, then every shape a file header records (:class:`LazyTensor`) against the model's.

    Raises:
        CheckpointMismatchError: naming the keys, or the file and tensor whose shape differs.
    """
    check_keys(model, set(lazy), origin)
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in sorted(set(lazy) & set(params)):
        shape = getattr(lazy[name], "shape", None)
        if shape is not None and shape != tuple(params[name].shape):
            raise CheckpointMismatchError(_shape_error(lazy, name, shape, params[name], origin))


@torch.no_grad()
def load_strict(model: nn.Module, lazy: LazyStateDict, origin: str) -> None:
    """Copy every tensor of ``lazy`` into ``model`` (cast to its dtype/device); nothing missing, extra or misshapen.

    A checkpoint of a tied model may carry the tied alias (``lm_head.weight``) as well: it must then equal the
    embedding it aliases, otherwise the checkpoint is not tied and the config is wrong.

    Raises:
        CheckpointMismatchError: naming the missing / unexpected keys or the file and key whose shape differs.
    """
    check_shapes(model, lazy, origin)
    params = dict(model.named_parameters(remove_duplicate=False))
    primary = {name for name, _ in model.named_parameters()}
    for name in sorted(set(lazy) & set(params), key=lambda n: n not in primary):
        tensor, param = lazy[name](), params[name]
        if tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointMismatchError(_shape_error(lazy, name, tuple(tensor.shape), param, origin))
        if name in primary:
            param.copy_(tensor)
        elif not torch.equal(tensor.to(device=param.device, dtype=param.dtype), param):
            raise CheckpointMismatchError(
                f"{origin}: {name} differs from the parameter it is tied to; set tie_word_embeddings false")
