"""Tokenization of input files (in parallel, deterministic order) and packing of one domain into MDS sequences."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmshear.datasets.jsonl import BadLines, read_documents
from llmshear.progress import progress as report

log = logging.getLogger(__name__)

CHUNK_DOCS = 256
_TOKENIZER = None  # the worker's tokenizers.Tokenizer, set by _init_worker


@dataclass
class FileTokens:
    """One input file, tokenized: every document's tokens followed by EOS, concatenated."""

    path: str
    tokens: np.ndarray  # (n,) uint32
    doc_lengths: np.ndarray  # (documents,) int64, EOS included; sums to n
    bad: BadLines


def _init_worker(tokenizer_json: str) -> None:
    """Build the tokenizer once per worker process; Rust-side threads are off so ``workers`` means cores."""
    global _TOKENIZER
    from tokenizers import Tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TOKENIZER = Tokenizer.from_str(tokenizer_json)


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


def _tokenize_file(task: tuple[str, int, bool]) -> FileTokens:
    """Tokenize one file (``(path, eos id, strict)``); runs in a worker or in the main process."""
    path, eos_id, strict = task
    bad = BadLines()
    pieces, lengths, chunk = [], [], []

    def flush() -> None:
        for encoding in _TOKENIZER.encode_batch(chunk, add_special_tokens=False):
            pieces.append(np.asarray(encoding.ids + [eos_id], dtype=np.uint32))
            lengths.append(len(encoding.ids) + 1)
        chunk.clear()

    for text in read_documents(Path(path), bad, strict):
        chunk.append(text)
        if len(chunk) == CHUNK_DOCS:
            flush()
    flush()
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.uint32)
    return FileTokens(path, tokens, np.asarray(lengths, dtype=np.int64), bad)


def tokenize_all(files: dict[str, list[Path]], tokenizer_json: str, eos_id: int, workers: int = 1,
                 strict: bool = False, progress: bool | None = None) -> Iterator[tuple[str, FileTokens]]:
    """Yield ``(domain, FileTokens)`` for every file, domain by domain and file by file, whatever ``workers``.

    Args:
        files: ``{domain: files}`` (see :func:`llmshear.datasets.jsonl.find_domains`).
        tokenizer_json: a ``tokenizers.Tokenizer`` serialized to JSON (what every worker builds).
        eos_id: the token appended after every document.
        workers: processes; 1 tokenizes in this process.
        strict: raise at the first bad line.
        progress: over files: None: a bar on a terminal, else log lines at an interval; True: a bar; False: none.
    """
    tasks = [(domain, (str(path), eos_id, strict)) for domain, paths in files.items() for path in paths]
    if workers == 1:
        with _single_threaded(tokenizer_json):
            yield from _tagged(tasks, map(_tokenize_file, [task for _, task in tasks]), progress)
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process that already runs torch / Rust threads
    with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer_json,)) as pool:
        results = pool.imap(_tokenize_file, [task for _, task in tasks])
        yield from _tagged(tasks, results, progress)


def _tagged(tasks, results, progress: bool | None) -> Iterator[tuple[str, FileTokens]]:
    """``(domain, result)`` in task order, reporting progress over files."""
    pairs = zip(tasks, results, strict=True)
    for (domain, _), result in report(pairs, len(tasks), "tokenize", "file", enabled=progress):
        yield domain, result


class DomainPacker:
    """Cuts one domain's token stream into sequences: the first ``eval_seqs`` to eval, the rest to train.

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
        self.bad_lines: dict[str, dict] = {}

    def add(self, result: FileTokens) -> None:
        """Append one file's tokens and write every sequence that is now complete."""
        if result.bad.count:
            self.bad_lines[result.path] = {"count": result.bad.count, "examples": result.bad.examples}
            log.warning("%s: %d bad line(s), e.g. %s", result.path, result.bad.count, result.bad.examples[0])
        offsets = np.concatenate([[0], np.cumsum(result.doc_lengths)[:-1]]) if len(result.doc_lengths) else []
        starts = np.concatenate([self.leftover_starts, len(self.leftover) + np.asarray(offsets, dtype=np.int64)])
        stream = np.concatenate([self.leftover, result.tokens])
        self.total_documents += len(result.doc_lengths)
        complete = len(stream) // self.seq_len
        sequence_of_start = self.written + starts[starts < complete * self.seq_len] // self.seq_len
        self.documents["eval"] += int(np.sum(sequence_of_start < self.eval_seqs))
        self.documents["train"] += int(np.sum(sequence_of_start >= self.eval_seqs))
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
        for writer in self.writers.values():
            writer.finish()
        if self.written < self.eval_seqs + 1:
            raise ValueError(f"domain {self.domain!r}: {self.written} sequence(s) of {self.seq_len} tokens, "
                             f"fewer than --eval-seqs {self.eval_seqs} + 1; add data or lower --eval-seqs/--seq-len")
        counts = {"eval": self.eval_seqs, "train": self.written - self.eval_seqs}
        split_summary = {split: {"documents": self.documents[split], "sequences": counts[split],
                                 "tokens": counts[split] * self.seq_len} for split in counts}
        return {"documents": self.total_documents, "tokens": self.written * self.seq_len + len(self.leftover),
                "dropped_tokens": len(self.leftover), "dropped_documents": len(self.leftover_starts),
                "bad_lines": sum(b["count"] for b in self.bad_lines.values()), "bad_line_files": self.bad_lines,
                **split_summary}
