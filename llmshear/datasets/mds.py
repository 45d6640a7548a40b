"""Tokenize and pack ``DIR/<domain>/*.jsonl`` into MDS shards, and read them back by sample index.

Layout written by :func:`prepare`::

    OUT/train/<domain>/index.json + shard.*.mds     sequences K+1 … of the domain
    OUT/eval/<domain>/index.json + shard.*.mds      the first K sequences of the domain (held out)
    OUT/summary.json                                documents / tokens / sequences per domain and split, the
                                                    files read (``read_files``), the token budget if any

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
import os
from pathlib import Path

import numpy as np

from llmshear.datasets.jsonl import find_domains
from llmshear.datasets.packing import DomainPacker, FileResult, FileTask, TokenBudget, file_tasks, tokenize_all
from llmshear.datasets.redpajama import find_files
from llmshear.datasets.vocab import SUMMARY, read_summary, vocab_fingerprint
from llmshear.files import new_directory

log = logging.getLogger(__name__)

TOKENS = "tokens"
SPLITS = ("train", "eval")
LAYOUTS = ("domains", "redpajama")


def token_dtype(vocab_size: int) -> str:
    """``uint16`` when every token id fits in 16 bits, else ``uint32``."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def fast_tokenizer(name: str | Path):
    """``(tokenizers.Tokenizer JSON, eos id, vocab size)`` of an HF dir, a ``.gguf`` file or ``smollm2``.

    Raises:
        ValueError: the tokenizer is not a fast one, or has no EOS token.
    """
    from llmshear.sources import load_tokenizer

    tokenizer = load_tokenizer(name)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"--tokenizer {name}: a fast (tokenizer.json) tokenizer is required")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"--tokenizer {name}: the tokenizer has no EOS token to join documents with")
    vocab = max(len(tokenizer), tokenizer.vocab_size)
    return tokenizer.backend_tokenizer.to_str(), int(tokenizer.eos_token_id), vocab


def check_arguments(input_dir: Path, out: Path, seq_len: int, eval_seqs: int, workers: int, overwrite: bool,
                    layout: str = "domains") -> None:
    """Reject bad arguments before any work.

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is false.
        ValueError: a number out of range, an unknown layout, or ``out`` overlapping ``input_dir`` (the option is
            named): writing the output there would replace or mix with the corpus being read.
    """
    if seq_len < 2:
        raise ValueError(f"--seq-len {seq_len}: must be at least 2")
    if eval_seqs < 1:
        raise ValueError(f"--eval-seqs {eval_seqs}: must be at least 1")
    if workers < 1:
        raise ValueError(f"--workers {workers}: must be at least 1")
    if layout not in LAYOUTS:
        raise ValueError(f"--layout {layout}: must be one of {', '.join(LAYOUTS)}")
    source, target = input_dir.resolve(), out.resolve()
    if source == target or source in target.parents or target in source.parents:
        relation = "is" if source == target else "is inside" if source in target.parents else "contains"
        raise ValueError(f"--out {out} {relation} --input {input_dir}: the output must lie outside the corpus it "
                         "reads (and not around it); choose another --out")
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out {out} already exists; pass --overwrite to replace it")


def input_tasks(input_dir: str | Path, layout: str, domains: list[str] | None) -> tuple[list[FileTask], list[str]]:
    """The files to read and the domains in output order (see :func:`prepare`'s ``layout``)."""
    if layout == "redpajama":
        selected = tuple(domains) if domains else None
        tasks = [FileTask(str(p), d, routed=True, selected=selected) for p, d in find_files(input_dir, domains)]
        return tasks, list(domains) if domains else []
    folders = {p.name for p in Path(input_dir).iterdir() if p.is_dir()} if Path(input_dir).is_dir() else set()
    published = sorted(folders & {"common_crawl", "wikipedia", "c4"})
    if published:
        log.warning("--input folders %s are RedPajama's published names, not the recipes' domains: "
                    "--layout redpajama maps them (common_crawl -> cc, c4 -> c4-rp, wikipedia -> wiki)", published)
    files = find_domains(input_dir, domains)
    return file_tasks(files), list(files)


def read_files(prepared: str | Path) -> set[str]:
    """The input files (resolved paths) that a prepared output took documents from (its ``read_files``).

    Raises:
        ValueError: ``prepared`` has no ``summary.json`` that records them (named).
    """
    found = read_summary(prepared)
    files = found[1].get("read_files") if found else None
    if not isinstance(files, dict):
        raise ValueError(f"--exclude-read {prepared}: no summary.json with 'read_files' there (an output of this "
                         "version of scripts/prepare_data.py is needed)")
    return set(files)


def excluding(tasks: list[FileTask], prepared: list[str | Path]) -> tuple[list[FileTask], int]:
    """``tasks`` without the files any of ``prepared`` took documents from, and how many were left out."""
    seen = set().union(*(read_files(path) for path in prepared)) if prepared else set()
    kept = [task for task in tasks if str(Path(task.path).resolve()) not in seen]
    if seen and len(kept) == len(tasks):
        log.warning("--exclude-read %s: none of this input's files is among the %d it read (was it prepared from "
                    "another --input?); nothing is left out", ", ".join(map(str, prepared)), len(seen))
    return kept, len(tasks) - len(kept)


def unread(tasks: list[FileTask], summary: dict, domain: str) -> str:
    """Why ``domain`` has no document, for the error: its files skipped or with bad lines (the warnings say which),
    files without a document, or none of its documents in the input."""
    files = [task.path for task in tasks if task.domain == domain]
    faulty = [path for path in files if path in summary["skipped_files"] or path in summary["bad_line_files"]]
    if faulty:
        return f"{len(faulty)} of its {len(files)} file(s) skipped or with bad lines, see the warnings above"
    if files:
        return f"its {len(files)} file(s) hold no document with text"
    return "the input holds no document of it"


def _record(result: FileResult, summary: dict) -> None:
    """Note a file's bad lines, its skip (logged), and its documents of unselected domains in the summary."""
    if result.bad.count:
        summary["bad_lines"] += result.bad.count
        summary["bad_line_files"][result.path] = {"count": result.bad.count, "examples": result.bad.examples}
        log.warning("%s: %d bad line(s), e.g. %s", result.path, result.bad.count, result.bad.examples[0])
    if result.skipped is not None:
        summary["skipped_files"][result.path] = {"reason": result.skipped, "documents": result.documents}
        log.warning("skipped %s, %d document(s) read before the fault not used (--strict stops instead)",
                    result.skipped, result.documents)
    for domain, count in result.unselected.items():
        summary["unselected_documents"][domain] = summary["unselected_documents"].get(domain, 0) + count


def prepare(input_dir: str | Path, tokenizer: str | Path, out: str | Path, seq_len: int, eval_seqs: int,
            workers: int = 1, strict: bool = False, overwrite: bool = False, domains: list[str] | None = None,
            progress: bool | None = None, layout: str = "domains", max_tokens: int | dict[str, int] | None = None,
            exclude_read: list[str | Path] | None = None) -> dict:
    """Tokenize, pack and write every domain of ``input_dir`` as MDS under ``out`` (see the module docstring).

    The output is built in a staging folder beside it and moved into place only when complete
    (:func:`~llmshear.files.new_directory`): a failure never leaves a half-written ``out`` nor removes an existing
    one, and a second ``prepare`` into the same ``out`` is refused while the first runs.

    Args:
        input_dir: ``DIR`` with ``DIR/<domain>/*.jsonl[.gz|.zst]`` (layout ``domains``), or RedPajama as it is
            published (layout ``redpajama``, see :mod:`llmshear.datasets.redpajama`).
        tokenizer: an HF tokenizer directory, a ``.gguf`` file or ``smollm2``.
        out: the output directory; must not be, lie inside or contain ``input_dir``.
        seq_len: tokens per sequence (N).
        eval_seqs: sequences held out per domain for evaluation (K); a domain needs at least K + 1.
        workers: tokenizer processes (files are the unit of parallelism).
        strict: fail at the first bad input line or unreadable file instead of counting / skipping it.
        overwrite: replace an existing ``out``.
        domains: only these domains, in this order (default: every domain found, sorted).
        progress: report progress over files (None: a bar on a terminal, else log lines; True: a bar; False: none).
        layout: ``domains`` or ``redpajama``.
        max_tokens: train tokens to take per domain (an int: every domain; a dict: those domains, the others
            unlimited); the reading of a domain stops once it has them (:class:`~llmshear.datasets.packing.
            TokenBudget`), files it no longer needs are not opened.
        exclude_read: outputs of earlier ``prepare`` calls whose read files (``read_files`` in their summary)
            are left out, so that two sets drawn from one corpus share no file.

    Returns:
        The summary, also written to ``out/summary.json``.

    Raises:
        FileExistsError / FileNotFoundError / ValueError: bad arguments or input, named; a domain with fewer
            than ``eval_seqs + 1`` sequences; a bad line (``file:line: reason``) or a truncated / corrupt file
            (:class:`~llmshear.datasets.jsonl.CorruptFileError`, naming it) in strict mode.
    """
    out = Path(out)
    check_arguments(Path(input_dir), out, seq_len, eval_seqs, workers, overwrite, layout)
    check_budget(max_tokens)
    tasks, order = input_tasks(input_dir, layout, domains)
    tasks, excluded = excluding(tasks, exclude_read or [])
    tokenizer_json, eos_id, vocab = fast_tokenizer(tokenizer)
    dtype = token_dtype(vocab)
    budget = TokenBudget(max_tokens, eval_seqs * seq_len)
    with new_directory(out, overwrite, what="the data") as staging:
        summary = {"tokenizer": str(tokenizer), "vocab_size": vocab, "tokenizer_fingerprint":
                   vocab_fingerprint(tokenizer_json), "dtype": dtype, "seq_len": seq_len, "eval_seqs": eval_seqs,
                   "layout": layout, "max_tokens": max_tokens,
                   "exclude_read": [str(path) for path in exclude_read or []], "excluded_files": excluded,
                   "bad_lines": 0, "bad_line_files": {}, "skipped_files": {}, "unselected_documents": {},
                   "domains": {}}
        packers: dict[str, DomainPacker] = {}
        for result in tokenize_all(tasks, tokenizer_json, eos_id, workers, strict, progress, budget.wanted):
            _record(result, summary)
            result = budget.take(result)
            for domain, part in result.parts.items():
                if domain not in packers:
                    packers[domain] = DomainPacker(domain, staging, seq_len, eval_seqs, dtype, TOKENS)
                packers[domain].add(part)
        for domain in order or sorted(packers):
            if domain not in packers:
                raise ValueError(f"domain {domain!r}: no document was read ({unread(tasks, summary, domain)})")
            summary["domains"][domain] = packers[domain].close()
            _note_budget(summary["domains"][domain], domain, budget)
        summary["read_files"] = {str(Path(path).resolve()): use for path, use in budget.files.items()}
        (staging / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def check_budget(max_tokens: int | dict[str, int] | None) -> None:
    """Reject a token budget below one token, before any work.

    Raises:
        ValueError: names ``--max-tokens`` (and the domain).
    """
    counts = max_tokens.items() if isinstance(max_tokens, dict) else [("every domain", max_tokens)]
    for domain, count in counts:
        if count is not None and (not isinstance(count, int) or count < 1):
            raise ValueError(f"--max-tokens: {count!r} train tokens for {domain}; must be a whole number >= 1")


def _note_budget(info: dict, domain: str, budget: TokenBudget) -> None:
    """Add the domain's budget to its summary ``info`` (``budget_met`` false: the input ran out first, warned)."""
    limit = budget.limit(domain)
    info["max_tokens"], info["budget_met"] = limit, None if limit is None else budget.met(domain)
    if info["budget_met"] is False:
        log.warning("domain %r: the input held %d train tokens, fewer than its --max-tokens %d", domain,
                    info["train"]["tokens"], limit)


def recorded_max_token_id(directory: Path) -> int | None:
    """The largest token id prepare_data wrote for the domain of ``<data>/<split>/<domain>`` (None: unknown)."""
    found = read_summary(directory.parent.parent)
    info = found[1].get("domains", {}).get(directory.name) if found else None
    top = info.get("max_token_id") if isinstance(info, dict) else None
    return top if isinstance(top, int) and top >= 0 else None


class ShardError(ValueError):
    """A shard that does not match its ``index.json`` (truncated, overwritten, garbage bytes); the message names
    the domain, the shard file and, for a read, the sample."""


def file_identity(stat: os.stat_result) -> tuple[int, int]:
    """A file's device and inode: a file put in its place (prepare_data builds beside and renames) differs, the
    same file touched (a scratch-purge guard) does not."""
    return stat.st_dev, stat.st_ino


class MDSDomain:
    """Random access to the token sequences of one MDS directory written by :func:`prepare`.

    The index is parsed by streaming's own shard readers (which also decode samples); the shard files are
    memory-mapped on first use, so reading a sample is two slices of the page cache, in any order, with no
    shared memory, no file handle per read and no worker process. Opening checks every shard against the
    index (its size, its sample count and first and last offsets: a few bytes per shard; its identity is kept,
    and a shard file replaced before its first read is refused), and every read checks its sample's offsets
    and that no token id exceeds the largest one ``summary.json`` records for the
    domain (without one, the largest the model's vocabulary holds, when ``vocab_size`` is given), so a
    damaged shard is named instead of failing deep inside a batch (or the embedding).

    Args:
        directory: the directory holding ``index.json`` (``<data>/<split>/<domain>``).
        vocab_size: the model's vocabulary, the bound on token ids when ``summary.json`` records none.

    Raises:
        FileNotFoundError: no ``index.json``, or a shard file is missing (compressed-only shards included).
        ShardError: a shard whose size or header contradicts the index.
        ValueError: not MDS, or no ``tokens`` column.
    """

    def __init__(self, directory: str | Path, vocab_size: int | None = None):
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
        self.identities = [self._check_shard(shard) for shard in self.shards]
        self.starts = np.cumsum([0] + [shard.samples for shard in self.shards]).tolist()
        self.max_token_id = recorded_max_token_id(self.directory)
        self.bound = "that prepare_data wrote for this domain (summary.json)"
        if self.max_token_id is None and vocab_size is not None:
            self.max_token_id = vocab_size - 1
            self.bound = f"that the model's vocabulary of {vocab_size} holds (the data has no summary.json to check)"
        self._maps: dict[int, np.ndarray] = {}
        self.seq_len = len(self[0]) if len(self) else 0

    def _where(self, shard) -> str:
        return f"domain {self.directory.name!r}: shard {self.directory / shard.raw_data.basename}"

    def _check_shard(self, shard) -> tuple[int, int]:
        """Check ``shard`` against the index; its file's identity (device and inode), which a later
        read compares so that a file replaced since (a re-prepared data root) is not read as this one."""
        if getattr(shard, "column_names", None) is None or TOKENS not in shard.column_names:
            raise ValueError(f"{self.directory}: shards have no {TOKENS!r} column (not written by prepare_data)")
        shard.validate(allow_unsafe_types=False)
        path = self.directory / shard.raw_data.basename
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing (compressed shards are not read; re-run "
                                    "scripts/prepare_data.py)")
        stat = path.stat()
        size = stat.st_size
        if size != shard.raw_data.bytes:
            raise ShardError(f"{self._where(shard)} has {size} bytes, its index.json says {shard.raw_data.bytes} "
                             "(truncated or overwritten); re-run scripts/prepare_data.py")
        # an MDS shard: count n, n + 1 uint32 sample offsets (the last is the file size), its config, the samples
        with open(path, "rb") as handle:
            head = np.frombuffer(handle.read(8), np.uint32).tolist()
            handle.seek(4 * (shard.samples + 1))
            last = np.frombuffer(handle.read(4), np.uint32).tolist()
        if len(head) != 2 or head[0] != shard.samples or not 4 * (shard.samples + 2) <= head[1] <= size \
                or last != [size]:
            raise ShardError(f"{self._where(shard)}: its header (sample count {head[:1]}, offsets {head[1:]}..{last}) "
                             f"contradicts index.json ({shard.samples} samples, {size} bytes): the file is damaged; "
                             "re-run scripts/prepare_data.py")
        return file_identity(stat)

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int) -> np.ndarray:
        """Sequence ``index`` as an integer array of shape ``(seq_len,)``.

        Raises:
            IndexError: ``index`` out of range.
            ShardError: the sample's bytes are damaged (the domain, shard and sample are named).
        """
        if not 0 <= index < len(self):
            raise IndexError(f"{self.directory}: sample {index} out of range [0, {len(self)})")
        shard = bisect.bisect_right(self.starts, index) - 1
        data = self._map(shard)
        reader, local = self.shards[shard], index - self.starts[shard]
        begin, end = data[(1 + local) * 4:(3 + local) * 4].view(np.uint32).tolist()
        try:
            if not 4 * (reader.samples + 2) <= begin <= end <= len(data):
                raise ValueError(f"offsets {begin}..{end} outside the file's {len(data)} bytes")
            tokens = reader.decode_sample(data[begin:end].tobytes())[TOKENS]
            if self.max_token_id is not None and len(tokens) and int(tokens.max()) > self.max_token_id:
                raise ValueError(f"token id {int(tokens.max())} above the largest, {self.max_token_id}, {self.bound}")
            return tokens
        except (ValueError, TypeError) as err:
            raise ShardError(f"{self._where(reader)}: sample {local} (sample {index} of the domain) cannot be "
                             f"read: {err}; the file is damaged, re-run scripts/prepare_data.py") from err

    def _map(self, shard: int) -> np.ndarray:
        """The shard file as a read-only uint8 array over a memory map (the file handle is closed at once).

        Raises:
            ShardError: the file no longer has the size its index gives (changed since the run started).
        """
        if shard not in self._maps:
            reader = self.shards[shard]
            with open(self.directory / reader.raw_data.basename, "rb") as handle:
                stat = os.fstat(handle.fileno())
                if stat.st_size != reader.raw_data.bytes:
                    raise ShardError(f"{self._where(reader)} has {stat.st_size} bytes, its index.json says "
                                     f"{reader.raw_data.bytes} (changed since it was checked); re-run "
                                     "scripts/prepare_data.py")
                if file_identity(stat) != self.identities[shard]:
                    raise ShardError(f"{self._where(reader)} was replaced after this run opened the domain (a "
                                     f"re-prepared data root?): its samples may not be the ones the run planned "
                                     "for; let the run finish before replacing its data, or restart it")
                self._maps[shard] = np.frombuffer(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ), np.uint8)
        return self._maps[shard]

    def __getstate__(self) -> dict:
        """Pickle without the memory maps (they are re-opened on first read)."""
        return {**self.__dict__, "_maps": {}}


def open_domains(directories: list[str | Path], seq_len: int | None = None,
                 vocab_size: int | None = None) -> list[MDSDomain]:
    """Open one :class:`MDSDomain` per directory (token ids bound by ``vocab_size`` where no summary records
    them), checking every one is non-empty and ``seq_len`` long.

    Raises:
        ValueError: an empty domain, or sequences of another length (names ``data.seq_len``).
    """
    opened = []
    for directory in directories:
        domain = MDSDomain(directory, vocab_size)
        if len(domain) == 0:
            raise ValueError(f"{directory}: holds no sequences")
        if seq_len is not None and domain.seq_len != seq_len:
            raise ValueError(f"data.seq_len={seq_len} but {directory} holds sequences of {domain.seq_len} tokens")
        opened.append(domain)
    return opened
