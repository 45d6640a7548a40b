"""Benchmark data loading (ours vs streaming's StreamingDataset, vs what training consumes) and tokenization.

    python scripts/bench_data.py                 # builds its own shards and corpus in a temporary directory

Loading is measured as samples/s out of a ``DataLoader`` in the main process (``num_workers=0``, what training
uses), each sample converted to int64 tensors, for our ``DynamicDomainDataset`` and for streaming's own
``StreamingDataset`` over the same shards; then compared with what training consumes. The last line printed is
one JSON object: samples/s at seq 512 and 4096 with the ratios, and tokenization tokens/s with 1 and 2 workers.
Goals: ratio_vs_streaming >= 0.8 and every ratio_vs_training_* >= 100.

Heavy modules are imported inside the functions: tokenizer worker processes re-import this script and must
start light.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("bench_data")

# Tokens/s that one training process consumes (STACK_NOTES.md and the Sheared-LLaMA README).
TRAINING_TOKENS_PER_S = {"cpu_smollm2_135m": 125.0, "gpu_prune_7b": 2000.0, "gpu_continue_1.3b": 8684.0}
BATCH = 8


def write_random_shards(root: Path, domains: int, samples: int, seq_len: int, vocab: int = 49152) -> list[Path]:
    """``domains`` MDS directories of ``samples`` random sequences each; returns them."""
    import numpy as np
    from streaming import MDSWriter

    from llmshear.datasets.mds import TOKENS

    rng = np.random.default_rng(0)
    dirs = []
    for d in range(domains):
        directory = root / f"seq{seq_len}" / f"domain{d}"
        with MDSWriter(out=str(directory), columns={TOKENS: f"ndarray:uint16:{seq_len}"}) as writer:
            for row in rng.integers(0, vocab, size=(samples, seq_len), dtype=np.uint16):
                writer.write({TOKENS: row})
        dirs.append(directory)
    return dirs


def _rate(loader, samples: int) -> float:
    """Samples/s over ``samples`` samples of ``loader``, after one warm-up batch."""
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    count = sum(len(batch["input_ids"]) for batch in itertools.islice(iterator, samples // BATCH))
    return count / (time.perf_counter() - start)


def ours_rate(dirs: list[Path], samples: int) -> float:
    """Samples/s of our ``DynamicDomainDataset`` (uniform proportions) through a ``DataLoader``."""
    from torch.utils.data import DataLoader

    from llmshear.datasets.dynamic import DynamicDomainDataset
    from llmshear.datasets.mds import open_domains

    sources = open_domains(dirs)
    weights = [1 / len(dirs)] * len(dirs)
    dataset = DynamicDomainDataset(sources, [d.name for d in dirs], weights, BATCH, seed=0, rank=0, world_size=1)
    return _rate(DataLoader(dataset, batch_size=BATCH), samples)


def _collate_streaming(samples: list[dict]) -> dict:
    import numpy as np
    import torch

    from llmshear.datasets.mds import TOKENS

    ids = torch.from_numpy(np.stack([s[TOKENS] for s in samples]).astype(np.int64))
    return {"input_ids": ids, "labels": ids.clone()}


def streaming_rate(dirs: list[Path], samples: int) -> float:
    """Samples/s of streaming's ``StreamingDataset`` (shuffled, local shards) through a ``DataLoader``."""
    from streaming import Stream, StreamingDataset
    from streaming.base.util import clean_stale_shared_memory
    from torch.utils.data import DataLoader

    clean_stale_shared_memory()
    dataset = StreamingDataset(streams=[Stream(local=str(d)) for d in dirs], batch_size=BATCH, shuffle=True,
                               shuffle_seed=0)
    return _rate(DataLoader(dataset, batch_size=BATCH, collate_fn=_collate_streaming), samples)


def loading_report(root: Path, seq_len: int, samples_per_domain: int, measured: int) -> dict:
    """Our and streaming's samples/s at ``seq_len``, their ratio, and the margin over training's consumption."""
    dirs = write_random_shards(root, 3, samples_per_domain, seq_len)
    ours, theirs = ours_rate(dirs, measured), streaming_rate(dirs, measured)
    report = {"ours_samples_per_s": round(ours, 1), "streaming_samples_per_s": round(theirs, 1),
              "ratio_vs_streaming": round(ours / theirs, 3)}
    for name, tokens_per_s in TRAINING_TOKENS_PER_S.items():
        report[f"ratio_vs_training_{name}"] = round(ours * seq_len / tokens_per_s, 1)
    return report


def tokenization_report(corpus: Path, tokenizer: str, workers: tuple[int, ...] = (1, 2)) -> dict:
    """Tokens/s of :func:`~llmshear.datasets.packing.tokenize_all` over ``corpus`` for each worker count.

    The time includes starting the worker processes (not loading the tokenizer, done once before).
    """
    from llmshear.datasets.jsonl import find_domains
    from llmshear.datasets.mds import fast_tokenizer
    from llmshear.datasets.packing import file_tasks, tokenize_all

    tokenizer_json, eos_id, _ = fast_tokenizer(tokenizer)
    files = find_domains(corpus)
    report = {"tokenizer": tokenizer, "files": sum(len(f) for f in files.values())}
    for count in workers:
        start = time.perf_counter()
        results = tokenize_all(file_tasks(files), tokenizer_json, eos_id, count, progress=False)
        tokens = sum(len(part.tokens) for r in results for part in r.parts.values())
        report[f"workers_{count}_tokens_per_s"] = round(tokens / (time.perf_counter() - start))
        report["tokens"] = tokens
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", default="smollm2", help="tokenizer for the tokenization benchmark")
    parser.add_argument("--corpus-chars", type=int, default=600_000, help="characters per demo domain to tokenize")
    parser.add_argument("--samples", type=int, default=4000, help="samples measured per loader at seq 512")
    args = parser.parse_args(argv)
    from llmshear.tools.demo import make_demo_corpus

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = {}
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        root = Path(tmp)
        for seq_len, per_domain, measured in ((512, 2000, args.samples), (4096, 400, args.samples // 4)):
            result[f"seq_{seq_len}"] = loading_report(root / "shards", seq_len, per_domain, measured)
            log.info("seq %d: %s", seq_len, result[f"seq_{seq_len}"])
        make_demo_corpus(root / "corpus", max_chars=args.corpus_chars, docs_per_file=10)
        result["tokenize"] = tokenization_report(root / "corpus", args.tokenizer)
        log.info("tokenization: %s", result["tokenize"])
    ratios = [v for key in ("seq_512", "seq_4096") for k, v in result[key].items() if k.startswith("ratio_vs_train")]
    result["goals_met"] = all(result[k]["ratio_vs_streaming"] >= 0.8 for k in ("seq_512", "seq_4096")) and \
        min(ratios) >= 100
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
