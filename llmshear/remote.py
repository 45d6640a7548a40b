"""An object store under ``s3://bucket/prefix`` holding a run folder's files (``checkpoint.remote``,
``export_hf.py --checkpoint s3://...``): listing, transfers, which checkpoints are complete there, and a remote
checkpoint as a local path. Keeping the mirror up to date and fetching a run back: :mod:`llmshear.mirror`.

A full checkpoint is one object ``ep<E>-ba<N>-rank0.pt``; a sharded one the objects ``ep<E>-ba<N>/.metadata`` and
``ep<E>-ba<N>/__<R>_<i>.distcp``, complete when every shard its ``.metadata`` lists is there (:meth:`Remote.missing`).
The marker object ``<prefix>/latest`` holds the name of the newest complete checkpoint.

The store is Composer's (:func:`composer.utils.maybe_create_object_store_from_uri`); boto3 reads the
credentials (``AWS_*`` variables, ``~/.aws``) and Composer an S3-compatible endpoint from ``S3_ENDPOINT_URL``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError
from composer.utils import maybe_create_object_store_from_uri, parse_uri
from torch.distributed.checkpoint import FileSystemReader

from llmshear.checkpoints import (
    METADATA_FILE,
    CheckpointError,
    checkpoint_batch,
)
from llmshear.loggers import METRICS_FILE

log = logging.getLogger(__name__)

SCHEMES = ("s3",)
MARKER = "latest"
_SHARD = re.compile(r"__(\d+)_\d+\.distcp")
_STORE_ERRORS = (BotoCoreError, ClientError, OSError)


class RemoteError(CheckpointError):
    """An object store that cannot be used or a transfer that failed; the message names the key."""


class Remote:
    """The objects under ``uri`` (``s3://bucket/prefix``), named by their path relative to the prefix.

    Args:
        uri: the location.
        key: what the user set it with (``checkpoint.remote``, ``--checkpoint``), for error messages.

    Raises:
        RemoteError: a scheme other than ``s3``, no bucket, or a store Composer cannot create.
    """

    def __init__(self, uri: str, key: str = "checkpoint.remote"):
        self.uri, self.key = uri.rstrip("/"), key
        problem = uri_problem(uri)
        if problem:
            raise RemoteError(f"{key}={uri!r}: {problem}")
        _, self.bucket, prefix = parse_uri(self.uri)
        self.prefix = prefix.strip("/")
        try:
            self.store = maybe_create_object_store_from_uri(self.uri)
        except (ImportError, ValueError, *_STORE_ERRORS) as err:
            raise RemoteError(f"{key}={uri!r}: cannot open the object store: {err}") from err

    def object_name(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _failed(self, action: str, err: Exception) -> RemoteError:
        return RemoteError(f"{self.key}={self.uri!r}: {action} failed: {type(err).__name__}: {err} (credentials: "
                           f"AWS_* variables or ~/.aws; endpoint: S3_ENDPOINT_URL)")

    def names(self) -> list[str]:
        """Every object under the prefix, relative to it."""
        start = self.object_name("")
        try:
            keys = self.store.list_objects(start)
        except _STORE_ERRORS as err:
            raise self._failed(f"listing bucket {self.bucket!r}", err) from err
        return sorted(key.removeprefix(start) for key in keys)

    def upload(self, path: Path, name: str) -> None:
        try:
            self.store.upload_object(self.object_name(name), str(path))
        except _STORE_ERRORS as err:
            raise self._failed(f"uploading {path}", err) from err

    def download(self, name: str, path: Path) -> None:
        """``name`` to ``path`` (written under a temporary name, then renamed into place)."""
        try:
            self.store.download_object(self.object_name(name), str(path), overwrite=True)
        except _STORE_ERRORS as err:
            raise self._failed(f"downloading {self.object_name(name)}", err) from err

    def read_marker(self, names: list[str]) -> str | None:
        """The checkpoint name the marker holds, or None without a marker."""
        if MARKER not in names:
            return None
        with tempfile.TemporaryDirectory() as scratch:
            self.download(MARKER, Path(scratch) / MARKER)
            return (Path(scratch) / MARKER).read_text(encoding="utf-8").strip()

    def missing(self, checkpoint: str, names: list[str], shards: list[str] | None = None) -> list[str]:
        """The files of ``checkpoint`` not in the store (``names``, a listing): for a sharded checkpoint its
        ``.metadata`` and every shard file that lists (``shards``, when known, else read from the stored
        ``.metadata``); for a full one the file itself."""
        if checkpoint.endswith(".pt"):
            return [] if checkpoint in names else [checkpoint]
        if f"{checkpoint}/{METADATA_FILE}" not in names:
            return [f"{checkpoint}/{METADATA_FILE}"]
        if shards is None:
            with tempfile.TemporaryDirectory() as scratch:
                self.download(f"{checkpoint}/{METADATA_FILE}", Path(scratch) / METADATA_FILE)
                try:
                    shards = shard_files(Path(scratch))
                except CheckpointError as err:
                    raise RemoteError(f"{self.key}={self.uri!r}: {checkpoint}/{err}") from err
        return [f"{checkpoint}/{shard}" for shard in shards if f"{checkpoint}/{shard}" not in names]

    def newest_checkpoint(self, names: list[str]) -> str | None:
        """The checkpoint the marker names, else the newest complete one (see :meth:`missing`); None when there
        is none."""
        named = self.read_marker(names)
        checkpoints = checkpoint_names(names)
        if named is not None:
            if named in checkpoints and not self.missing(named, names):
                return named
            log.warning("%s/%s names %r, which is not complete there: taking the newest complete checkpoint",
                        self.uri, MARKER, named)
        return next((name for name in reversed(checkpoints) if not self.missing(name, names)), None)


def shard_files(directory: Path) -> list[str]:
    """The shard files the ``.metadata`` in ``directory`` lists (relative to it).

    Raises:
        CheckpointError: the ``.metadata`` cannot be read.
    """
    try:
        storage = FileSystemReader(str(directory)).read_metadata().storage_data.values()
    except Exception as err:  # unpickling a damaged file raises anything
        raise CheckpointError(f"{METADATA_FILE} is unreadable ({err})") from err
    return sorted({item.relative_path for item in storage})


def uri_problem(uri: str) -> str | None:
    """Why ``uri`` is no usable object-store location (scheme, bucket), without contacting the store; or None."""
    scheme, bucket, _ = parse_uri(uri)
    if scheme not in SCHEMES:
        return f"must be s3://bucket/prefix (supported schemes: {', '.join(SCHEMES)}; got {scheme or 'a local path'!r})"
    if not bucket:
        return "names no bucket (s3://bucket/prefix)"
    return None


def checkpoint_of(name: str) -> str | None:
    """The checkpoint a run-folder-relative name belongs to (``ep0-ba4-rank0.pt``, or ``ep0-ba4`` for a file of
    a sharded checkpoint), or None for another file."""
    top, _, rest = name.partition("/")
    if checkpoint_batch(top) is None or (rest and "/" in rest) or (not rest and not top.endswith(".pt")):
        return None
    return top


def checkpoint_names(names) -> list[str]:
    """The checkpoints (``ep<E>-ba<N>-rank0.pt`` files, ``ep<E>-ba<N>`` sharded directories) that the
    run-folder-relative ``names`` belong to, oldest first."""
    found = {checkpoint_of(name) for name in names} - {None}
    return sorted(found, key=lambda name: (checkpoint_batch(name), name))


def uploader_rank(name: str, world_size: int) -> int:
    """The rank that uploads and downloads ``name``: a shard file ``ep<E>-ba<N>/__<R>_<i>.distcp`` goes with rank
    ``R`` modulo the world size (the rank that wrote it, at the same world size), every other file with rank 0."""
    checkpoint = checkpoint_of(name)
    shard = _SHARD.fullmatch(name.partition("/")[2]) if checkpoint is not None else None
    return int(shard.group(1)) % world_size if shard else 0


def remote_checkpoints(uri: str) -> list[str]:
    """The checkpoints under ``uri`` (one listing: this is how a config check finds the store reachable).

    Raises:
        RemoteError: see :class:`Remote`; the bucket cannot be listed (missing, no credentials, unreachable).
    """
    return checkpoint_names(Remote(uri).names())

@contextmanager
def local_checkpoint(checkpoint: str | os.PathLike, key: str = "--checkpoint") -> Iterator[Path]:
    """A checkpoint as a local path: a local one as it is; ``s3://bucket/prefix/ep0-ba6-rank0.pt`` (or a sharded
    ``s3://bucket/prefix/ep0-ba6``, or ``s3://bucket/prefix``, meaning its newest complete checkpoint) downloaded
    with the run's ``metrics.jsonl`` into a temporary directory (``TMPDIR``), removed afterwards.

    Raises:
        RemoteError: see :class:`Remote`; no such checkpoint, or not complete; a transfer failed.
    """
    if "://" not in str(checkpoint):
        yield Path(checkpoint)
        return
    uri = str(checkpoint).rstrip("/")
    parent, name = uri.rsplit("/", 1)
    remote = Remote(uri if checkpoint_batch(name) is None else parent, key)
    names = remote.names()
    if remote.uri == uri:
        name = remote.newest_checkpoint(names)
        if name is None:
            raise RemoteError(f"{key}={uri!r}: no complete checkpoint (ep<E>-ba<N>-rank0.pt or ep<E>-ba<N>/) under "
                              f"it")
    if name not in checkpoint_names(names):
        raise RemoteError(f"{key}={str(checkpoint)!r}: no such object ({remote.object_name(name)} in bucket "
                          f"{remote.bucket!r})")
    missing = remote.missing(name, names)
    if missing:
        raise RemoteError(f"{key}={str(checkpoint)!r}: an incomplete checkpoint ({missing[0]} is not in the "
                          f"store)")
    scratch = Path(tempfile.mkdtemp(prefix="llmshear-checkpoint-"))
    try:
        for wanted in names:
            if wanted == METRICS_FILE or checkpoint_of(wanted) == name:
                (scratch / wanted).parent.mkdir(parents=True, exist_ok=True)
                remote.download(wanted, scratch / wanted)
        yield scratch / name
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
