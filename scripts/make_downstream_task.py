"""Build the items of the local downstream task ``demo_continuation`` from held-out demo text (no network).

    python scripts/make_downstream_task.py    # rewrites llmshear/tools/tasks/demo_continuation/items.jsonl

Deterministic for a given ``--seed``, Python and set of installed packages (the demo corpus's sources). Items
come only from documents that start after ``--skip-chars`` characters of their domain, twice the demo's
``--max-chars`` by default (see llmshear/tools/tasks/continuation.py). Prints one JSON line (items per domain).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
from pathlib import Path

from llmshear.tools.demo import DOMAINS
from llmshear.tools.tasks import TASKS_DIR
from llmshear.tools.tasks.continuation import build_items, write_items

log = logging.getLogger("make_downstream_task")
DEMO_MAX_CHARS = 600_000  # scripts/demo.sh's make_demo_corpus.py --max-chars (tests/test_downstream.py checks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=TASKS_DIR / "demo_continuation" / "items.jsonl",
                        help="the items file (default: the task's own)")
    parser.add_argument("--per-domain", type=int, default=80, help="items per domain (default: 80)")
    parser.add_argument("--skip-chars", type=int, default=2 * DEMO_MAX_CHARS,
                        help=f"characters of each domain never used (default: {2 * DEMO_MAX_CHARS})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.skip_chars < DEMO_MAX_CHARS:
        parser.error(f"--skip-chars {args.skip_chars}: below the demo's {DEMO_MAX_CHARS}, items would be trained on")
    try:
        items = build_items(DOMAINS, args.per_domain, args.skip_chars, args.seed)
    except ValueError as err:
        log.error("%s", err)
        return 2
    write_items(items, args.out)
    counts = collections.Counter(item["domain"] for item in items)
    log.info("wrote %d items to %s", len(items), args.out)
    print(json.dumps({"out": str(args.out), "items": len(items), "domains": dict(counts), "seed": args.seed,
                      "skip_chars": args.skip_chars}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
