"""Benchmark data loading (ours vs streaming's StreamingDataset, vs what training consumes) and tokenization.

    python scripts/bench_data.py                 # builds its own shards and corpus in a temporary directory

The last line printed is one JSON object: samples/s at seq 512 and 4096 with the ratios, and tokenization
tokens/s with 1 and 2 workers. Goals: ratio_vs_streaming >= 0.8 and every ratio_vs_training_* >= 100.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("bench_data")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", default="smollm2", help="tokenizer for the tokenization benchmark")
    parser.add_argument("--corpus-chars", type=int, default=600_000, help="characters per demo domain to tokenize")
    parser.add_argument("--samples", type=int, default=4000, help="samples measured per loader at seq 512")
    args = parser.parse_args(argv)
    # imported here, not at the top: tokenizer worker processes re-import this script and must stay light
    from llmshear.datasets.bench import loading_report, tokenization_report
    from llmshear.datasets.demo import make_demo_corpus

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
