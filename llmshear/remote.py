"""A mirror of a local run folder in an object store (``checkpoint.remote: s3://bucket/prefix``), and the way back.

The run folder stays local: the run lock, the recovery after a kill, ``metrics.jsonl``, ``masks/`` and
``proportions.json`` keep the guarantees of local files. Rank 0 copies the folder to the store, synchronously and
in this process: after each checkpoint and at the end, every file that is new or changed (size, modification
time) since its last upload, except ``run.lock``, ``incomplete/``, symbolic links (``latest-rank0.pt``), hidden
files and ``*.tmp``. Only complete checkpoints are uploaded, each before the marker object ``<prefix>/latest``
(its text: the newest checkpoint's name) moves to it, so the marker never names a checkpoint that is not fully
there. Nothing remote is ever deleted. What was uploaded is recorded in ``<folder>/.remote.json``.

At a resume on a machine without the folder, :func:`fetch_run` downloads the checkpoint the marker names (or the
highest-batch one) and every other non-checkpoint file, so the local autoresume continues exactly.

The store is Composer's (:func:`composer.utils.maybe_create_object_store_from_uri`); boto3 reads the
credentials (``AWS_*`` variables, ``~/.aws``) and Composer an S3-compatible endpoint from ``S3_ENDPOINT_URL``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError
from composer.utils import maybe_create_object_store_from_uri, parse_uri

from llmshear.checkpoints import (
    CheckpointError,
    checkpoint_batch,
    checkpoint_problem,
    checkpoints_in,
)
from llmshear.files import replace_json
from llmshear.loggers import METRICS_FILE
from llmshear.run_folder import LOCK_FILE, SET_ASIDE_DIR, set_aside

log = logging.getLogger(__name__)

SCHEMES = ("s3",)
MARKER = "latest"
STATE_FILE = ".remote.json"
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

    def newest_checkpoint(self, names: list[str]) -> str | None:
        """The checkpoint the marker names, else the highest-batch ``ep*-ba*-rank0.pt``; None when there is none."""
        checkpoints = checkpoint_names(names)
        if MARKER in names:
            with tempfile.TemporaryDirectory() as scratch:
                self.download(MARKER, Path(scratch) / MARKER)
                named = (Path(scratch) / MARKER).read_text(encoding="utf-8").strip()
            if named in names:
                return named
            log.warning("%s/%s names %r, which is not there: taking the highest-batch checkpoint", self.uri, MARKER,
                        named)
        return checkpoints[-1] if checkpoints else None


def uri_problem(uri: str) -> str | None:
    """Why ``uri`` is no usable object-store location (scheme, bucket), without contacting the store; or None."""
    scheme, bucket, _ = parse_uri(uri)
    if scheme not in SCHEMES:
        return f"must be s3://bucket/prefix (supported schemes: {', '.join(SCHEMES)}; got {scheme or 'a local path'!r})"
    if not bucket:
        return "names no bucket (s3://bucket/prefix)"
    return None


def checkpoint_names(names) -> list[str]:
    """The checkpoint files (``ep<E>-ba<N>-rank0.pt``) among the run-folder-relative ``names``, oldest first."""
    found = [(checkpoint_batch(name), name) for name in names if "/" not in name]
    return [name for _, name in sorted((batch, name) for batch, name in found if batch is not None)]


def remote_checkpoints(uri: str) -> list[str]:
    """The checkpoints under ``uri`` (one listing: this is how a config check finds the store reachable).

    Raises:
        RemoteError: see :class:`Remote`; the bucket cannot be listed (missing, no credentials, unreachable).
    """
    return checkpoint_names(Remote(uri).names())


def _mirrored(path: Path, folder: Path) -> bool:
    """Whether ``path`` (a file in ``folder``) belongs in the mirror."""
    parts = path.relative_to(folder).parts
    return not (path.is_symlink() or parts[0] == LOCK_FILE or SET_ASIDE_DIR in parts or path.suffix == ".tmp"
                or any(part.startswith(".") for part in parts))


class Mirror:
    """What of ``folder`` has been uploaded to ``remote`` (persisted in ``folder/.remote.json``), and the upload."""

    def __init__(self, folder: str | os.PathLike, remote: Remote):
        self.folder, self.remote = Path(folder), remote
        self.state_path = self.folder / STATE_FILE
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            state = {}
        same = isinstance(state, dict) and state.get("remote") == remote.uri
        self.uploaded: dict[str, list[int]] = state.get("uploaded", {}) if same else {}
        self.marker: str | None = state.get("marker") if same else None

    def record(self, name: str) -> None:
        """Note the local file ``name`` as identical to its remote copy."""
        stat = (self.folder / name).stat()
        self.uploaded[name] = [stat.st_size, stat.st_mtime_ns]

    def save(self) -> None:
        replace_json(self.state_path, {"remote": self.remote.uri, "marker": self.marker, "uploaded": self.uploaded})

    def pending(self) -> list[str]:
        """Files new or changed since their upload: complete checkpoints (oldest first), then the rest."""
        found = []
        for path in sorted(self.folder.rglob("*")):
            if not path.is_file() or not _mirrored(path, self.folder):
                continue
            name, stat = path.relative_to(self.folder).as_posix(), path.stat()
            if self.uploaded.get(name) == [stat.st_size, stat.st_mtime_ns]:
                continue
            batch = checkpoint_batch(name) if "/" not in name else None
            if batch is not None and checkpoint_problem(path) is not None:
                continue  # being written, or left partial by a kill (recovery sets it aside): never uploaded
            found.append((batch is None, batch or 0, name))
        return [name for _, _, name in sorted(found)]

    def sync(self) -> None:
        """Upload what :meth:`pending` lists, then point the marker at the newest checkpoint uploaded.

        Raises:
            RemoteError: an upload failed (what went before it is recorded; the next sync retries the rest).
        """
        pending = self.pending()
        try:
            for name in pending:
                self.remote.upload(self.folder / name, name)
                self.record(name)
            uploaded = checkpoint_names(self.uploaded)
            newest = uploaded[-1] if uploaded else None
            if newest is not None and newest != self.marker:
                marker = self.folder / f".{MARKER}.{os.getpid()}"
                marker.write_text(newest + "\n", encoding="utf-8")
                try:
                    self.remote.upload(marker, MARKER)
                finally:
                    marker.unlink()
                self.marker = newest
        finally:
            self.save()
        if pending:
            log.info("mirrored %d file(s) of %s to %s (latest: %s)", len(pending), self.folder, self.remote.uri,
                     self.marker)


def mirror_run(folder: str | os.PathLike, uri: str) -> None:
    """Upload what ``folder`` holds that ``uri`` does not (see :class:`Mirror`). Raises :class:`RemoteError`."""
    Mirror(folder, Remote(uri)).sync()


def fetch_run(uri: str, folder: str | os.PathLike) -> Path | None:
    """Download the run at ``uri`` into ``folder`` when the folder holds no complete checkpoint.

    Downloads every object except the marker and the other checkpoints, then the newest checkpoint (last, so
    that a complete local checkpoint means the rest is there); a local file the download replaces is first set
    aside into ``incomplete/``. :func:`llmshear.run_folder.recover` then points ``latest-rank0.pt`` at it.

    Returns:
        The downloaded checkpoint, or None (the folder has a complete checkpoint, or the remote none).

    Raises:
        RemoteError: see :class:`Remote`; a transfer failed.
    """
    folder = Path(folder)
    if any(checkpoint_problem(path) is None for _, path in checkpoints_in(folder)):
        return None
    remote = Remote(uri)
    names = remote.names()
    newest = remote.newest_checkpoint(names)
    if newest is None:
        return None
    mirror = Mirror(folder, remote)
    skipped = {MARKER, *checkpoint_names(names)}
    others = [name for name in names if name not in skipped]
    for name in [*others, newest]:
        path = folder / name
        if path.exists() or path.is_symlink():
            set_aside(path, f"replaced by its copy in {uri}")
        path.parent.mkdir(parents=True, exist_ok=True)
        remote.download(name, path)
        mirror.record(name)
    mirror.marker = newest
    mirror.save()
    log.info("downloaded %s/%s and %d other file(s) into %s to resume from", uri, newest, len(others), folder)
    return folder / newest


@contextmanager
def local_checkpoint(checkpoint: str | os.PathLike, key: str = "--checkpoint") -> Iterator[Path]:
    """A checkpoint as a local path: a local one as it is; ``s3://bucket/prefix/ep0-ba6-rank0.pt`` (or
    ``s3://bucket/prefix``, meaning its newest checkpoint) downloaded with the run's ``metrics.jsonl`` into a
    temporary directory (``TMPDIR``), removed afterwards.

    Raises:
        RemoteError: see :class:`Remote`; no such checkpoint; a transfer failed.
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
            raise RemoteError(f"{key}={uri!r}: no checkpoint (ep<E>-ba<N>-rank0.pt) under it")
    if name not in names:
        raise RemoteError(f"{key}={str(checkpoint)!r}: no such object ({remote.object_name(name)} in bucket "
                          f"{remote.bucket!r})")
    scratch = Path(tempfile.mkdtemp(prefix="llmshear-checkpoint-"))
    try:
        for wanted in (METRICS_FILE, name):
            if wanted in names:
                remote.download(wanted, scratch / wanted)
        yield scratch / name
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
