"""Training over per-domain streams with proportions that change during the run, and the per-domain eval set.

How a global batch ``b`` of ``G`` samples is drawn (identically on every rank):

1. its ``G`` domains are drawn i.i.d. from the current proportions with a generator seeded by
   ``(seed, b)``, so the draw depends on nothing but the batch index and the proportions;
2. each position takes the next sample of its domain's walk: a permutation seeded by
   ``(seed, domain, pass)``; when a domain runs out, its next pass starts with a new permutation
   (no crash, however long the run; no sample repeats within a pass);
3. rank ``r`` keeps positions ``[r·B, (r+1)·B)`` of the global batch (``B = G / world size``), so no sample
   appears on two ranks, and every rank holds the same state.

The state (batch index, per-domain position and pass, proportions) is small and identical on every rank, so
Composer's checkpoint resumes the exact sequence an uninterrupted run draws.

A run reads only its part of each domain's train split, ``data.train_range = [begin, end]`` (fractions): samples
``[floor(begin·n), floor(end·n))`` of a domain of ``n``. Pruning and continued pre-training take adjacent
ranges, so the two stages never read the same sequence (the paper uses separate data for them); the eval
split is a separate set of sequences written by ``prepare_data.py``.

Worker processes are refused (``data.num_workers`` must be 0): a worker holds a copy of the dataset, so a
proportion set by the callback would reach it only after its prefetched batches, and the resumed state
would not match what was trained on. Reading a sample is a file read of ``seq_len`` tokens (see
``scripts/bench_data.py``), far faster than a training step consumes it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from llmshear.batch import IGNORE_INDEX
from llmshear.datasets.mds import open_domains
from llmshear.datasets.proportions import validate_proportions

log = logging.getLogger(__name__)

_DRAW, _WALK = 0, 1  # stream tags that keep the domain-draw and permutation generators independent
STATE_VERSION = 1


def _world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``(rank, world_size)``, each defaulting to what ``composer.utils.dist`` reports."""
    if rank is None or world_size is None:
        from composer.utils import dist

        rank = dist.get_global_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world size {world_size})")
    return rank, world_size


def part_bounds(size: int, train_range: Sequence[float]) -> tuple[int, int]:
    """``[start, stop)`` sample indices that ``train_range = [begin, end]`` selects of a domain of ``size``.

    Adjacent ranges (``[0, x]`` and ``[x, 1]``) split a domain without overlap or gap.
    """
    begin, end = train_range
    return int(np.floor(begin * size)), size if end >= 1 else int(np.floor(end * size))


class DomainPart(Sequence):
    """Samples ``[start, stop)`` of one domain's source, indexed from 0."""

    def __init__(self, source: Sequence[np.ndarray], start: int, stop: int):
        self.source, self.start, self.stop = source, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range [0, {len(self)})")
        return self.source[self.start + index]


def open_train_parts(directories: Sequence[str | Path], seq_len: int | None,
                     train_range: Sequence[float] = (0.0, 1.0), vocab_size: int | None = None) -> list[DomainPart]:
    """Each domain's MDS train split, cut to ``train_range`` (see the module docstring); token ids checked
    against ``vocab_size`` where no summary records them (:class:`~llmshear.datasets.mds.MDSDomain`).

    Raises:
        ValueError: a domain of which the range selects no sample (named), and what :func:`open_domains` raises.
    """
    parts = []
    for directory, domain in zip(directories, open_domains(directories, seq_len, vocab_size), strict=True):
        part = DomainPart(domain, *part_bounds(len(domain), train_range))
        if len(part) == 0:
            raise ValueError(f"data.train_range={list(train_range)} selects no sample of domain "
                             f"{Path(directory).name!r} ({len(domain)} train sequences)")
        parts.append(part)
    return parts


def _sample(tokens: np.ndarray, domain: int, sample_id: int) -> dict:
    """One sample: ``input_ids`` ``(T,)`` int64, ``labels`` (the same tensor: the DataLoader's collate stacks
    each key into its own batch tensor), ``domain`` and ``sample_id`` ints."""
    ids = torch.from_numpy(tokens.astype(np.int64))
    return {"input_ids": ids, "labels": ids, "domain": domain, "sample_id": sample_id}


class DynamicDomainDataset(IterableDataset):
    """Infinite stream of samples drawn by domain proportions (see the module docstring for the scheme).

    Args:
        sources: per domain, a sequence of token arrays ``(T,)`` (e.g. :class:`~llmshear.datasets.mds.MDSDomain`).
        domains: the domain names, same order (batches carry the index into this list).
        proportions: initial weights, summing to 1.
        global_batch_size: samples per global batch (all ranks together); divisible by ``world_size``.
        seed: seeds both the domain draws and the walks.
        rank, world_size: this process's place (default: from ``composer.utils.dist``).

    Attributes:
        domains: the domain names.
        proportions: the current weights (list of floats).
    """

    def __init__(self, sources: Sequence[Sequence[np.ndarray]], domains: Sequence[str], proportions: Sequence[float],
                 global_batch_size: int, seed: int = 17, rank: int | None = None, world_size: int | None = None):
        super().__init__()
        self.rank, self.world_size = _world(rank, world_size)
        if len(sources) != len(domains):
            raise ValueError(f"{len(sources)} sources for {len(domains)} domains")
        if global_batch_size <= 0 or global_batch_size % self.world_size:
            raise ValueError(f"global batch size {global_batch_size} must be a positive multiple of the world size "
                             f"{self.world_size}")
        self.sources, self.domains = list(sources), list(domains)
        self.sizes = [len(s) for s in self.sources]
        if min(self.sizes) == 0:
            raise ValueError(f"domain {self.domains[self.sizes.index(0)]!r} has no samples")
        self.offsets = np.cumsum([0] + self.sizes[:-1]).tolist()
        self.part_starts = [int(getattr(s, "start", 0)) for s in self.sources]
        self.global_batch_size, self.seed = global_batch_size, seed
        self.batch_size = global_batch_size // self.world_size
        self._weights = validate_proportions(proportions, self.domains)
        self._batch = 0
        self._positions = [0] * len(self.domains)
        self._passes = [0] * len(self.domains)
        self._walks: dict[int, tuple[int, np.ndarray]] = {}

    @property
    def proportions(self) -> list[float]:
        return self._weights.tolist()

    @property
    def batch_index(self) -> int:
        """Global batches drawn so far (the next batch's index)."""
        return self._batch

    def set_proportions(self, proportions: Sequence[float]) -> None:
        """Use ``proportions`` from the next global batch on.

        Raises:
            ValueError: wrong length, negative values, or a sum other than 1.
        """
        self._weights = validate_proportions(proportions, self.domains, key="proportions")

    def _walk(self, domain: int) -> np.ndarray:
        """The permutation of ``domain``'s samples for its current pass (cached)."""
        current = self._passes[domain]
        cached = self._walks.get(domain)
        if cached is None or cached[0] != current:
            rng = np.random.default_rng([self.seed, _WALK, domain, current])
            cached = (current, rng.permutation(self.sizes[domain]))
            self._walks[domain] = cached
        return cached[1]

    def _take(self, domain: int) -> int:
        """The next sample index of ``domain``'s walk; a finished pass starts the next, reshuffled."""
        index = int(self._walk(domain)[self._positions[domain]])
        self._positions[domain] += 1
        if self._positions[domain] == self.sizes[domain]:
            self._positions[domain] = 0
            self._passes[domain] += 1
        return index

    def next_global_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """Draw the next global batch and advance the state.

        Returns:
            ``(domains, indices)``, both ``(G,)`` int64: each position's domain and sample index within it.
        """
        rng = np.random.default_rng([self.seed, _DRAW, self._batch])
        domains = rng.choice(len(self.domains), size=self.global_batch_size, p=self._weights)
        indices = np.array([self._take(int(d)) for d in domains], dtype=np.int64)
        self._batch += 1
        return domains, indices

    def __iter__(self) -> Iterator[dict]:
        """This rank's samples, batch after batch, continuing from the current state (never ends)."""
        start = self.rank * self.batch_size
        while True:
            domains, indices = self.next_global_batch()
            for d, i in zip(domains[start:start + self.batch_size].tolist(),
                            indices[start:start + self.batch_size].tolist(), strict=True):
                yield _sample(self.sources[d][i], d, self.offsets[d] + i)

    def state_dict(self, num_samples: int | None = None, from_beginning: bool = True) -> dict:
        """The resumable state, identical on every rank (Composer calls this when checkpointing).

        Args:
            num_samples: samples the trainer consumed (all ranks); only checked against the batches drawn.
            from_beginning: unused (the state is absolute).
        """
        del from_beginning
        if num_samples is not None and num_samples != self._batch * self.global_batch_size:
            log.warning("trainer consumed %d samples but %d batches of %d were drawn: the checkpoint resumes "
                        "after the drawn batches", num_samples, self._batch, self.global_batch_size)
        return {"version": STATE_VERSION, "domains": self.domains, "sizes": self.sizes,
                "part_starts": self.part_starts, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "batch": self._batch,
                "positions": list(self._positions), "passes": list(self._passes), "proportions": self.proportions}

    def load_state_dict(self, obj: dict) -> None:
        """Resume from :meth:`state_dict`'s output (Composer calls this when loading a checkpoint).

        Raises:
            ValueError: the checkpoint was drawn over other domains, data, seed or global batch size.
        """
        expected = {"domains": self.domains, "sizes": self.sizes, "part_starts": self.part_starts, "seed": self.seed,
                    "global_batch_size": self.global_batch_size}
        found = {"part_starts": [0] * len(self.domains)} | obj  # states written before data.train_range started at 0
        problems = [f"{key}: checkpoint has {found.get(key)!r}, this run {value!r}"
                    for key, value in expected.items() if found.get(key) != value]
        if problems:
            raise ValueError("the train data state in the checkpoint does not fit this run (an exact resume "
                             "needs the same data, domains, data.train_range, seed and train.global_batch_size): "
                             + "; ".join(problems))
        self._batch = int(obj["batch"])
        self._positions = [int(p) for p in obj["positions"]]
        self._passes = [int(p) for p in obj["passes"]]
        self._weights = validate_proportions(obj["proportions"], self.domains, key="checkpoint proportions")
        self._walks.clear()


class DomainEvalDataset(IterableDataset):
    """Every eval sample of every domain exactly once, each tagged with its domain.

    Domains are interleaved round-robin (sample 0 of each domain, then sample 1, …; a domain that runs out
    is skipped), each walked in order, so an evaluation cut short by ``train.eval_batches`` still sees every
    domain. Rank ``r`` takes every ``world_size``-th sample; ranks with one sample fewer get a padding sample
    (``labels`` all ``-100``, ``domain`` and ``sample_id`` ``-1``) that no metric counts, so every rank runs
    the same number of batches (Composer stops all ranks when the first runs out).

    Args:
        sources: per domain, a sequence of token arrays ``(T,)``.
        domains: the names, same order.
        rank, world_size: default from ``composer.utils.dist``.
    """

    def __init__(self, sources: Sequence[Sequence[np.ndarray]], domains: Sequence[str], rank: int | None = None,
                 world_size: int | None = None):
        super().__init__()
        self.rank, self.world_size = _world(rank, world_size)
        self.sources, self.domains = list(sources), list(domains)
        sizes = [len(s) for s in self.sources]
        offsets = np.cumsum([0] + sizes[:-1]).tolist()
        self.order = [(d, i, offsets[d] + i) for i in range(max(sizes, default=0)) for d in range(len(sizes))
                      if i < sizes[d]]

    def __len__(self) -> int:
        """Samples on this rank, padding included: ``ceil(total / world_size)``."""
        return -(-len(self.order) // self.world_size)

    def __iter__(self) -> Iterator[dict]:
        mine = self.order[self.rank::self.world_size]
        for d, i, sample_id in mine:
            yield _sample(self.sources[d][i], d, sample_id)
        for _ in range(len(self) - len(mine)):
            pad = _sample(self.sources[self.order[0][0]][0], -1, -1)  # any real tokens; no label counts
            pad["labels"] = torch.full_like(pad["input_ids"], IGNORE_INDEX)
            yield pad


def calibration_batches(parts: Sequence[DomainPart], domains: Sequence[str], proportions: Sequence[float],
                        batch_size: int, count: int, seed: int) -> list[torch.Tensor]:
    """``count`` batches of input ids ``(batch_size, seq_len)``, drawn as a training stream with ``seed`` draws
    them: calibration data for importance scores (``pruning.init: importance``, the one-shot baseline).

    The stream is a separate copy, as rank 0 of 1, so every rank gets the same batches and no training loader
    is touched (a run with importance init trains on exactly the sequence a run with constant init draws).
    """
    stream = iter(DynamicDomainDataset(parts, domains, proportions, global_batch_size=batch_size, seed=seed,
                                       rank=0, world_size=1))
    return [torch.stack([next(stream)["input_ids"] for _ in range(batch_size)]) for _ in range(count)]


def build_train_dataloader(directories: Sequence[str | Path], domains: Sequence[str], proportions: Sequence[float],
                           batch_size: int, seq_len: int | None = None, seed: int = 17, num_workers: int = 0,
                           rank: int | None = None, world_size: int | None = None,
                           train_range: Sequence[float] = (0.0, 1.0), vocab_size: int | None = None) -> DataLoader:
    """The training ``DataLoader`` over one MDS directory per domain (what Composer gets as ``train_dataloader``).

    Args:
        directories: ``data.path/<train_split>/<domain>`` for each domain, in ``domains`` order.
        domains: ``data.domains``.
        proportions: ``data.proportions``, the initial weights.
        batch_size: samples per rank per batch (``train.global_batch_size / world size``).
        seq_len: ``data.seq_len``; every shard must hold sequences of exactly this length (None: not checked).
        seed: the run's ``seed``.
        num_workers: ``data.num_workers``; must be 0 (see the module docstring).
        rank, world_size: default from ``composer.utils.dist``.
        train_range: ``data.train_range``, the part of each domain this run reads.
        vocab_size: the model's vocabulary: token ids are checked against it where no summary records them.

    Raises:
        ValueError: ``num_workers > 0``, bad proportions, a sequence length mismatch, an empty domain or part.
        FileNotFoundError: a directory without MDS data.
    """
    if num_workers != 0:
        raise ValueError(f"data.num_workers={num_workers}: must be 0. Worker processes hold copies of the dataset, "
                         "so proportion updates would reach them late and resumption would not be exact; loading in "
                         "the main process is far faster than training consumes (scripts/bench_data.py)")
    rank, world_size = _world(rank, world_size)
    parts = open_train_parts(directories, seq_len, train_range, vocab_size)
    dataset = DynamicDomainDataset(parts, domains, proportions, global_batch_size=batch_size * world_size,
                                   seed=seed, rank=rank, world_size=world_size)
    return DataLoader(dataset, batch_size=batch_size, num_workers=0)


def build_eval_dataloader(directories: Sequence[str | Path], domains: Sequence[str], batch_size: int,
                          seq_len: int | None = None, rank: int | None = None,
                          world_size: int | None = None, vocab_size: int | None = None) -> DataLoader:
    """The evaluation ``DataLoader``: every domain's eval split once (see :class:`DomainEvalDataset`).

    Args:
        directories: ``data.path/<eval_split>/<domain>`` for each domain, in ``domains`` order.
        domains: ``data.domains``.
        batch_size: samples per rank per eval batch (``train.eval_batch_size`` or the micro batch size).
        seq_len: ``data.seq_len`` (None: not checked).
        rank, world_size: default from ``composer.utils.dist``.
        vocab_size: as for :func:`build_train_dataloader`.
    """
    dataset = DomainEvalDataset(open_domains(directories, seq_len, vocab_size), domains, rank=rank,
                                world_size=world_size)
    return DataLoader(dataset, batch_size=batch_size, num_workers=0)
