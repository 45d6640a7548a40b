"""A mirror of a local run folder in an object store (``checkpoint.remote: s3://bucket/prefix``), and the way back.

The run folder stays local: the run lock, the recovery after a kill, ``metrics.jsonl``, ``masks/`` and
``proportions.json`` keep the guarantees of local files. Every rank uploads its part of the folder: the shard
files of a sharded checkpoint (``ep<E>-ba<N>/__<R>_<i>.distcp``) go with the rank that wrote them, everything else
(full checkpoints, ``.metadata``, ``metrics.jsonl``, ``masks/``, ...) with rank 0 (:func:`uploader_rank`). What is
uploaded: every file new or changed (size, modification time) since its last upload, except ``run.lock``,
``incomplete/``, symbolic links (``latest-rank0.pt``), hidden files other than a checkpoint's ``.metadata``, and
``*.tmp``; only complete checkpoints. Nothing remote is ever deleted. What a rank uploaded is recorded in
``<folder>/.remote.json`` (rank 0) or ``.remote-rank<R>.json``.

During a run the uploads go in the background (:class:`Mirror`'s :meth:`~Mirror.stage` and
:meth:`~Mirror.upload`, driven by :class:`llmshear.callbacks.run_folder.MirrorRunFolder`): a checkpoint's files are
hard-linked into a hidden staging folder, so a rotation (``checkpoint.keep``) cannot delete them under the upload.
The marker object ``<prefix>/latest`` (its text: a checkpoint's name) moves, by rank 0, only to a checkpoint that
is complete in the store (:meth:`Mirror.newest_complete`: for a sharded one, its ``.metadata`` and every shard
that lists), so it never names a checkpoint that is not fully there.

At a resume on a machine without the folder, :func:`plan_fetch` (rank 0) picks the checkpoint the marker names (or
the newest complete one) and :func:`fetch_part` downloads, on every rank, the files that rank uploads: the shards
in parallel, the other files on rank 0.

The store is Composer's (:func:`composer.utils.maybe_create_object_store_from_uri`); boto3 reads the
credentials (``AWS_*`` variables, ``~/.aws``) and Composer an S3-compatible endpoint from ``S3_ENDPOINT_URL``.
"""

from __future__ import annotations

import json
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
    checkpoint_problem,
    checkpoints_in,
)
from llmshear.files import replace_json
from llmshear.loggers import METRICS_FILE
from llmshear.run_folder import LOCK_FILE, SET_ASIDE_DIR, set_aside

log = logging.getLogger(__name__)

SCHEMES = ("s3",)
MARKER = "latest"
STAGING_PREFIX = ".uploading-rank"
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


def _mirrored(path: Path, folder: Path) -> bool:
    """Whether ``path`` (a file in ``folder``) belongs in the mirror."""
    parts = path.relative_to(folder).parts
    hidden = any(part.startswith(".") for part in parts)
    metadata = len(parts) == 2 and parts[1] == METADATA_FILE and checkpoint_batch(parts[0]) is not None
    return not (path.is_symlink() or parts[0] == LOCK_FILE or SET_ASIDE_DIR in parts or path.suffix == ".tmp"
                or (hidden and not metadata))


class Mirror:
    """What of ``folder`` this rank uploads to ``remote`` and has uploaded (persisted in ``folder/.remote.json``,
    ``.remote-rank<R>.json`` on rank ``R`` > 0), and the uploads.

    Two ways to upload: :meth:`sync` in the calling thread, from the files themselves; or :meth:`stage` (in the
    training thread: hard links to the checkpoint files, copies of the others, in ``.uploading-rank<R>/``) then
    :meth:`upload` (in a background thread, from the staged files, which it removes).
    """

    def __init__(self, folder: str | os.PathLike, remote: Remote, rank: int = 0, world_size: int = 1):
        self.folder, self.remote, self.rank, self.world_size = Path(folder), remote, rank, world_size
        self.state_path = self.folder / (".remote.json" if rank == 0 else f".remote-rank{rank}.json")
        self.staging = self.folder / f"{STAGING_PREFIX}{rank}"
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            state = {}
        same = isinstance(state, dict) and state.get("remote") == remote.uri
        self.uploaded: dict[str, list[int]] = state.get("uploaded", {}) if same else {}
        self.marker: str | None = state.get("marker") if same else None
        self.shards: dict[str, list[str]] = state.get("shards", {}) if same else {}  # sharded checkpoint -> files

    def record(self, name: str, stat: list[int] | None = None) -> None:
        """Note the local file ``name`` (as it was at ``stat``, else as it is now) as identical to its remote copy."""
        if stat is None:
            now = (self.folder / name).stat()
            stat = [now.st_size, now.st_mtime_ns]
        self.uploaded[name] = stat

    def save(self) -> None:
        replace_json(self.state_path, {"remote": self.remote.uri, "marker": self.marker, "uploaded": self.uploaded,
                                       "shards": self.shards})

    def pending(self) -> list[str]:
        """This rank's files new or changed since their upload: complete checkpoints' (oldest first, a sharded
        one's ``.metadata`` after its shards), then the rest."""
        found = []
        for path in sorted(self.folder.rglob("*")):
            if not path.is_file() or not _mirrored(path, self.folder):
                continue
            name, stat = path.relative_to(self.folder).as_posix(), path.stat()
            if uploader_rank(name, self.world_size) != self.rank or \
                    self.uploaded.get(name) == [stat.st_size, stat.st_mtime_ns]:
                continue
            checkpoint = checkpoint_of(name)
            if checkpoint is not None and checkpoint_problem(self.folder / checkpoint) is not None:
                continue  # being written, or left partial by a kill (recovery sets it aside): never uploaded
            batch = checkpoint_batch(checkpoint) if checkpoint is not None else 0
            found.append((checkpoint is None, batch, name.endswith(METADATA_FILE), name))
        return [name for *_, name in sorted(found)]

    def sync(self) -> None:
        """Upload what :meth:`pending` lists, from the files themselves; on rank 0 then move the marker.

        Raises:
            RemoteError: an upload failed (what went before it is recorded; the next sync retries the rest).
        """
        self.upload([(name, self.folder / name, None) for name in self.pending()])

    def stage(self) -> list[tuple[str, Path, list[int]]]:
        """What :meth:`pending` lists, fixed for a background upload: each checkpoint file hard-linked (no copy;
        a rotation that deletes the checkpoint leaves the link) and each other file copied into the staging folder.

        Returns:
            ``(name, staged path, stat when staged)`` for :meth:`upload`.

        Raises:
            OSError: the folder's file system refuses hard links (or the copy failed); nothing stays staged.
        """
        shutil.rmtree(self.staging, ignore_errors=True)
        staged = []
        try:
            for name in self.pending():
                source, path = self.folder / name, self.staging / name
                path.parent.mkdir(parents=True, exist_ok=True)
                stat = source.stat()
                if checkpoint_of(name) is not None:
                    os.link(source, path)
                else:
                    shutil.copyfile(source, path)
                staged.append((name, path, [stat.st_size, stat.st_mtime_ns]))
        except OSError:
            shutil.rmtree(self.staging, ignore_errors=True)
            raise
        return staged

    def upload(self, files: list[tuple[str, Path, list[int] | None]]) -> None:
        """Upload ``files`` (``(name, path, stat)``: from :meth:`stage`, or ``stat`` None for a file uploaded as
        it is), record each, then, on rank 0, move the marker to :meth:`newest_complete`. Staged files are
        removed, uploaded or not.

        Raises:
            RemoteError: an upload failed (what went before it is recorded; the next sync retries the rest).
        """
        try:
            for name, path, stat in files:
                checkpoint = checkpoint_of(name)
                if checkpoint is not None and name.endswith(f"/{METADATA_FILE}"):
                    self.shards[checkpoint] = shard_files(path.parent)
                self.remote.upload(path, name)
                self.record(name, stat)
            if self.rank == 0:
                self.move_marker()
        finally:
            self.save()
            shutil.rmtree(self.staging, ignore_errors=True)
        if files:
            log.info("mirrored %d file(s) of %s to %s (latest: %s)", len(files), self.folder, self.remote.uri,
                     self.marker)

    def newest_complete(self) -> str | None:
        """The newest checkpoint this rank uploaded a file of that is complete in the store (other ranks upload
        the other shards of a sharded one: one listing, nothing downloaded), or the marker's when none newer is."""
        listing = None
        for checkpoint in reversed(checkpoint_names(self.uploaded)):
            if checkpoint == self.marker:
                break
            if checkpoint.endswith(".pt"):
                return checkpoint
            if checkpoint not in self.shards:
                continue
            listing = listing if listing is not None else self.remote.names()
            if not self.remote.missing(checkpoint, listing, self.shards[checkpoint]):
                return checkpoint
        return self.marker

    def move_marker(self) -> None:
        """Point the marker at :meth:`newest_complete` when that moved (rank 0)."""
        newest = self.newest_complete()
        if newest is None or newest == self.marker:
            return
        marker = self.folder / f".{MARKER}.{os.getpid()}"
        marker.write_text(newest + "\n", encoding="utf-8")
        try:
            self.remote.upload(marker, MARKER)
        finally:
            marker.unlink()
        self.marker = newest


def plan_fetch(uri: str, folder: str | os.PathLike) -> str | None:
    """Which checkpoint of ``uri`` to download into ``folder`` (rank 0, the folder locked): the marker's or the
    newest complete one, when the folder holds no complete checkpoint; else None. A local entry of that name (a
    checkpoint left partial) is set aside into ``incomplete/`` first.

    Raises:
        RemoteError: see :class:`Remote`.
    """
    folder = Path(folder)
    if any(checkpoint_problem(path) is None for _, path in checkpoints_in(folder)):
        return None
    remote = Remote(uri)
    newest = remote.newest_checkpoint(remote.names())
    if newest is not None and ((folder / newest).exists() or (folder / newest).is_symlink()):
        set_aside(folder / newest, f"replaced by its copy in {uri}")
    return newest


def fetch_part(uri: str, folder: str | os.PathLike, checkpoint: str, rank: int = 0, world_size: int = 1) -> None:
    """Download this rank's part of the run at ``uri`` into ``folder`` (call it on every rank with the same
    ``checkpoint``, from :func:`plan_fetch`): the files of ``checkpoint`` that :func:`uploader_rank` gives it (last,
    so that a complete local checkpoint means the rest is there) and, on rank 0, every other object but the marker
    and the older checkpoints. A local file a download replaces is first set aside into ``incomplete/``;
    :func:`llmshear.run_folder.recover` then points ``latest-rank0.pt`` at the checkpoint.

    Raises:
        RemoteError: see :class:`Remote`; a transfer failed.
    """
    folder, remote = Path(folder), Remote(uri)
    names = remote.names()
    mine = [name for name in names if uploader_rank(name, world_size) == rank]
    others = [name for name in mine if name != MARKER and checkpoint_of(name) is None]
    files = [name for name in mine if checkpoint_of(name) == checkpoint]
    files.sort(key=lambda name: name.endswith(METADATA_FILE))
    mirror = Mirror(folder, remote, rank, world_size)
    for name in [*others, *files]:
        path = folder / name
        if checkpoint_of(name) is None and (path.exists() or path.is_symlink()):
            set_aside(path, f"replaced by its copy in {uri}")
        path.parent.mkdir(parents=True, exist_ok=True)
        remote.download(name, path)
        mirror.record(name)
    if rank == 0:
        mirror.marker = checkpoint
    mirror.save()
    log.info("downloaded %s/%s (%d file(s)) and %d other file(s) into %s to resume from", uri, checkpoint,
             len(files), len(others), folder)


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
