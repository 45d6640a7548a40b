"""Tokenize and pack ``DIR/<domain>/*.jsonl`` into MDS shards, and read them back by sample index.

Layout written by :func:`prepare`::

    OUT/train/<domain>/index.json + shard.*.mds     sequences K+1 … of the domain
    OUT/eval/<domain>/index.json + shard.*.mds      the first K sequences of the domain (held out)
    OUT/summary.json                                documents / tokens / sequences per domain and split

Every document is tokenized without special tokens and followed by EOS; a domain's documents (files in name
order, lines in file order) form one token stream cut into sequences of exactly ``seq_len`` tokens (the last
partial sequence is dropped and counted). Each sample has one column, ``tokens``: a fixed-shape
``ndarray:uint16:<seq_len>`` (``uint32`` when the vocabulary has more than 65,536 entries).
"""

from __future__ import annotations

import bisect
import json
import logging
import mmap
import shutil
from pathlib import Path

import numpy as np

from llmshear.datasets.jsonl import find_domains
from llmshear.datasets.packing import DomainPacker, tokenize_all

log = logging.getLogger(__name__)

TOKENS = "tokens"
SPLITS = ("train", "eval")
SUMMARY = "summary.json"


def token_dtype(vocab_size: int) -> str:
    """``uint16`` when every token id fits in 16 bits, else ``uint32``."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def fast_tokenizer(name: str | Path):
    """``(tokenizers.Tokenizer JSON, eos id, vocab size)`` of an HF dir, a ``.gguf`` file or ``smollm2``.

    Raises:
        ValueError: the tokenizer is not a fast one, or has no EOS token.
    """
    from llmshear.models.sources import load_tokenizer

    tokenizer = load_tokenizer(name)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"--tokenizer {name}: a fast (tokenizer.json) tokenizer is required")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"--tokenizer {name}: the tokenizer has no EOS token to join documents with")
    vocab = max(len(tokenizer), tokenizer.vocab_size)
    return tokenizer.backend_tokenizer.to_str(), int(tokenizer.eos_token_id), vocab


def check_arguments(out: Path, seq_len: int, eval_seqs: int, workers: int, overwrite: bool) -> None:
    """Reject bad arguments before any work.

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is false.
        ValueError: a number out of range (the option is named).
    """
    if seq_len < 2:
        raise ValueError(f"--seq-len {seq_len}: must be at least 2")
    if eval_seqs < 1:
        raise ValueError(f"--eval-seqs {eval_seqs}: must be at least 1")
    if workers < 1:
        raise ValueError(f"--workers {workers}: must be at least 1")
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out {out} already exists; pass --overwrite to replace it")


def prepare(input_dir: str | Path, tokenizer: str | Path, out: str | Path, seq_len: int, eval_seqs: int,
            workers: int = 1, strict: bool = False, overwrite: bool = False, domains: list[str] | None = None,
            progress: bool | None = None) -> dict:
    """Tokenize, pack and write every domain of ``input_dir`` as MDS under ``out`` (see the module docstring).

    The output is built in a sibling temporary directory and moved into place only when complete, so a
    failure never leaves a half-written ``out`` (nor removes an existing one).

    Args:
        input_dir: ``DIR`` with ``DIR/<domain>/*.jsonl[.gz|.zst]``.
        tokenizer: an HF tokenizer directory, a ``.gguf`` file or ``smollm2``.
        out: the output directory.
        seq_len: tokens per sequence (N).
        eval_seqs: sequences held out per domain for evaluation (K); a domain needs at least K + 1.
        workers: tokenizer processes (files are the unit of parallelism).
        strict: fail at the first bad input line instead of counting it.
        overwrite: replace an existing ``out``.
        domains: only these domains, in this order (default: every sub-directory, sorted).
        progress: report progress over files (None: a bar on a terminal, else log lines; True: a bar; False: none).

    Returns:
        The summary, also written to ``out/summary.json``.

    Raises:
        FileExistsError / FileNotFoundError / ValueError: bad arguments or input, named; a domain with fewer
            than ``eval_seqs + 1`` sequences; a bad line in strict mode (``file:line: reason``).
    """
    out = Path(out)
    check_arguments(out, seq_len, eval_seqs, workers, overwrite)
    files = find_domains(input_dir, domains)
    tokenizer_json, eos_id, vocab = fast_tokenizer(tokenizer)
    dtype = token_dtype(vocab)
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        summary = {"tokenizer": str(tokenizer), "vocab_size": vocab, "dtype": dtype, "seq_len": seq_len,
                   "eval_seqs": eval_seqs, "domains": {}}
        packers = {d: DomainPacker(d, staging, seq_len, eval_seqs, dtype, TOKENS) for d in files}
        for domain, result in tokenize_all(files, tokenizer_json, eos_id, workers, strict, progress):
            packers[domain].add(result)
        for domain, packer in packers.items():
            summary["domains"][domain] = packer.close()
        (staging / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


class MDSDomain:
    """Random access to the token sequences of one MDS directory written by :func:`prepare`.

    The index is parsed by streaming's own shard readers (which also decode samples); the shard files are
    memory-mapped on first use, so reading a sample is two slices of the page cache, in any order, with no
    shared memory, no file handle per read and no worker process.

    Args:
        directory: the directory holding ``index.json``.

    Raises:
        FileNotFoundError: no ``index.json``, or a shard file is missing (compressed-only shards included).
        ValueError: not MDS, or no ``tokens`` column.
    """

    def __init__(self, directory: str | Path):
        from streaming.base.format import reader_from_json

        self.directory = Path(directory)
        index = self.directory / "index.json"
        if not index.is_file():
            raise FileNotFoundError(f"{index} is missing: not an MDS directory (run scripts/prepare_data.py)")
        try:
            shards = json.loads(index.read_text())["shards"]
            self.shards = [reader_from_json(str(self.directory), "", obj) for obj in shards]
        except (ValueError, KeyError, TypeError, AssertionError) as err:
            raise ValueError(f"{index} is not an MDS index: {err!r}") from err
        for shard in self.shards:
            self._check_shard(shard)
        self.starts = np.cumsum([0] + [shard.samples for shard in self.shards]).tolist()
        self._maps: dict[int, np.ndarray] = {}
        self.seq_len = len(self[0]) if len(self) else 0

    def _check_shard(self, shard) -> None:
        if getattr(shard, "column_names", None) is None or TOKENS not in shard.column_names:
            raise ValueError(f"{self.directory}: shards have no {TOKENS!r} column (not written by prepare_data)")
        shard.validate(allow_unsafe_types=False)
        if not (self.directory / shard.raw_data.basename).is_file():
            raise FileNotFoundError(f"{self.directory / shard.raw_data.basename} is missing (compressed shards "
                                    "are not read; re-run scripts/prepare_data.py)")

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int) -> np.ndarray:
        """Sequence ``index`` as an integer array of shape ``(seq_len,)``."""
        if not 0 <= index < len(self):
            raise IndexError(f"{self.directory}: sample {index} out of range [0, {len(self)})")
        shard = bisect.bisect_right(self.starts, index) - 1
        data = self._map(shard)
        offset = (1 + index - self.starts[shard]) * 4  # an MDS shard: count, then n + 1 uint32 sample offsets
        begin, end = data[offset:offset + 8].view(np.uint32)
        return self.shards[shard].decode_sample(data[begin:end].tobytes())[TOKENS]

    def _map(self, shard: int) -> np.ndarray:
        """The shard file as a read-only uint8 array over a memory map (the file handle is closed at once)."""
        if shard not in self._maps:
            with open(self.directory / self.shards[shard].raw_data.basename, "rb") as handle:
                self._maps[shard] = np.frombuffer(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ), np.uint8)
        return self._maps[shard]

    def __getstate__(self) -> dict:
        """Pickle without the memory maps (they are re-opened on first read)."""
        return {**self.__dict__, "_maps": {}}


def open_domains(directories: list[str | Path], seq_len: int | None = None) -> list[MDSDomain]:
    """Open one :class:`MDSDomain` per directory, checking every one is non-empty and ``seq_len`` long.

    Raises:
        ValueError: an empty domain, or sequences of another length (names ``data.seq_len``).
    """
    opened = []
    for directory in directories:
        domain = MDSDomain(directory)
        if len(domain) == 0:
            raise ValueError(f"{directory}: holds no sequences")
        if seq_len is not None and domain.seq_len != seq_len:
            raise ValueError(f"data.seq_len={seq_len} but {directory} holds sequences of {domain.seq_len} tokens")
        opened.append(domain)
    return opened
