"""A run folder's mirror in an object store (``checkpoint.remote: s3://bucket/prefix``; the store:
:mod:`llmshear.remote`), kept up to date during a run, and the way back.

The run folder stays local: the run lock, the recovery after a kill, ``metrics.jsonl``, ``masks/`` and
``proportions.json`` keep the guarantees of local files. Every rank uploads its part of the folder: the shard
files of a sharded checkpoint (``ep<E>-ba<N>/__<R>_<i>.distcp``) go with the rank that wrote them, everything else
(full checkpoints, ``.metadata``, ``metrics.jsonl``, ``masks/``, ...) with rank 0
(:func:`~llmshear.remote.uploader_rank`). What is uploaded: every file new or changed (size, modification time)
since its last upload, except ``run.lock``, ``incomplete/``, symbolic links (``latest-rank0.pt``), hidden files
other than a checkpoint's ``.metadata``, and ``*.tmp``; only complete checkpoints. Nothing remote is ever deleted.
What a rank uploaded is recorded in ``<folder>/.remote.json`` (rank 0) or ``.remote-rank<R>.json``.

During a run the uploads go in the background (:class:`Mirror`'s :meth:`~Mirror.stage` and
:meth:`~Mirror.upload`, driven by :class:`llmshear.callbacks.run_folder.MirrorRunFolder`): a checkpoint's files are
hard-linked into a hidden staging folder, so a rotation (``checkpoint.keep``) cannot delete them under the upload.
The marker object ``<prefix>/latest`` moves, by rank 0, only to a checkpoint that is complete in the store
(:meth:`Mirror.newest_complete`: for a sharded one, its ``.metadata`` and every shard that lists), so it never
names a checkpoint that is not fully there.

At a resume on a machine without the folder, :func:`plan_fetch` (rank 0) picks the checkpoint the marker names (or
the newest complete one) and :func:`fetch_part` downloads, on every rank, the files that rank uploads: the shards
in parallel, the other files on rank 0.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from llmshear.checkpoints import METADATA_FILE, checkpoint_batch, checkpoint_problem, checkpoints_in
from llmshear.files import replace_json
from llmshear.remote import (
    MARKER,
    Remote,
    checkpoint_names,
    checkpoint_of,
    shard_files,
    uploader_rank,
)
from llmshear.run_folder import LOCK_FILE, SET_ASIDE_DIR, set_aside

log = logging.getLogger(__name__)

STAGING_PREFIX = ".uploading-rank"


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
