"""Downstream accuracy of one or more models through EleutherAI's lm-evaluation-harness.

    python scripts/eval_downstream.py --model out/final                                # the paper's tasks (hub)
    python scripts/eval_downstream.py --model smollm2 --model out/demo/pruned --model out/demo/final \
        --tasks demo_continuation                                                       # ours, offline

``--model``: an HF directory, ``smollm2``, a ``.gguf`` file or a hub name. ``--tasks``: lm-eval task names, each
with an optional shot count (``arc_challenge:25``); the default is Sheared-LLaMA's list with its shots. With only
our local tasks (``demo_continuation``) nothing touches the network (``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE``
are set). Prints a table (tasks x models, percent), then one JSON line with every number.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

log = logging.getLogger("eval_downstream")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from llmshear.models.llama import DTYPES
    from llmshear.tools.downstream import PAPER_TASKS, parse_task

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="model source (repeatable)")
    parser.add_argument("--tokenizer", help="tokenizer source for models saved without one (HF dir, .gguf, smollm2)")
    parser.add_argument("--tasks", nargs="+", default=[f"{s.name}:{s.shots}" for s in PAPER_TASKS],
                        help="NAME[:SHOTS] ... (default: the paper's tasks)")
    parser.add_argument("--limit", type=int, help="evaluate the first N items of each task only")
    parser.add_argument("--batch-size", default="8", help="sequences per forward pass, or 'auto' (default: 8)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="model dtype (default: float32)")
    args = parser.parse_args(argv)
    try:
        args.tasks = [parse_task(text) for text in args.tasks]
    except ValueError as err:
        parser.error(str(err))
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit {args.limit}: must be positive")
    if args.batch_size != "auto" and not (args.batch_size.isdigit() and int(args.batch_size) > 0):
        parser.error(f"--batch-size {args.batch_size!r}: a positive integer or 'auto'")
    args.batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    return args


def main(argv: list[str] | None = None) -> int:
    """Evaluate every ``--model`` on every task; 2 on a bad argument, model or task."""
    from llmshear.tools.downstream import all_local, go_offline, is_local_model

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    offline = all_local(args.tasks)
    go_offline(datasets=offline, hub=offline and all(is_local_model(m) for m in args.model))
    # lm-eval, datasets and transformers read the variables above when imported, so they are imported after.
    from llmshear.tools.downstream import evaluate, format_table, load_lm, task_manager
    from llmshear.tools.evaluation import check_device

    try:
        check_device(args.device)
        manager = task_manager(args.tasks)
        results = {}
        for source in args.model:
            log.info("evaluating %s", source)
            lm = load_lm(source, args.tokenizer, args.device, args.dtype, args.batch_size)
            results[source] = evaluate(lm, args.tasks, manager, args.limit)
    except (OSError, ValueError) as err:
        log.error("%s", err)
        return 2
    print(format_table(results))
    print(json.dumps({"tasks": [spec.name for spec in args.tasks], "limit": args.limit, "models": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
