"""PNG plots of one or more runs from their ``metrics.jsonl``: domain weights, loss gaps, sparsity, undecided gates.

    python scripts/plot_run.py out/demo/runs/demo_prune out/demo/runs/demo_continue --out out/demo/plots

Runs given together are drawn one after the other along the x-axis (a dotted line marks where the next run
starts), so a pruning run and its continued pre-training read as one training history. Writes
``domain_weights.png``, ``loss_gap.png`` and (when a run pruned) ``sparsity.png`` and ``undecided.png``; an
existing ``--out`` is refused unless ``--overwrite``. Prints one JSON line with the files written.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (the backend must be chosen first)

from llmshear.loggers import METRICS_FILE, read_metrics  # noqa: E402

log = logging.getLogger("plot_run")

PANELS = {
    "domain_weights.png": (r"dynamic_loading/weight/(.+)", "domain weight", "Domain proportions over training"),
    "loss_gap.png": (r"dynamic_loading/gap/(.+)", "eval loss - reference loss", "Loss gap per domain"),
    "sparsity.png": (r"l0/(.+)/expected_sparsity", "expected sparsity", "Expected sparsity per structure "
                                                                          "(dashed: target)"),
    "undecided.png": (r"l0/(.+)/undecided", "fraction of gates with 0.05 < P(gate != 0) < 0.95",
                      "Undecided gates per structure"),
}
TARGET = "l0/{}/target_sparsity"


def series(runs: list[list[dict]], pattern: str) -> tuple[dict[str, tuple[list, list]], list[int]]:
    """``{name: (batches, values)}`` of every key matching ``pattern``, runs laid end to end, and the run starts.

    A batch logged twice (a resumed run) keeps its last value; a NaN or infinite value is drawn as a gap.
    """
    regex = re.compile(pattern)
    merged: dict[str, dict[int, float]] = {}
    offset, starts = 0, []
    for rows in runs:
        starts.append(offset)
        last = 0
        for row in rows:
            batch = row.get("batch") or 0
            last = max(last, batch)
            for key, value in row.items():
                match = regex.fullmatch(key)
                if match and isinstance(value, int | float):
                    merged.setdefault(match.group(1), {})[offset + batch] = value if math.isfinite(value) else math.nan
        offset += last
    return {name: (sorted(points), [points[b] for b in sorted(points)]) for name, points in merged.items()}, starts


def draw(path: Path, curves: dict, starts: list[int], ylabel: str, title: str, targets: dict | None = None) -> None:
    """One line per curve (and dashed targets in the same colour), run boundaries dotted."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, (x, y) in sorted(curves.items()):
        (line,) = ax.plot(x, y, marker="." if len(x) < 30 else None, label=name)
        if targets and name in targets:
            ax.plot(*targets[name], linestyle="--", color=line.get_color())
    for start in starts[1:]:
        ax.axvline(start, color="grey", linestyle=":")
    ax.set(xlabel="batch", ylabel=ylabel, title=title)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_runs(run_dirs: list[Path], out: Path) -> list[str]:
    """Write the plots of ``run_dirs`` into ``out``; returns the file names written."""
    runs = [read_metrics(d / METRICS_FILE) for d in run_dirs]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (pattern, ylabel, title) in PANELS.items():
        curves, starts = series(runs, pattern)
        if not curves:
            log.info("%s: nothing logged matches %s, skipped", name, pattern)
            continue
        targets = series(runs, TARGET.format("(.+)"))[0] if name == "sparsity.png" else None
        draw(out / name, curves, starts, ylabel, title, targets)
        written.append(name)
    return written


def main(argv: list[str] | None = None) -> int:
    """Plot; 2 when a run folder has no metrics or ``--out`` exists."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (holding metrics.jsonl), in training order")
    parser.add_argument("--out", type=Path, required=True, help="directory for the PNG files")
    parser.add_argument("--overwrite", action="store_true", help="replace plots in an existing --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    missing = [str(d / METRICS_FILE) for d in args.runs if not (d / METRICS_FILE).is_file()]
    if missing:
        log.error("no metrics: %s (is it a train.py run folder?)", ", ".join(missing))
        return 2
    if args.out.exists() and not args.overwrite:
        log.error("%s exists; pass --overwrite to replace its plots", args.out)
        return 2
    written = plot_runs(args.runs, args.out)
    print(json.dumps({"out": str(args.out), "files": written}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
