"""Writing files and directories so that no reader sees a part and no writer replaces another's finished work.

- :func:`replace_json`: a small file through a temporary file beside it and an atomic rename.
- :class:`Lock`: a lock file naming its holder (host, pid, SLURM job and restart); a holder that is provably gone
  is taken over, any other refuses.
- :func:`new_directory`: the rule every command that writes a directory follows: claim the target (a
  :class:`Lock` beside it), build it in a staging folder beside it named after it, and move it into place at the
  end, refusing a target that appeared meanwhile unless overwriting was asked for.
- :func:`disk_failure`: a full disk, a quota or a read-only filesystem as one :class:`DiskError` naming the
  folder and its free space, whichever layer failed (an ``OSError``, or torch's writer).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

CREATE_TRIES = 5  # Lock.acquire: attempts to create the lock file in a folder that another process may remove
PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")  # a folder name that cannot leave its parent (a domain)
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
TORCH_WRITE_FAILED = ("PytorchStreamWriter failed writing", "file write failed", "unexpected pos")


class DiskError(OSError):
    """Writing into a folder failed for lack of space (or a read-only filesystem); the message says where and
    what to do."""


def free_space(folder: Path) -> str:
    """The free space of the filesystem holding ``folder`` (or its nearest existing parent), for messages."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    return f"{shutil.disk_usage(existing).free / 1e9:.2f} GB free there now"


def disk_failure(err: BaseException, folder: str | os.PathLike, what: str, then: str) -> DiskError | None:
    """``err`` as a :class:`DiskError` when it is a full disk, a quota or a read-only filesystem (an ``OSError``
    with that errno, or torch's ``PytorchStreamWriter`` failing to write), else None; ``then``: what to do."""
    folder = Path(folder)
    code = getattr(err, "errno", None)
    if isinstance(err, OSError) and code in DISK_ERRNOS:
        reason = os.strerror(code)
    elif isinstance(err, RuntimeError) and any(text in str(err) for text in TORCH_WRITE_FAILED):
        reason = "torch could not write the file (a full disk or quota, most often)"
        code = errno.ENOSPC
    else:
        return None
    return DiskError(code, f"{folder}: writing {what} failed: {reason}; {free_space(folder)}. {then}")


def replace_json(path: str | os.PathLike, content, indent: int | None = None) -> None:
    """``content`` as JSON at ``path``, through a hidden temporary file (``.<name>.<pid>``) renamed over it."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    text = json.dumps(content, indent=indent)
    temporary.write_text(text + "\n" if indent is not None else text, encoding="utf-8")
    os.replace(temporary, path)


class LockedError(FileExistsError):
    """A live holder has the lock; ``holder`` is what its file says."""

    def __init__(self, path: Path, holder: dict):
        super().__init__(f"lock file {path}: host {holder.get('host')}, pid {holder.get('pid')}, since "
                         f"{holder.get('since')}")
        self.path, self.holder = path, holder


class Lock:
    """A lock file that records its holder: host, pid, SLURM job and restart count, start time.

    A holder is gone, and its lock taken over with a warning, when its file is unreadable (a kill left it
    half-written), when it is an earlier incarnation of this SLURM job (the same job id, another
    ``SLURM_RESTART_COUNT``: a requeue), or when it ran on this host and its pid no longer exists. Any other
    holder (another host, or two job steps of one allocation) is live.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        job = os.environ.get("SLURM_JOB_ID")
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": job,
                       "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0") if job else None,
                       "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.created: list[Path] = []  # the folders acquire() made, innermost first

    def acquire(self) -> None:
        """Take the lock (or a stale one).

        Raises:
            LockedError: a live holder has it.
        """
        for _ in range(CREATE_TRIES):  # another process may remove the folder it made between our mkdir and open
            missing = [folder for folder in [self.path.parent, *self.path.parent.parents] if not folder.exists()]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.created = missing
            try:
                with open(self.path, "x", encoding="utf-8") as handle:
                    json.dump(self.holder, handle)
                return
            except FileExistsError:
                break
            except FileNotFoundError:
                continue
        other = self.read()
        if not self.stale(other):
            raise LockedError(self.path, other)
        log.warning("taking over the lock %s of a holder that is gone (%s)", self.path, other or "unreadable")
        replace_json(self.path, self.holder)

    def release(self) -> None:
        """Remove the lock if it is still this process's, and the folders :meth:`acquire` made for it that are
        left empty (a run that failed before writing anything leaves no trace)."""
        if self.read() == self.holder:
            self.path.unlink(missing_ok=True)
        for folder in self.created:
            try:
                folder.rmdir()
            except OSError:  # not empty (or already gone): it holds what the run wrote
                break
        self.created = []

    def read(self) -> dict:
        try:
            content = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return content if isinstance(content, dict) else {}

    def stale(self, other: dict) -> bool:
        """Whether the holder ``other`` is gone."""
        if not other:
            return True
        job = self.holder["slurm_job"]
        if job is not None and other.get("slurm_job") == job and "slurm_restart" in other:
            if other["slurm_restart"] != self.holder["slurm_restart"]:
                return True  # an earlier incarnation of this job, requeued since
        if other.get("host") != self.holder["host"]:
            return False
        try:
            os.kill(int(other.get("pid")), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, TypeError, ValueError):
            return False
        return False


def staging_dir(out: Path) -> Path:
    """Where :func:`new_directory` builds ``out``: ``.<name>.partial`` beside it."""
    return out.parent / f".{out.name}.partial"


def claim_file(out: Path) -> Path:
    """The lock that claims ``out`` for one writer: ``.<name>.claim`` beside it."""
    return out.parent / f".{out.name}.claim"


def replace_directory(staging: Path, out: Path) -> None:
    """Put ``staging`` in the place of the existing ``out`` (the old one is removed once the new one is in)."""
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _is_empty_directory(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def occupied(path: Path) -> bool:
    """Whether ``path`` holds something: a file, a link, or a directory that is not empty."""
    return (path.exists() or path.is_symlink()) and not _is_empty_directory(path)


def require_new_directory(out_dir: str | os.PathLike, hint: str = "nothing was written") -> Path:
    """``out_dir`` as a Path when it is absent or an empty directory: where a command may write.

    Raises:
        FileExistsError: it is a file, a link or a non-empty directory; the message ends with ``hint``.
    """
    out_dir = Path(out_dir)
    if occupied(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not an empty directory; {hint}")
    return out_dir


@contextmanager
def new_directory(out: str | os.PathLike, overwrite: bool = False, what: str = "the output",
                  replace: Callable[[Path, Path], None] = replace_directory) -> Iterator[Path]:
    """Build the directory ``out``: yields the staging folder to write into, and moves it to ``out`` at the end.

    The target is claimed first (:func:`claim_file`): a second writer is refused by name while the first is alive;
    a claim whose holder is gone is taken over and its staging folder cleared. On success the staging folder
    becomes ``out`` by a rename (an empty directory there counts as absent). An ``out`` that is not empty by then
    is replaced through ``replace`` only with ``overwrite``; otherwise it is left as it is, and the finished work
    stays in the staging folder, which the error names. On failure the staging folder is removed. The claim is
    released either way.

    Raises:
        FileExistsError: ``out`` is not empty and ``overwrite`` is false (checked at the start and at the end),
            or another live writer holds the claim.
    """
    out = require_new_directory(out) if not overwrite else Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    claim = Lock(claim_file(out))
    try:
        claim.acquire()
    except LockedError as err:
        raise FileExistsError(f"{out} is being written by another command ({err}); wait for it to finish, or "
                              f"delete {err.path} if that process is gone") from None
    staging = staging_dir(out)
    try:
        shutil.rmtree(staging, ignore_errors=True)  # left by a writer that was killed: the claim is ours now
        staging.mkdir()
        try:
            yield staging
        except BaseException as err:
            shutil.rmtree(staging, ignore_errors=True)
            failure = disk_failure(err, out.parent, what, f"Nothing was written to {out} or replaced; free space "
                                   "(or make the folder writable) and run the command again")
            if failure is not None:
                raise failure from err
            raise
        if occupied(out):
            if not overwrite:
                raise FileExistsError(f"{out} appeared while this command wrote {what}; it is left as it is, and "
                                      f"what this command wrote is in {staging}")
            replace(staging, out)
            shutil.rmtree(staging, ignore_errors=True)  # what a merging `replace` leaves: an emptied folder
        else:
            if _is_empty_directory(out):
                out.rmdir()
            staging.rename(out)
    finally:
        claim.release()
