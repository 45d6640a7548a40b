"""Tokenization of input files (in parallel, deterministic order) and packing of one domain into MDS sequences."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable, Iterator
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
    the documents of domains left out by ``--domains``; ``complete`` is false when a token budget stopped the
    reading before the end of the file (or before its start: nothing was wanted from it any more).
    """

    path: str
    parts: dict[str, FileTokens]
    bad: BadLines
    documents: int = 0
    skipped: str | None = None
    unselected: dict[str, int] = field(default_factory=dict)
    complete: bool = True


@dataclass(frozen=True)
class FileTask:
    """What a worker needs to read one file: its domain by place (None: route every document by its own set),
    whether documents are routed by their RedPajama set, the selected domains (None: all)."""

    path: str
    domain: str | None
    routed: bool = False
    selected: tuple[str, ...] | None = None


Wanted = dict[str, int | None]  # stream tokens still wanted per domain when a file is handed to a worker (a
# domain not named, or named with None: no limit); the worker stops once each domain it can feed has them


class TokenBudget:
    """How many train tokens to take of each domain (``--max-tokens``), and what was used of each file.

    A domain's stream (its documents, each followed by EOS, in file order) gives its first ``eval_tokens`` to
    the eval split, drops the tail of the document that boundary cuts (as :class:`DomainPacker` does), and is
    then cut after the first document that brings the train part to the domain's limit: the train split gets
    at least the limit less one partial sequence, at most one document more. The cut depends only on the
    stream, never on how far workers read ahead, so the output is the same for every ``workers``.

    Args:
        max_tokens: train tokens of every domain (an int), of the domains named (a dict; the others unlimited),
            or None (unlimited).
        eval_tokens: the tokens of a domain's eval split (``eval_seqs * seq_len``).
    """

    def __init__(self, max_tokens: int | dict[str, int] | None, eval_tokens: int):
        self.limits = dict(max_tokens) if isinstance(max_tokens, dict) else {}
        self.default = None if isinstance(max_tokens, dict) else max_tokens
        self.eval_tokens = eval_tokens
        self.used: dict[str, int] = {}  # stream tokens taken
        self.tails: dict[str, int] = {}  # the boundary document's dropped tail, once its end was seen
        self.files: dict[str, dict] = {}  # path of a file documents were taken from -> {"documents": how many,
        #                                   "complete": all of them}

    def limit(self, domain: str) -> int | None:
        return self.limits.get(domain, self.default)

    def left(self, domain: str) -> int | None:
        """Stream tokens still to take from ``domain`` (None: no limit, or not known before the eval/train
        boundary's document has ended)."""
        limit = self.limit(domain)
        if limit is None or domain not in self.tails:
            return None
        return max(0, self.eval_tokens + self.tails[domain] + limit - self.used.get(domain, 0))

    def met(self, domain: str) -> bool:
        return self.left(domain) == 0

    def wanted(self, task: FileTask) -> Wanted | None:
        """What ``task``'s worker should read (None: nothing, every domain it can feed has its tokens). Asked
        ahead of the results before it, the answer can only be larger than the need, never smaller."""
        if task.routed:
            if task.selected is not None and all(self.met(domain) for domain in task.selected):
                return None
            return {domain: self.left(domain) for domain in set(self.limits) | set(self.used)}
        return None if self.met(task.domain) else {task.domain: self.left(task.domain)}

    def _keep(self, domain: str, lengths: np.ndarray) -> int:
        """How many of ``lengths`` (the next documents of ``domain``) the budget takes; learns the tail."""
        if self.limit(domain) is None:
            return len(lengths)
        ends = self.used.get(domain, 0) + np.cumsum(lengths)
        if domain not in self.tails:
            past = np.flatnonzero(ends >= self.eval_tokens)
            if not len(past):
                return len(lengths)
            self.tails[domain] = int(ends[past[0]]) - self.eval_tokens
        stop = self.eval_tokens + self.tails[domain] + self.limit(domain)
        if self.used.get(domain, 0) >= stop:
            return 0
        return min(int(np.searchsorted(ends, stop)) + 1, len(lengths))

    def take(self, result: FileResult) -> FileResult:
        """``result`` cut to what the budget takes from it, in stream order; records the file's use."""
        parts, used_documents, complete = {}, 0, result.complete
        for domain, part in result.parts.items():
            keep = self._keep(domain, part.doc_lengths)
            complete = complete and keep == len(part.doc_lengths)
            if keep:
                tokens = int(np.sum(part.doc_lengths[:keep]))
                parts[domain] = FileTokens(part.tokens[:tokens], part.doc_lengths[:keep])
                self.used[domain] = self.used.get(domain, 0) + tokens
                used_documents += keep
        if used_documents:
            self.files[result.path] = {"documents": used_documents, "complete": complete}
        return FileResult(result.path, parts, result.bad, result.documents, result.skipped, result.unselected,
                          complete)


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


def _tokenize_file(job: tuple[FileTask, int, bool, Wanted | None]) -> FileResult:
    """Tokenize one file (``(task, eos id, strict, wanted)``); runs in a worker or in the main process.

    A truncated or corrupt file raises in strict mode; otherwise it is skipped whole (none of its documents
    are used) and the result says why. With ``wanted``, documents of a domain that has its tokens are left
    untokenized, and the reading stops once every domain the file can feed has them (``complete`` false).
    """
    task, eos_id, strict, wanted = job
    bad, unselected = BadLines(), {}
    pieces: dict[str, list[np.ndarray]] = {}
    chunks: dict[str, list[str]] = {}
    produced: dict[str, int] = {}
    documents, complete = 0, True

    def flush(domain: str) -> None:
        for encoding in _TOKENIZER.encode_batch(chunks[domain], add_special_tokens=False):
            pieces.setdefault(domain, []).append(np.asarray(encoding.ids + [eos_id], dtype=np.uint32))
            produced[domain] = produced.get(domain, 0) + len(encoding.ids) + 1
        chunks[domain].clear()

    def has_enough(domain: str) -> bool:
        limit = wanted.get(domain)
        return limit is not None and produced.get(domain, 0) >= limit

    def all_fed() -> bool:
        if not task.routed:
            return has_enough(task.domain)
        return task.selected is not None and all(has_enough(domain) for domain in task.selected)

    try:
        for domain, text in _domain_texts(task, bad, strict, unselected):
            if wanted is not None and has_enough(domain):
                complete = False
                if all_fed():
                    break
                continue
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
    return FileResult(task.path, parts, bad, documents, unselected=unselected, complete=complete)


def tokenize_all(tasks: list[FileTask], tokenizer_json: str, eos_id: int, workers: int = 1, strict: bool = False,
                 progress: bool | None = None,
                 wanted: Callable[[FileTask], Wanted | None] | None = None) -> Iterator[FileResult]:
    """Yield a :class:`FileResult` for every task, in task order, whatever ``workers``.

    Args:
        tasks: the files to read (see :func:`file_tasks`).
        tokenizer_json: a ``tokenizers.Tokenizer`` serialized to JSON (what every worker builds).
        eos_id: the token appended after every document.
        workers: processes; 1 tokenizes in this process.
        strict: raise at the first bad line or unreadable file.
        progress: over files: None: a bar on a terminal, else log lines at an interval; True: a bar; False: none.
        wanted: asked when a file is handed out, after every earlier result was consumed but those still being
            read ahead (at most ``2 * workers``): what to read of it (None: unlimited; see
            :meth:`TokenBudget.wanted`). A file from which nothing is wanted is not opened; its result is
            empty and not ``complete``. Without it every file is read whole.
    """
    def job(task: FileTask) -> tuple[FileTask, int, bool, Wanted | None] | None:
        if wanted is None:
            return task, eos_id, strict, None
        need = wanted(task)
        return None if need is None else (task, eos_id, strict, need)

    def unread(task: FileTask) -> FileResult:
        return FileResult(task.path, {}, BadLines(), complete=False)

    def in_process() -> Iterator[FileResult]:
        for task in tasks:
            spec = job(task)
            yield unread(task) if spec is None else _tokenize_file(spec)

    if workers == 1:
        with _single_threaded(tokenizer_json):
            yield from report(in_process(), len(tasks), "tokenize", "file", enabled=progress)
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process that already runs torch / Rust threads
    with context.Pool(workers, initializer=_start_pool_worker, initargs=(tokenizer_json,)) as pool:
        def collect(task: FileTask, running) -> FileResult:
            return unread(task) if running is None else running.get()

        def read_ahead() -> Iterator[FileResult]:  # a file is handed out once the one 2 * workers before it is used
            pending: deque = deque()
            for task in tasks:
                spec = job(task)
                pending.append((task, None if spec is None else pool.apply_async(_tokenize_file, (spec,))))
                if len(pending) >= 2 * workers:
                    yield collect(*pending.popleft())
            while pending:
                yield collect(*pending.popleft())

        yield from report(read_ahead(), len(tasks), "tokenize", "file", enabled=progress)


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
