"""Tokenization of input files (in parallel, deterministic order) and packing of one domain into MDS sequences."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmshear.datasets.jsonl import BadLineError, BadLines, CorruptFileError, read_records
from llmshear.datasets.redpajama import document_domain
from llmshear.progress import progress as report

log = logging.getLogger(__name__)

CHUNK_DOCS = 256
_TOKENIZER = None  # the worker's tokenizers.Tokenizer, set by _init_worker


@dataclass
class FileTokens:
    """The documents of one domain in one input file, tokenized: each followed by EOS, concatenated."""

    tokens: np.ndarray  # (n,) uint32
    doc_lengths: np.ndarray  # (documents,) int64, EOS included; sums to n


@dataclass
class FileResult:
    """One input file: its tokens per domain, its bad lines, and why it was skipped (None: it was not).

    ``documents`` counts the good documents read (before the fault, for a skipped file); ``unselected``
    the documents of domains left out by ``--domains``.
    """

    path: str
    parts: dict[str, FileTokens]
    bad: BadLines
    documents: int = 0
    skipped: str | None = None
    unselected: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class FileTask:
    """What a worker needs to read one file: its domain by place (None: route every document by its own set),
    whether documents are routed by their RedPajama set, the selected domains (None: all)."""

    path: str
    domain: str | None
    routed: bool = False
    selected: tuple[str, ...] | None = None


def _init_worker(tokenizer_json: str) -> None:
    """Build the tokenizer once per worker process; Rust-side threads are off so ``workers`` means cores."""
    global _TOKENIZER
    from tokenizers import Tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TOKENIZER = Tokenizer.from_str(tokenizer_json)


def _start_pool_worker(tokenizer_json: str) -> None:
    """A pool worker's start: the default SIGTERM action, then :func:`_init_worker`.

    The pool ends its workers with SIGTERM. A spawned worker re-imports the parent's main script, and one that
    imports Composer installs Composer's handler (``sys.exit(143)``, whose ``SystemExit`` the worker prints as an
    ignored exception at exit); the default action ends the worker quietly.
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _init_worker(tokenizer_json)


@contextlib.contextmanager
def _single_threaded(tokenizer_json: str) -> Iterator[None]:
    """Tokenize in this process with one thread (like one worker), restoring the environment afterwards."""
    global _TOKENIZER
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    _init_worker(tokenizer_json)
    try:
        yield
    finally:
        _TOKENIZER = None
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _domain_texts(task: FileTask, bad: BadLines, strict: bool, unselected: dict[str, int]) -> Iterator[tuple[str, str]]:
    """``(domain, text)`` of every selected good document of the file, in file order."""
    for number, obj in read_records(Path(task.path), bad, strict):
        domain, reason = document_domain(obj, task.domain) if task.routed else (task.domain, None)
        if reason is not None:
            if strict:
                raise BadLineError(f"{task.path}:{number}: {reason}")
            bad.add(f"{task.path}:{number}", reason)
        elif task.selected is not None and domain not in task.selected:
            unselected[domain] = unselected.get(domain, 0) + 1
        else:
            yield domain, obj["text"]


def _tokenize_file(job: tuple[FileTask, int, bool]) -> FileResult:
    """Tokenize one file (``(task, eos id, strict)``); runs in a worker or in the main process.

    A truncated or corrupt file raises in strict mode; otherwise it is skipped whole (none of its documents
    are used) and the result says why.
    """
    task, eos_id, strict = job
    bad, unselected = BadLines(), {}
    pieces: dict[str, list[np.ndarray]] = {}
    chunks: dict[str, list[str]] = {}
    documents = 0

    def flush(domain: str) -> None:
        for encoding in _TOKENIZER.encode_batch(chunks[domain], add_special_tokens=False):
            pieces.setdefault(domain, []).append(np.asarray(encoding.ids + [eos_id], dtype=np.uint32))
        chunks[domain].clear()

    try:
        for domain, text in _domain_texts(task, bad, strict, unselected):
            documents += 1
            chunks.setdefault(domain, []).append(text)
            if len(chunks[domain]) == CHUNK_DOCS:
                flush(domain)
    except CorruptFileError as err:
        if strict:
            raise
        return FileResult(task.path, {}, bad, documents, skipped=str(err), unselected=unselected)
    for domain in chunks:
        flush(domain)
    parts = {domain: FileTokens(np.concatenate(p), np.asarray([len(x) for x in p], dtype=np.int64))
             for domain, p in sorted(pieces.items())}
    return FileResult(task.path, parts, bad, documents, unselected=unselected)


def tokenize_all(tasks: list[FileTask], tokenizer_json: str, eos_id: int, workers: int = 1, strict: bool = False,
                 progress: bool | None = None) -> Iterator[FileResult]:
    """Yield a :class:`FileResult` for every task, in task order, whatever ``workers``.

    Args:
        tasks: the files to read (see :func:`file_tasks`).
        tokenizer_json: a ``tokenizers.Tokenizer`` serialized to JSON (what every worker builds).
        eos_id: the token appended after every document.
        workers: processes; 1 tokenizes in this process.
        strict: raise at the first bad line or unreadable file.
        progress: over files: None: a bar on a terminal, else log lines at an interval; True: a bar; False: none.
    """
    jobs = [(task, eos_id, strict) for task in tasks]
    if workers == 1:
        with _single_threaded(tokenizer_json):
            yield from report(map(_tokenize_file, jobs), len(jobs), "tokenize", "file", enabled=progress)
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process that already runs torch / Rust threads
    with context.Pool(workers, initializer=_start_pool_worker, initargs=(tokenizer_json,)) as pool:
        yield from report(pool.imap(_tokenize_file, jobs), len(jobs), "tokenize", "file", enabled=progress)


def file_tasks(files: dict[str, list[Path]]) -> list[FileTask]:
    """One task per file of ``{domain: files}`` (every document goes to the file's domain)."""
    return [FileTask(str(path), domain) for domain, paths in files.items() for path in paths]


class DomainPacker:
    """Cuts one domain's token stream into sequences: the first ``eval_seqs`` to eval, the rest to train.

    The train split starts at a document boundary: the tail of the document that the last eval sequence cuts is
    dropped (counted in ``boundary_tokens``), so no document has tokens in both splits. When that document is the
    domain's last (a domain of one long document), its tail goes to train instead, with a warning, and the
    summary says ``shared_document``.

    Args:
        domain: its name (directories ``<root>/eval/<domain>`` and ``<root>/train/<domain>``).
        root: the output directory.
        seq_len: tokens per sequence.
        eval_seqs: sequences held out for evaluation.
        dtype: ``uint16`` or ``uint32``.
        column: the MDS column name.
    """

    def __init__(self, domain: str, root: Path, seq_len: int, eval_seqs: int, dtype: str, column: str):
        from streaming import MDSWriter

        self.domain, self.seq_len, self.eval_seqs, self.column, self.dtype = domain, seq_len, eval_seqs, column, dtype
        columns = {column: f"ndarray:{dtype}:{seq_len}"}
        self.writers = {split: MDSWriter(out=str(root / split / domain), columns=columns, compression=None)
                        for split in ("eval", "train")}
        self.leftover = np.zeros(0, np.uint32)
        self.leftover_starts = np.zeros(0, np.int64)  # document starts inside `leftover`
        self.written = 0
        self.documents = {"eval": 0, "train": 0}
        self.total_documents = 0
        self.max_token_id = -1
        self.boundary_tokens = 0  # the tail of the document cut by the eval/train boundary, dropped
        self.skipping = False  # still inside that document (it went on past the tokens seen so far)
        self.held: list[np.ndarray] = []  # its tail so far: dropped once a later document starts
        self.shared_document = False

    def add(self, result: FileTokens) -> None:
        """Append one file's tokens of this domain and write every sequence that is now complete."""
        offsets = np.concatenate([[0], np.cumsum(result.doc_lengths)[:-1]]) if len(result.doc_lengths) else []
        starts = np.concatenate([self.leftover_starts, len(self.leftover) + np.asarray(offsets, dtype=np.int64)])
        stream = np.concatenate([self.leftover, result.tokens])
        self.total_documents += len(result.doc_lengths)
        if self.skipping:
            stream, starts = self._skip_to_document(stream, starts, 0)
        if self.written < self.eval_seqs:
            room = (self.eval_seqs - self.written) * self.seq_len
            if len(stream) < room:
                self._write(stream, starts)
                return
            self._write(stream[:room], starts[starts < room])
            stream, starts = self._skip_to_document(stream, starts, room)
        self._write(stream, starts)

    def _skip_to_document(self, stream: np.ndarray, starts: np.ndarray, at: int) -> tuple[np.ndarray, np.ndarray]:
        """Drop ``stream[at:]`` up to the next document start (all of it when none starts there)."""
        later = starts[starts >= at]
        cut = int(later[0]) if len(later) else len(stream)
        self.held.append(stream[at:cut])
        self.skipping = not len(later)
        if not self.skipping:
            self.boundary_tokens += sum(len(piece) for piece in self.held)
            self.held = []
        return stream[cut:], later - cut

    def _write(self, stream: np.ndarray, starts: np.ndarray) -> None:
        """Write the complete sequences of ``stream`` (document starts ``starts``); keep the rest for later."""
        complete = len(stream) // self.seq_len
        sequence_of_start = self.written + starts[starts < complete * self.seq_len] // self.seq_len
        self.documents["eval"] += int(np.sum(sequence_of_start < self.eval_seqs))
        self.documents["train"] += int(np.sum(sequence_of_start >= self.eval_seqs))
        if complete:
            self.max_token_id = max(self.max_token_id, int(stream[: complete * self.seq_len].max()))
        for row in stream[: complete * self.seq_len].reshape(complete, self.seq_len):
            split = "eval" if self.written < self.eval_seqs else "train"
            self.writers[split].write({self.column: row.astype(self.dtype)})
            self.written += 1
        self.leftover = stream[complete * self.seq_len:]
        self.leftover_starts = starts[starts >= complete * self.seq_len] - complete * self.seq_len

    def close(self) -> dict:
        """Finish the shards and return this domain's summary.

        Raises:
            ValueError: fewer than ``eval_seqs + 1`` sequences (the domain is named).
        """
        if self.skipping:
            log.warning("domain %r: the document cut by the eval/train boundary is its last one; its remaining "
                        "tokens go to train, so that document has tokens in both splits", self.domain)
            self.shared_document, self.skipping = True, False
            self._write(np.concatenate(self.held), np.zeros(0, np.int64))
            self.held = []
        for writer in self.writers.values():
            writer.finish()
        if self.written < self.eval_seqs + 1:
            raise ValueError(f"domain {self.domain!r}: {self.written} sequence(s) of {self.seq_len} tokens, "
                             f"fewer than --eval-seqs {self.eval_seqs} + 1; add data or lower --eval-seqs/--seq-len")
        counts = {"eval": self.eval_seqs, "train": self.written - self.eval_seqs}
        split_summary = {split: {"documents": self.documents[split], "sequences": counts[split],
                                 "tokens": counts[split] * self.seq_len} for split in counts}
        dropped = len(self.leftover) + self.boundary_tokens
        return {"documents": self.total_documents, "tokens": self.written * self.seq_len + dropped,
                "dropped_tokens": dropped, "boundary_tokens": self.boundary_tokens,
                "shared_document": self.shared_document,
                "dropped_documents": len(self.leftover_starts),
                "max_token_id": self.max_token_id, **split_summary}
