"""Plan a run before launching it: GPU/host memory, disk, FLOPs and hours of a recipe (see docs/recipes.md).

    python scripts/plan.py RECIPE.yaml [key=value ...] [--gpus 8] [--gpu a100-80g|h100-80g|h200] [--mfu 0.3]
    python scripts/plan.py yaml/prune_1.3b.yaml --source llama2-7b          # a public shape, no download
    python scripts/plan.py yaml/continue_1.3b.yaml --after yaml/prune_1.3b.yaml --source llama2-7b

The recipe is validated as train.py validates it, except for files that do not exist yet (data, checkpoints,
``*_from`` files); only the source's ``config.json`` is read, and environment variables the recipe reads but that
are unset (``DATA_DIR``, ``RUN_DIR``) are planned as ``<NAME>``. Options and ``key=value`` overrides mix in any
order. ``--source`` replaces ``model.pretrained`` (an HF
directory, a ``.gguf`` file or a preset such as ``llama2-7b``, ``sheared-llama-1.3b``); ``--after`` plans a
continued run whose source is the cut model of that pruning recipe (read the same way, ``--source`` applying to
it). Prints a table and one JSON line (``--markdown``: one row of the docs' resource table instead).
Exit status 2 for a bad recipe or option, with the problems named.
"""

from __future__ import annotations

import argparse
import logging
import sys
from contextlib import ExitStack

from llmshear.config import ConfigError
from llmshear.tools.plan import (
    GPUS,
    Machine,
    cut_source,
    json_line,
    load_recipe,
    markdown_header,
    markdown_row,
    placeholder_environment,
    plan,
)
from llmshear.tools.plan import table as render_table
from llmshear.tools.plan import warnings as plan_warnings

log = logging.getLogger("plan")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs in the run (default 8)")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu", choices=sorted(GPUS), default="a100-80g")
    parser.add_argument("--mfu", type=float, help="model FLOPs utilisation (default: the paper's throughput)")
    parser.add_argument("--source", help="replaces model.pretrained: HF dir, .gguf or preset (e.g. llama2-7b)")
    parser.add_argument("--after", metavar="PRUNE_RECIPE", help="the source is this pruning recipe's cut model")
    parser.add_argument("--markdown", action="store_true", help="print one row of the docs' resource table")
    parser.add_argument("--header", action="store_true", help="with --markdown: the table's header first")
    args = parser.parse_intermixed_args(argv)
    if args.gpus < 1 or args.gpus_per_node < 1 or (args.mfu is not None and not 0 < args.mfu <= 1):
        parser.error("--gpus and --gpus-per-node must be positive, --mfu in (0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    args = parse(sys.argv[1:] if argv is None else argv)
    machine = Machine(args.gpu, args.gpus, args.gpus_per_node, args.mfu)
    try:
        with ExitStack() as stack:
            unset = stack.enter_context(placeholder_environment(*[r for r in (args.recipe, args.after) if r]))
            if unset:
                log.info("planning with %s unset (read as <NAME>): a plan reads no data or run folder",
                         ", ".join(unset))
            source = args.source
            if args.after:
                extra = [f"model.pretrained={args.source}"] if args.source else []
                source = stack.enter_context(cut_source(args.after, extra))
            result = plan(load_recipe(args.recipe, args.overrides, args.gpus, source), machine, args.recipe)
    except (ConfigError, ValueError) as err:
        log.error("%s", err)
        return 2
    for warning in plan_warnings(result):
        log.warning("%s", warning)
    if args.markdown:
        print((markdown_header() + "\n" if args.header else "") + markdown_row(result))
    else:
        print(render_table(result))
        print(json_line(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
