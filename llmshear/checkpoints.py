"""Everything about the Composer checkpoint files of a run folder: names, kinds, cheap validation, reading (the
model state, or the model itself), recovery after a kill, and the lock that keeps two runs out of one folder.

A run folder (``checkpoint.save_folder``) holds one entry per checkpoint: a *full* checkpoint is one file
``ep<E>-ba<N>-rank0.pt`` (a torch zip archive written by rank 0), a *sharded* one (``fsdp.state_dict_type:
sharded``) a directory ``ep<E>-ba<N>/`` with one ``__<rank>_0.distcp`` file per rank and a ``.metadata`` file
(torch.distributed.checkpoint), written last. ``latest-rank0.pt`` is a symbolic link Composer moves to each new
checkpoint once it is written. A kill can leave a partial newest checkpoint (a zip without its directory, a
directory without ``.metadata``) or a link to an older one; :func:`recover` makes such a folder resumable again
without deleting anything. The checkpoint *kind* is ``pruning`` (the model state has the L0 module, ``l0.*``)
or ``continued``.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from composer.callbacks import CheckpointSaver
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from llmshear.files import Lock, LockedError
from llmshear.models.l0 import L0Module, l0_from_state_dict
from llmshear.models.llama import LlamaConfig, LlamaLM
from llmshear.models.prune import model_from_state

log = logging.getLogger(__name__)

LATEST_CHECKPOINT = "latest-rank0.pt"
SET_ASIDE_DIR = "incomplete"
LOCK_FILE = "run.lock"
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


def model_from_checkpoint(path: str | os.PathLike) -> LlamaLM:
    """The :class:`LlamaLM` of a continued-pre-training checkpoint, rebuilt strictly from its stored config.

    Raises:
        ValueError: see :func:`read_model_state`; a checkpoint without the model config; a
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


def load_pruning_checkpoint(path: str | os.PathLike) -> tuple[LlamaLM, L0Module]:
    """The model and L0 module of a Composer checkpoint of a pruning run (full or sharded).

    ``state['model']`` holds ``model.<LlamaLM keys>`` and ``l0.<L0Module keys>``; ``l0._extra_state`` carries
    the source config and the target, so nothing else is needed. The checkpoint is unpickled: load only
    checkpoints your own runs wrote.

    Raises:
        ValueError: see :func:`read_model_state` (missing, truncated, corrupt, not a Composer checkpoint); no L0
            module in it; weights that do not match the stored config.
    """
    state = read_model_state(path)
    l0_state = {k.removeprefix("l0."): v for k, v in state.items() if k.startswith("l0.")}
    if "_extra_state" not in l0_state:
        raise CheckpointError(f"{path} is a continued checkpoint (it has no L0 module, l0._extra_state), not a "
                              "checkpoint of a pruning run: export it with scripts/export_hf.py instead")
    l0 = l0_from_state_dict(l0_state)
    model_state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    return model_from_state(l0.source, model_state), l0


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


def set_aside(path: Path, why: str, into: str = SET_ASIDE_DIR) -> Path:
    """Move ``path`` into ``<its folder>/<into>/`` (a free name), log why, and return where it went."""
    directory = path.parent / into
    directory.mkdir(exist_ok=True)
    target, number = directory / path.name, 0
    while target.exists():
        number += 1
        target = directory / f"{path.name}.{number}"
    path.rename(target)
    log.warning("%s set aside as %s: %s", path, target, why)
    return target


def _point_latest(folder: Path, target: Path | None) -> None:
    """Make ``latest-rank0.pt`` a relative link to ``target`` (replaced atomically), or remove it (None)."""
    latest = folder / LATEST_CHECKPOINT
    if target is None:
        if latest.is_symlink():
            latest.unlink()
        return
    temporary = folder / f".{LATEST_CHECKPOINT}.{os.getpid()}"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(target.name)
    os.replace(temporary, latest)


def recover(folder: str | os.PathLike) -> Path | None:
    """Make a run folder resumable after a kill at any moment, and return the checkpoint to resume from.

    Checkpoints are checked newest first (:func:`checkpoint_problem`, cheap): each incomplete one is moved into
    ``incomplete/`` (never deleted), so Composer neither loads it nor refuses to write its batch again; the
    newest complete one becomes ``latest-rank0.pt`` (a kill between a write and the link update leaves the
    link on the one before). Returns None when no complete checkpoint is left (the run starts afresh).
    """
    folder = Path(folder)
    latest = folder / LATEST_CHECKPOINT
    if latest.exists() and not latest.is_symlink():
        return latest  # not a link Composer wrote (e.g. a downloaded file): left as it is
    newest = None
    for _, path in reversed(checkpoints_in(folder)):
        problem = checkpoint_problem(path)
        if problem is None:
            newest = path
            break
        set_aside(path, problem)
    if newest is None and latest.is_symlink():
        log.warning("%s points to no complete checkpoint: removed (the run starts from batch 0)", latest)
    elif newest is not None and (not latest.is_symlink() or latest.resolve() != newest.resolve()):
        log.warning("%s now points to %s, the newest complete checkpoint", latest, newest.name)
    _point_latest(folder, newest)
    return newest


class KeepAcrossResumes(Callback):
    """Make ``checkpoint.keep`` count the checkpoints written before a resume too.

    Composer's checkpoint saver rotates only the checkpoints its own process wrote; after each resume the older
    ones would stay forever. At ``fit_start`` rank 0 (the rank that deletes) hands the saver the checkpoints
    already in the folder up to the batch the run starts from, oldest first.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def fit_start(self, state: State, logger: Logger) -> None:
        del logger
        saver = next((c for c in state.callbacks if isinstance(c, CheckpointSaver)), None)
        if saver is None or saver.saved_checkpoints or dist.get_global_rank() != 0:
            return
        start = int(state.timestamp.batch)
        # Composer records a sharded checkpoint by this rank's shard file and deletes the directory around it.
        saver.saved_checkpoints = [str(path / "__0_0.distcp") if path.is_dir() else str(path)
                                   for batch, path in checkpoints_in(self.folder) if batch <= start]


class RunLock(Lock):
    """``<save_folder>/run.lock``: one run at a time in a folder (a :class:`~llmshear.files.Lock`: a holder that
    is gone, by pid on this host or as an earlier incarnation of a requeued SLURM job, is taken over)."""

    def __init__(self, folder: str | os.PathLike):
        super().__init__(Path(folder) / LOCK_FILE)

    def acquire(self) -> None:
        """Take the lock (or a stale one).

        Raises:
            CheckpointError: another live run holds it; the message names the lock file and its holder.
        """
        try:
            super().acquire()
        except LockedError as err:
            raise CheckpointError(
                f"{self.path.parent} is in use by another run ({err}); wait for it to end or choose another "
                f"checkpoint.save_folder. If that process is gone, delete {self.path}") from None


def open_run_folder(folder: str | os.PathLike, autoresume: bool, max_batches: int,
                    prepare: Callable[[], object] | None = None) -> tuple[RunLock, int | None]:
    """Rank 0 takes the folder's lock, runs ``prepare`` (e.g. the download of a remote run) and, with autoresume,
    :func:`recover`; every rank gets the outcome (the other ranks wait for rank 0 here).

    Call it on every rank, after the process group is initialised and before the Trainer is built.

    Returns:
        The lock (held by rank 0: release it at the end), and the batch of the latest checkpoint when that
        already reached ``max_batches`` (the run is complete), else None.

    Raises:
        CheckpointError: on every rank, when the folder is locked by a live run or cannot be recovered, or
            ``prepare`` raised one (or an OSError).
    """
    lock = RunLock(folder)
    outcome: list = [None, None]
    if dist.get_global_rank() == 0:
        try:
            lock.acquire()
            if prepare is not None:
                prepare()
            newest = recover(folder) if autoresume else None
            batch = checkpoint_batch(newest.resolve()) if newest is not None else None
            outcome[1] = batch if batch is not None and batch >= max_batches else None
        except (CheckpointError, OSError) as err:
            outcome[0] = str(err)
            lock.release()
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise CheckpointError(outcome[0])
    return lock, outcome[1]
