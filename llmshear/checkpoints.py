"""The Composer checkpoint files of a run folder: names, kinds, cheap validation and reading (the model state,
the metadata a resume needs). The care of the folder itself (recovery after a kill, the lock) is in
:mod:`llmshear.run_folder`; reading a model out of a checkpoint in :mod:`llmshear.tools.export`.

A run folder (``checkpoint.save_folder``) holds one entry per checkpoint: a *full* checkpoint is one file
``ep<E>-ba<N>-rank0.pt`` (a torch zip archive written by rank 0), a *sharded* one (``fsdp.state_dict_type:
sharded``) a directory ``ep<E>-ba<N>/`` with one ``__<rank>_0.distcp`` file per rank and a ``.metadata`` file
(torch.distributed.checkpoint), written last. ``latest-rank0.pt`` is a symbolic link Composer moves to each new
checkpoint once it is written. A kill can leave a partial newest checkpoint (a zip without its directory, a
directory without ``.metadata``) or a link to an older one; :func:`llmshear.run_folder.recover` makes such a
folder resumable again without deleting anything. The checkpoint *kind* is ``pruning`` (the model state has the
L0 module, ``l0.*``) or ``continued``.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

LATEST_CHECKPOINT = "latest-rank0.pt"
KINDS = ("pruning", "continued")
METADATA_FILE = ".metadata"
_NAME = re.compile(r"ep(\d+)-ba(\d+)(-rank0\.pt)?")


class CheckpointError(ValueError):
    """A checkpoint file or run folder that cannot be used as it is; the message names the file."""


def checkpoint_batch(path: str | os.PathLike) -> int | None:
    """The batch in a checkpoint's name (``ep0-ba400-rank0.pt`` or ``ep0-ba400/`` → 400), or None for another."""
    match = _NAME.fullmatch(Path(path).name)
    return int(match.group(2)) if match else None


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be a complete checkpoint (missing, a directory, truncated, corrupt), or None.

    Cheap whatever the size: it reads the zip directory at the end of the file and checks that every member it
    lists lies inside the file. No checksum is computed (that would read the whole file): a kill during a write
    leaves no directory, which is what this detects.
    """
    path = Path(path)
    if not path.exists():
        return f"{path} does not exist"
    if path.is_dir():
        return sharded_problem(path)
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (OSError, zipfile.BadZipFile) as err:
        return f"{path} is truncated or corrupt ({size} bytes, no readable zip directory: {err})"
    outside = [m.filename for m in members if m.header_offset + m.compress_size > size]
    if outside:
        return f"{path} is truncated or corrupt (member {outside[0]} ends past the file's {size} bytes)"
    if not any(m.filename.endswith("data.pkl") for m in members):
        return f"{path} is not a torch checkpoint (no data.pkl in its zip directory)"
    return None


def sharded_problem(path: Path) -> str | None:
    """Why the directory ``path`` is no complete sharded checkpoint, or None: ``.metadata`` (written last) must
    be readable and every shard file it lists must hold the bytes it points to."""
    if not (path / METADATA_FILE).is_file():
        return f"{path} is an incomplete sharded checkpoint (no {METADATA_FILE}: its write did not finish)"
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # unpickling a damaged file raises anything
        return f"{path / METADATA_FILE} is unreadable ({err})"
    sizes: dict[str, int] = {}
    for item in metadata.storage_data.values():
        shard = path / item.relative_path
        if item.relative_path not in sizes:
            sizes[item.relative_path] = shard.stat().st_size if shard.is_file() else -1
        if sizes[item.relative_path] < 0:
            return f"{path} is an incomplete sharded checkpoint ({item.relative_path} is missing)"
        if item.offset + item.length > sizes[item.relative_path]:
            return f"{path} is an incomplete sharded checkpoint ({item.relative_path} is truncated)"
    return None


def _load_sharded(path: Path, keys: set[str] | None) -> dict:
    """The (full, unsharded) entries ``keys`` (dotted prefixes; None: all) of a sharded checkpoint, in one process."""
    content: dict = {}
    _load_state_dict(content, storage_reader=FileSystemReader(str(path)), planner=_EmptyStateDictLoadPlanner(keys),
                     no_dist=True)
    return content


def load_checkpoint(path: str | os.PathLike, keys: set[str] | None = None) -> dict:
    """A Composer checkpoint, full (a file; its tensors memory-mapped, read from disk only when used) or sharded
    (a directory; only the entries under the dotted prefixes ``keys`` are read, e.g. ``{"state.model"}``).

    The checkpoint is unpickled: read only checkpoints your own runs wrote.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: a directory, truncated, corrupt, or not a Composer checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    problem = checkpoint_problem(path)
    if problem:
        raise CheckpointError(problem)
    try:
        if path.is_dir():
            return _checked(_load_sharded(path, keys), path)
        # Composer checkpoints pickle more than tensors (timestamps, RNG states): weights_only cannot read them.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # torch.load raises pickle, zip, EOF and runtime errors for broken files
        raise CheckpointError(f"{path} cannot be read (truncated or corrupt checkpoint?): {err}") from err
    return _checked(checkpoint, path)


def _checked(checkpoint, path: Path) -> dict:
    state = checkpoint.get("state") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{path} is not a Composer checkpoint: it has no state['model']")
    return checkpoint


def model_state(checkpoint: dict) -> dict:
    """``state['model']`` of a loaded checkpoint, without the DDP ``module.`` prefix."""
    return {key.removeprefix("module."): value for key, value in checkpoint["state"]["model"].items()}


def read_model_state(path: str | os.PathLike) -> dict:
    """``state['model']`` of the checkpoint at ``path``, full or sharded (see :func:`load_checkpoint`)."""
    return model_state(load_checkpoint(path, keys={"state.model"}))


def kind_of(state: dict) -> str:
    """``pruning`` when the model state holds an L0 module, else ``continued``."""
    return "pruning" if any(key.startswith("l0.") for key in state) else "continued"


@dataclass
class CheckpointInfo:
    """What a run needs to know about a checkpoint before resuming from it."""

    path: Path
    kind: str
    batch: int
    data: dict = field(default_factory=dict)  # the train dataset's state (domains, seed, global_batch_size, ...)
    tokens: int = 0
    source: str | None = None  # the run's model.pretrained (ComposerLlama's extra state; None in older ones)


def describe(path: str | os.PathLike) -> CheckpointInfo:
    """Kind, batch, tokens, source and train-data state of a checkpoint, without reading its tensors (a full
    checkpoint is memory-mapped and its tensors left untouched; of a sharded one only the metadata and small
    entries are read).

    Raises:
        CheckpointError: see :func:`load_checkpoint`.
    """
    path = Path(path)
    checkpoint = load_checkpoint(path, keys={"state.model._extra_state", "state.dataset_state", "state.timestamp"})
    state = checkpoint["state"]
    if path.is_dir():
        names = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        kind = kind_of({name.removeprefix("state.model.") for name in names if name.startswith("state.model.")})
    else:
        kind = kind_of(model_state(checkpoint))
    timestamp = state.get("timestamp") or {}
    timestamp = timestamp.get("Timestamp", timestamp) if isinstance(timestamp, dict) else {}
    batch = timestamp.get("batch", checkpoint_batch(path) or 0)
    tokens = timestamp.get("token", 0)
    data = (state.get("dataset_state") or {}).get("train") or {}
    extra = model_state(checkpoint).get("_extra_state")
    source = extra.get("source") if isinstance(extra, dict) else None
    return CheckpointInfo(path, kind, int(getattr(batch, "value", batch)), data if isinstance(data, dict) else {},
                          int(getattr(tokens, "value", tokens)), source)


def checkpoints_in(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(batch, path)`` of every checkpoint (file or directory) in ``folder``, not the latest link; oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(checkpoint_batch(p), p) for p in folder.iterdir() if not p.is_symlink()]
    return sorted((batch, path) for batch, path in found if batch is not None)
