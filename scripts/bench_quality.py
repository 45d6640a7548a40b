"""A miniature Sheared-LLaMA experiment: ways to reach one target shape on one compute budget, compared.

    python scripts/bench_quality.py --out out/bench_quality [--data out/demo/data | --corpus DIR] [--match flops|tokens]
        [--budget 1.0] [--prune-budget 1.0] [--arms ours,importance,short,ours@18,importance@18] [--prune-only]

SmolLM2-135M (the embedded GGUF) is brought to the demo target (d_model 384, 20 layers, 6 heads / 2 KV heads,
intermediate 1024) by each of these arms, which spend the same training FLOPs (``--match flops``, the default) or
train on the same number of tokens (``--match tokens``), and are evaluated alike:

1. ``ours``: learned L0 gates (pruning run) + continued pre-training, both with dynamic batch loading, with the
   demo recipes ``yaml/demo/prune.yaml`` and ``yaml/demo/continue.yaml`` as they are (the shipped defaults);
2. ``paper``: as 1 with the settings of the paper, our previous defaults (:data:`PAPER_PRUNE` merged into the
   pruning recipe, :data:`PAPER_CONTINUE` into the continue recipe);
3. ``importance``: one-shot activation-importance pruning (Minitron-style scores on a few calibration batches,
   training sequences drawn by a seeded permutation), then continued pre-training;
4. ``random``: a seeded random structured selection of the target shape, then continued pre-training;
5. ``scratch``: the target architecture from random initialisation;
6. ``constant``: as 1 with constant domain proportions (``data.update: constant``) in both stages;
7. ``distill``: as 1 with logit distillation from the source (``distill.alpha`` 0.5) in both stages;
8. ``importance-distill``: as 3 with the same distillation in its continued pre-training (Minitron's recipe:
   one-shot importance pruning, then distillation), the baseline to set against 7;
9. ``fixed-ranking``: as 1 with the gate logits not trained (``lag_lr`` 0): the importance order removed
   gradually, the ablation that says what learning the selection adds;
10. ``row``: as 1 with per-row Lagrange multipliers and the schedule the 7B recipes had until they shipped
    ``exact`` (:data:`ROW`);
11. ``cluster``: as 1 with the 7B recipes' pruning keys as shipped (read from ``yaml/prune_1.3b.yaml``);
12. ``freeze-cut``: as 1, its pruning run ending where 1 freezes its masks, the cut model continuing;
13. ``short``: as 12 with half of 1's pruning stage (the ramp and the freeze scaled alike);
14. ``dense``: as 1 with every pruning step computing every unit of the source (``pruning.compact: false``, the
    paper's code and our releases before compact steps);
15. ``harden-logits``: as 1 with the masks frozen by the gates' last logits (``pruning.harden_by: logits``, our
    releases before usage-ranked hardening);
16. ``decay-prune``: as 1 with the pruning run's learning rate decaying to a tenth after its warm-up
    (``scheduler.alpha_f`` 0.1, our default before the pruning recipes kept the rate constant: the continued
    stage warms up again after the cut and anneals);
17. ``layer-warm``: as 1 with the layer row's logit temperature falling to the other rows' 0.05 at the freeze
    instead of 0.002 (``pruning.layer_final_temperature``; our default until fa4d38b);
18. ``layer-loss``: as 1 with the layers whose gates are undecided at the freeze chosen by the lowest loss on the
    freeze batch among at most 8 cuts (``pruning.layer_choice: loss``; its forwards count in the FLOPs);
19. ``layer-cool``: as 17 with 0.01 (our default from fa4d38b until a04660b);
20. ``clamp``: as 1 with the gate logits clamped to ±4.6 as the original code does (``pruning.log_alpha_limit``,
    ours 10).

``ours``' schedule prunes for ``prune`` batches and continues for ``continue``; its training FLOPs with every pruning
step at the source's shape (calibration forwards, pruning steps, continued steps at the target's shape, teachers'
forwards: :func:`arm_flops`) are the budget. With ``--match flops`` every arm continues for as many batches as
bring it to that budget, a learned arm after the FLOPs its pruning run logged (compact steps cost what they
computed, :func:`measured_prune_flops`): ``ours`` itself continues for more than ``continue`` batches; with
``--match tokens`` every arm trains on ``prune + continue`` batches. For arms run at two or more common seeds the
table and the JSON line report the paired mean difference of log mean perplexity and its 95% t interval.

An arm is data (:class:`Arm`): how its start model is made, and the overrides merged last into the recipes it
derives from ``yaml/demo/``. ``--arms`` picks arms, in order, as ``NAME`` or ``NAME@SEED``
(default: every arm at seed 17); an arm at another seed lives in ``OUT/NAME@SEED``, its recipes, random
selection, initialisation and calibration batches use that seed. ``--budget`` scales every stage's number of
batches, ``--prune-budget`` the pruning stage's only.

Without ``--data`` the demo corpus is built as ``scripts/demo.sh`` builds it (``OUT/corpus``), or ``--corpus DIR``
(``<domain>/*.jsonl`` folders, e.g. the RedPajama sample) is read, and tokenized into ``OUT/data`` with 40
held-out sequences per domain: the first 8 form the ``eval`` split (what the recipes'
evaluations and dynamic loading read), the other 32 the ``test`` split. Every model (the source, the start of
each arm's continued pre-training: cut, one-shot pruned or initialised, and the final one) is evaluated on the
test split of every domain (:func:`llmshear.tools.evaluation.evaluate_domains`); with ``--data DIR`` on ``DIR/test``,
or on ``DIR/eval`` (with a warning) when there is none. The gap of a domain is its loss minus the source's loss
there. ``OUT/reference_losses.json`` (dynamic loading's reference) holds the source's losses on the eval split.

Writes ``OUT/<arm>/`` (recipes, runs, cut and final HF models, ``start.json``, ``cut_report.json`` for learned
arms, ``result.json``), ``OUT/results.md`` (the tables) and ``OUT/results.json``, and prints one JSON line last.
A finished arm is skipped on rerun, a finished stage too; an interrupted stage starts again. A rerun into the
same ``--out`` with other settings (source, target, data, batch counts) is refused. Once an arm's ``result.json``
is written, the Composer checkpoints of its runs are deleted (about 1 GB each with SmolLM2: a three-seed
comparison kept 8 GB of them); its HF models, masks, metrics and proportions stay. ``--keep-checkpoints`` keeps
them (to resume or re-export a run).

``--prune-only`` runs the pruning stage of learned arms alone (default: every learned arm at seed 17): the pruning
run, its cut, the cut model's test perplexities, the cut report and the gates' state where the masks froze
(``OUT/<arm>/prune_result.json``, ``OUT/prune_results.md``, a JSON line with ``"stage": "prune"``). It takes about
half a full arm's time; a later run without the option into the same ``--out`` continues those arms from their cut.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from llmshear.checkpoints import LATEST_CHECKPOINT, checkpoints_in
from llmshear.config.schema import PruningSection
from llmshear.costs import forward_flops_per_token, train_flops_per_token
from llmshear.datasets.dynamic import calibration_batches, open_train_parts
from llmshear.datasets.mds import SUMMARY, TOKENS, MDSDomain, open_domains, prepare
from llmshear.datasets.proportions import PROPORTIONS_FILE
from llmshear.datasets.reference import eval_domains, split_fingerprints
from llmshear.datasets.vocab import check_vocab
from llmshear.files import Lock, LockedError, replace_json
from llmshear.loggers import METRICS_FILE, read_metrics
from llmshear.models.build import PRESETS, build_model
from llmshear.models.cut import cut_model, prune_summary
from llmshear.models.hf import load_config, load_model, save_pretrained
from llmshear.models.importance import importance_masks, random_masks
from llmshear.models.l0 import TargetShape
from llmshear.models.llama import LlamaConfig
from llmshear.tools.demo import make_demo_corpus
from llmshear.tools.evaluation import evaluate_domains
from llmshear.tools.export import export_checkpoint, load_pruning_checkpoint

log = logging.getLogger("bench_quality")

# The paper's settings (our previous defaults), merged last into the `paper` arm's pruning / continue recipes.
PAPER_PRUNE = {  # the first release's defaults: the paper's recipe (Lagrangian on each structure's mean sparsity)
    "pruning": {"init": "constant", "constraint": "overall", "harden_from": 1.0, "eval_masks": "target",
                "eval_target": False, "init_log_alpha": 5.0, "sparsity_warmup": 0.4},
    "optimizer": {"gate_schedule": "shared", "clip_norm": 0.0, "lr": 1.0e-4, "lag_lr": 1.0},
    "data": {"eta": 1.0},
    "distill": None,
}
PAPER_CONTINUE = {"optimizer": {"clip_norm": 0.0}, "data": {"eta": 1.0}}
SOURCE_MODEL = "<source>"  # in an arm's overrides: replaced by the source model (--source)

REPO = Path(__file__).resolve().parents[1]
PRUNE_RECIPE, CONTINUE_RECIPE = REPO / "yaml/demo/prune.yaml", REPO / "yaml/demo/continue.yaml"
CLUSTER_RECIPE = REPO / "yaml/prune_1.3b.yaml"  # the `row` arm takes its pruning keys from here
SOURCE = "smollm2"
TARGET = {"d_model": 384, "n_layers": 20, "n_heads": 6, "n_kv_heads": 2, "intermediate_size": 1024}
SEED = 17
PRUNE_BATCHES, CONTINUE_BATCHES = 36, 44  # at --budget 1 (~50 min on 2 CPU cores); batches of 4 x 256 tokens
PRUNE_EVALS, CONTINUE_EVALS = 4, 2  # evaluations (= domain re-weightings) per stage; ~17 s each
CALIBRATION_BATCHES = 8  # importance arm: forward passes (no training) of the source for the importance scores
CALIBRATION_SEQS = 4  # sequences per calibration batch of the importance arm
MATCHES = ("flops", "tokens")  # --match: what every arm spends as much of as `ours`
EVAL_BATCH_SIZE = 8
EVAL_SEQS, TEST_SEQS = 8, 32  # held-out sequences per domain: in-training evaluation / final evaluation
CORPUS_CHARS, DATA_SEQ_LEN, DATA_EVAL_SEQS = 600_000, 256, EVAL_SEQS + TEST_SEQS
RESULT, SETTINGS = "result.json", "settings.json"
LOCK = ".bench.lock"  # OUT is one bench's at a time
START, CUT_REPORT = "start.json", "cut_report.json"
PRUNE_RESULT, PRUNE_TABLE = "prune_result.json", "prune_results.md"  # --prune-only: per arm, and the tables


@dataclass(frozen=True)
class Arm:
    """One way to reach the target: how the start model is made, and what its recipes change.

    Attributes:
        name: the arm's folder and key.
        label: its row in the table.
        start: ``"l0"`` (a pruning run), ``"random"``, ``"importance"`` (one-shot masks) or ``"scratch"``.
        prune_overrides: merged last into the pruning recipe (``start == "l0"``).
        continue_overrides: merged last into the continue recipe; :data:`SOURCE_MODEL` names the source.
        stop_at_freeze: the pruning run ends where the masks freeze (its last batch trains the frozen 0/1 masks)
            and the cut model continues: the batches that ``ours`` trains at the source's shape on frozen masks
            run at the target's shape instead (see :func:`pruning_plan`).
        prune_share: scales ``ours``' pruning stage (its batches, so its ramp and freeze) for this arm.
    """

    name: str
    label: str
    start: str
    prune_overrides: dict = field(default_factory=dict)
    continue_overrides: dict = field(default_factory=dict)
    stop_at_freeze: bool = False
    prune_share: float = 1.0


CLUSTER_KEYS = {"pruning": ("constraint", "sparsity_warmup", "harden_from"), "optimizer": ("lag_lr", "gate_schedule")}


def cluster_pruning_keys(recipe: Path = CLUSTER_RECIPE) -> dict:
    """The 7B recipes' constraint, schedule and gate optimiser (:data:`CLUSTER_KEYS`, ``cluster`` arm), read from
    ``recipe`` so that the arm measures what ships."""
    cfg = OmegaConf.load(recipe)
    return {section: {k: cfg[section][k] for k in keys} for section, keys in CLUSTER_KEYS.items()}


# The 7B recipes' keys until they shipped `exact` (`row` arm): per-row multipliers by gradient ascent.
ROW = {"pruning": {"constraint": "row", "sparsity_warmup": 0.2, "harden_from": 0.8},
       "optimizer": {"lag_lr": 1.0, "gate_schedule": "constant"}}


CONSTANT = {"data": {"update": "constant"}}
ARMS = (
    Arm("ours", "1. learned gates (new defaults)", "l0"),
    Arm("paper", "2. paper settings (the previous defaults)", "l0", PAPER_PRUNE, PAPER_CONTINUE),
    Arm("importance", "3. one-shot activation importance", "importance"),
    Arm("random", "4. random structured selection", "random"),
    Arm("scratch", "5. random initialisation", "scratch"),
    Arm("constant", "6. learned gates, constant proportions", "l0", CONSTANT, CONSTANT),
    Arm("distill", "7. learned gates + distillation (both stages)", "l0",
        prune_overrides={"distill": {"teacher": SOURCE_MODEL}},
        continue_overrides={"distill": {"teacher": SOURCE_MODEL}}),
    Arm("importance-distill", "8. one-shot activation importance + distillation", "importance",
        continue_overrides={"distill": {"teacher": SOURCE_MODEL}}),
    Arm("fixed-ranking", "9. learned gates, logits not trained (lag_lr 0): importance order removed gradually",
        "l0", {"optimizer": {"lag_lr": 0.0}}),
    Arm("row", "10. per-row Lagrangian (the 7B recipes' keys before exact)", "l0", ROW),
    Arm("cluster", "11. the 7B recipes' pruning keys as shipped", "l0", cluster_pruning_keys()),
    Arm("freeze-cut", "12. learned gates, cut where the masks freeze", "l0", stop_at_freeze=True),
    Arm("short", "13. learned gates, half the pruning stage, cut where the masks freeze", "l0", stop_at_freeze=True,
        prune_share=0.5),
    Arm("dense", "14. learned gates, every pruning step at the source's shape (pruning.compact false)", "l0",
        {"pruning": {"compact": False}}),
    Arm("harden-logits", "15. learned gates, masks frozen by the last logits (pruning.harden_by logits)", "l0",
        {"pruning": {"harden_by": "logits"}}),
    Arm("decay-prune", "16. learned gates, the pruning run's learning rate decaying to a tenth (alpha_f 0.1)", "l0",
        {"scheduler": {"alpha_f": 0.1}}),
    Arm("layer-warm",
        "17. learned gates, the layer row at the others' final temperature 0.05 (the default until fa4d38b)", "l0",
        {"pruning": {"layer_final_temperature": 0.05}}),
    Arm("layer-loss", "18. learned gates, undecided layers chosen at the freeze by the loss (pruning.layer_choice)",
        "l0", {"pruning": {"layer_choice": "loss"}}),
    Arm("layer-cool", "19. learned gates, the layer row cooled to 0.01 at the freeze (the default until a04660b)", "l0",
        {"pruning": {"layer_final_temperature": 0.01}}),
    Arm("clamp", "20. learned gates, logits clamped to the original code's ±4.6 (pruning.log_alpha_limit)", "l0",
        {"pruning": {"log_alpha_limit": 4.6}}),
)
ARM_BY_NAME = {arm.name: arm for arm in ARMS}


@dataclass(frozen=True)
class ArmRun:
    """An arm at one seed: ``OUT/<key>`` holds it, ``key`` being the name, or ``name@seed`` off the default."""

    arm: Arm
    seed: int = SEED

    @property
    def key(self) -> str:
        return self.arm.name if self.seed == SEED else f"{self.arm.name}@{self.seed}"

    @property
    def label(self) -> str:
        return self.arm.label if self.seed == SEED else f"{self.arm.label} (seed {self.seed})"

    @property
    def learned(self) -> bool:
        """Whether this run has a pruning run (and so a cut report)."""
        return self.arm.start == "l0"


def parse_arms(text: str | None) -> list[ArmRun]:
    """``--arms``: comma-separated ``NAME`` or ``NAME@SEED``, in order; ``None``: every arm at :data:`SEED`.

    Raises:
        ValueError: an unknown name (the known ones are listed), a seed that is not an integer, a repeat.
    """
    if text is None:
        return [ArmRun(arm) for arm in ARMS]
    runs: list[ArmRun] = []
    for item in text.split(","):
        name, at, seed = item.strip().partition("@")
        if name not in ARM_BY_NAME:
            raise ValueError(f"--arms: unknown arm {name!r} (known: {', '.join(ARM_BY_NAME)})")
        if at and not seed.lstrip("-").isdigit():
            raise ValueError(f"--arms: {item.strip()!r}: the seed after @ must be an integer")
        run = ArmRun(ARM_BY_NAME[name], int(seed) if at else SEED)
        if run in runs:
            raise ValueError(f"--arms: {run.key} is given twice")
        runs.append(run)
    return runs


def pruning_runs(runs: list[ArmRun], every: bool) -> list[ArmRun]:
    """``--prune-only``'s runs: the learned ones of ``runs`` when ``every`` (no ``--arms``), else ``runs``.

    Raises:
        ValueError: an arm given by name that does not prune.
    """
    if every:
        return [run for run in runs if run.learned]
    for run in runs:
        if not run.learned:
            raise ValueError(f"--prune-only: arm {run.key} has no pruning stage (its start: {run.arm.start}); "
                             f"drop it from --arms or run without --prune-only")
    return runs


@dataclass
class Bench:
    """What every arm shares: where things are, the shapes, the data and the batch counts."""

    out: Path
    data: Path
    test: Path  # the final evaluation's split directory: data/test, or data/eval when --data has no test split
    source: str
    target: dict
    prune_batches: int
    continue_batches: int
    prune_budget: float = 1.0
    match: str = "flops"
    domains: list[str] | None = None
    seq_len: int | None = None
    batch_tokens: int = 0
    shapes: tuple[LlamaConfig, LlamaConfig] | None = None  # the source's and the target's config
    corpus: Path | None = None  # --corpus: the jsonl corpus the data is built from (None: the demo corpus)

    @property
    def reference(self) -> Path:
        return self.out / "reference_losses.json"

    def settings(self) -> dict:
        """What the arms' results depend on; a rerun into the same ``--out`` must not change it."""
        return {"source": self.source, "target": self.target, "data": str(self.data), "test": str(self.test),
                "prune_batches": self.prune_batches, "continue_batches": self.continue_batches,
                "prune_budget": self.prune_budget, "match": self.match,
                **({"corpus": str(self.corpus)} if self.corpus is not None else {})}


def cached(path: Path, compute: Callable[[], dict]) -> dict:
    """The JSON in ``path``, computed and written first when absent."""
    if not path.is_file():
        replace_json(path, compute(), indent=2)
    return json.loads(path.read_text())


def check_data(data: Path, vocab_size: int, test: Path, source: str) -> tuple[list[str], int]:
    """The domains and sequence length of a prepared MDS root (train, eval and ``test`` split of every domain).

    Raises:
        FileNotFoundError / ValueError: a missing split or domain, empty or unequal sequences, token ids beyond
            the source's vocabulary or another tokenizer.
    """
    domains = eval_domains(data / "eval")
    seq_len = open_domains([data / "eval" / domains[0]])[0].seq_len
    open_domains([split / d for split in (data / "train", data / "eval", test) for d in domains], seq_len)
    check_vocab(data / "eval", domains, vocab_size, source, "--source")
    return domains, seq_len


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory (reused: finished arms are skipped)")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--data", type=Path, help="an MDS root from prepare_data.py (default: build the demo data)")
    data.add_argument("--corpus", type=Path, help="a corpus of <domain>/*.jsonl folders (as prepare_data.py reads) "
                                                  "to tokenize and split as the demo corpus is (default: the demo's)")
    parser.add_argument("--budget", type=float, default=1.0, help="scales every stage's batches (default: 1.0)")
    parser.add_argument("--prune-budget", type=float, default=1.0,
                        help="scales the pruning stage's batches on top of --budget (default: 1.0)")
    parser.add_argument("--match", choices=MATCHES, default="flops",
                        help="what every arm spends as much of as `ours`: training FLOPs (default; the arms "
                             "get as many continued batches as fill ours' FLOPs) or tokens")
    parser.add_argument("--arms", help=f"comma-separated NAME or NAME@SEED (default: every arm at seed {SEED}); "
                                       f"names: {', '.join(ARM_BY_NAME)}")
    parser.add_argument("--prune-only", action="store_true",
                        help="run only the learned arms' pruning stages and cuts, and report their gates (default "
                             "arms: every learned arm); a later run without it continues them")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep a finished arm's Composer checkpoints (default: deleted after result.json)")
    parser.add_argument("--source", default=SOURCE, help=argparse.SUPPRESS)  # tests: a tiny preset
    parser.add_argument("--target", type=json.loads, default=TARGET, help=argparse.SUPPRESS)  # tests: JSON shape
    return parser


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Bench, list[ArmRun]]:
    """Arguments, checked before any expensive work (exit 2 with a message on a bad one)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for option, value in (("--budget", args.budget), ("--prune-budget", args.prune_budget)):
        if not value > 0:
            parser.error(f"{option} must be positive, got {value}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file")
    if args.data is None and args.source in PRESETS:
        parser.error(f"--source {args.source} has no tokenizer to prepare the demo data: give --data")
    if args.corpus is not None and not any(args.corpus.glob("*/*.jsonl")):
        parser.error(f"--corpus {args.corpus}: no <domain>/*.jsonl file there")
    data = args.data or args.out / "data"
    test = data / "test" if args.data is None or (data / "test").is_dir() else data / "eval"
    try:
        runs = parse_arms(args.arms)
        if args.prune_only:
            runs = pruning_runs(runs, args.arms is None)
        source = load_config(args.source)
        target = TargetShape.from_dict(args.target, source).to_config(source)
        domains, seq_len = check_data(data, source.vocab_size, test, args.source) if args.data else (None, None)
    except (OSError, ValueError, TypeError) as err:
        parser.error(str(err))
    bench = Bench(args.out, data, test, args.source, args.target,
                  max(1, round(PRUNE_BATCHES * args.budget * args.prune_budget)),
                  max(1, round(CONTINUE_BATCHES * args.budget)), args.prune_budget, args.match, domains, seq_len,
                  shapes=(source, target), corpus=args.corpus)
    earlier = args.out / SETTINGS
    if earlier.is_file() and json.loads(earlier.read_text()) != bench.settings():
        parser.error(f"{args.out} holds arms run with other settings ({earlier}): choose another --out")
    return args, bench, runs


def write_sequences(directory: Path, rows: Iterable[np.ndarray], dtype: str, seq_len: int) -> None:
    """MDS shards of ``rows`` as :mod:`llmshear.datasets.mds` writes them: one ``tokens`` column, uncompressed."""
    from streaming import MDSWriter

    columns = {TOKENS: f"ndarray:{dtype}:{seq_len}"}
    with MDSWriter(out=str(directory), columns=columns, compression=None) as writer:
        for row in rows:
            writer.write({TOKENS: np.asarray(row, dtype=dtype)})


def split_eval(full: Path, out: Path, eval_seqs: int) -> dict:
    """Copy the MDS root ``full`` to ``out``, its eval split cut in two: ``eval`` (the first ``eval_seqs``
    sequences of each domain) and ``test`` (the rest). Built aside, then renamed into place when complete.

    Returns:
        ``{domain: {"eval": n, "test": m}}`` (sequences), also recorded in ``out/summary.json`` when ``full``
        has one.
    """
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        shutil.copytree(full / "train", staging / "train")
        counts = {}
        for domain in eval_domains(full / "eval"):
            source = MDSDomain(full / "eval" / domain)
            rows = [source[i] for i in range(len(source))]
            for split, part in (("eval", rows[:eval_seqs]), ("test", rows[eval_seqs:])):
                write_sequences(staging / split / domain, part, rows[0].dtype.name, source.seq_len)
            counts[domain] = {"eval": min(eval_seqs, len(rows)), "test": max(0, len(rows) - eval_seqs)}
        if (full / SUMMARY).is_file():
            replace_json(staging / SUMMARY, split_summary(json.loads((full / SUMMARY).read_text()), counts),
                         indent=2)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return counts


def split_summary(summary: dict, counts: dict) -> dict:
    """``summary.json`` of a root whose eval split :func:`split_eval` cut into eval and test (sequence counts)."""
    seq_len = summary["seq_len"]
    for domain, splits in counts.items():
        summary["domains"][domain].update({split: {"sequences": n, "tokens": n * seq_len}
                                           for split, n in splits.items()})
    summary["eval_seqs"], summary["test_seqs"] = (max(c[s] for c in counts.values()) for s in ("eval", "test"))
    return summary


def prepare_demo_data(bench: Bench) -> None:
    """Build the demo corpus (or read ``--corpus``) and its MDS data (eval and test split) in ``OUT``, unless
    already there."""
    if (bench.data / SUMMARY).is_file():
        return
    corpus, unsplit = bench.corpus or bench.out / "corpus", bench.out / ".data.unsplit"
    if bench.corpus is None and not (corpus / "sources.json").is_file():
        log.info("demo corpus -> %s", corpus)
        make_demo_corpus(corpus, max_chars=CORPUS_CHARS, overwrite=True)
    if not (unsplit / SUMMARY).is_file():
        log.info("tokenize with %s, pack into %d-token MDS sequences -> %s", bench.source, DATA_SEQ_LEN, unsplit)
        prepare(corpus, bench.source, unsplit, seq_len=DATA_SEQ_LEN, eval_seqs=DATA_EVAL_SEQS, workers=2,
                overwrite=True)
    log.info("held-out sequences: %d per domain to eval, %d to test -> %s", EVAL_SEQS, TEST_SEQS, bench.data)
    split_eval(unsplit, bench.data, EVAL_SEQS)
    shutil.rmtree(unsplit)


def evaluate(model, bench: Bench, split: Path | None = None) -> dict:
    """The same evaluation for every model: every sequence of every domain of ``split`` (default: the test)."""
    return evaluate_domains(model, split or bench.test, bench.domains, batch_size=EVAL_BATCH_SIZE)


def source_row(bench: Bench) -> dict:
    """The source's evaluation on the test split; its losses on the eval split go to ``reference_losses.json``
    (what dynamic loading compares the in-training evaluations with)."""
    if not bench.reference.is_file():
        model = load_model(bench.source)
        eval_row = evaluate(model, bench, bench.data / "eval")
        row = eval_row if bench.test == bench.data / "eval" else evaluate(model, bench)
        replace_json(bench.reference, {
            "domains": bench.domains, "reference_losses": [eval_row["domains"][d]["loss"] for d in bench.domains],
            "source": bench.source, "split": str(bench.data / "eval"),
            "eval_fingerprints": split_fingerprints(bench.data / "eval", bench.domains),
            "row": {**row, "params": model.num_params()}, "row_split": str(bench.test)}, indent=2)
    return json.loads(bench.reference.read_text())["row"]


class Stages:
    """Runs an arm's stages in order, skipping those whose output exists; seconds per stage in ``stages.json``."""

    def __init__(self, folder: Path):
        self.path = folder / "stages.json"
        self.seconds = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def run(self, name: str, output: Path, work: Callable[[], object]) -> None:
        """Run ``work`` unless ``output`` (written last by the stage) exists."""
        if output.exists():
            log.info("stage %s: %s exists, skipped", name, output)
            return
        log.info("stage %s -> %s", name, output)
        start, cpu = time.perf_counter(), time.process_time()
        work()
        gc.collect()
        self.seconds[name] = time.perf_counter() - start
        self.path.write_text(json.dumps(self.seconds, indent=2) + "\n")
        log.info("stage %s: %.1f s (%.1f s of CPU time)", name, self.seconds[name], time.process_time() - cpu)


def with_source(overrides, source: str):
    """``overrides`` (nested dicts) with every :data:`SOURCE_MODEL` value replaced by ``source``."""
    if isinstance(overrides, dict):
        return {key: with_source(value, source) for key, value in overrides.items()}
    return source if overrides == SOURCE_MODEL else overrides


def write_recipe(path: Path, template: Path, purpose: str, derived: dict, arm_overrides: dict, source: str) -> Path:
    """``template`` merged with ``derived``, then with the arm's overrides, written as a recipe that opens with
    its purpose and command. An arm's ``optimizer.clip_norm: 0`` turns clipping off: it drops the template's
    ``algorithms.gradient_clipping`` (the two keys may not disagree)."""
    cfg = OmegaConf.merge(OmegaConf.load(template), OmegaConf.create(derived),
                          OmegaConf.create(with_source(arm_overrides, source)))
    if arm_overrides.get("optimizer", {}).get("clip_norm") == 0 and "algorithms" in cfg:
        cfg.algorithms.pop("gradient_clipping", None)
    header = (f"# bench_quality.py: {purpose}. Derived from {template.relative_to(REPO)}; alone:\n"
              f"#   python train.py {path}\n")
    path.write_text(header + OmegaConf.to_yaml(cfg))
    return path


def recipe_overrides(bench: Bench, run: ArmRun, folder: Path, batches: int, stage_batches: int, evals: int) -> dict:
    """What every stage of every arm sets: seed, data, length, evaluation cadence, a checkpoint at the end.

    Warm-up and evaluation interval follow ``stage_batches``, the length of a pruning arm's stage of this kind,
    so the longer continue stage of the arms that do not prune warms up and re-weights the domains alike.
    """
    return {
        "run_name": run.key.replace("@", "_seed") + "_" + folder.name,
        "seed": run.seed,
        "data": {"path": str(bench.data), "domains": bench.domains, "seq_len": bench.seq_len,
                 "reference_losses_from": str(bench.reference)},
        "scheduler": {"warmup": max(1, stage_batches // 10)},
        "train": {"max_batches": batches, "eval_interval": max(1, stage_batches // evals)},
        "checkpoint": {"save_folder": str(folder), "save_interval": 0, "autoresume": True},
    }


def train(recipe: Path) -> None:
    """``python train.py RECIPE`` in a child process (a stage's memory is returned when it ends: in this process
    every stage's Composer run kept some, 15 GB by the third arm); a run folder without a checkpoint (an
    interrupted start) is cleared first."""
    folder = Path(OmegaConf.load(recipe).checkpoint.save_folder)
    if folder.exists() and not (folder / LATEST_CHECKPOINT).exists():
        shutil.rmtree(folder)
    status = subprocess.run([sys.executable, str(REPO / "train.py"), str(recipe)], cwd=REPO).returncode
    if status != 0:
        raise RuntimeError(f"train.py {recipe} exited with status {status}")


def uniform(bench: Bench) -> list[float]:
    return [1 / len(bench.domains)] * len(bench.domains)


def recipe_with(template: Path, overrides: dict) -> DictConfig:
    """``template`` with an arm's ``overrides`` merged in (what its written recipe holds of these keys)."""
    return OmegaConf.merge(OmegaConf.load(template), OmegaConf.create(overrides))


def pruning_plan(bench: Bench, run: ArmRun) -> tuple[int, dict]:
    """A learned run's pruning batches and the schedule keys derived for them (merged before the arm's own).

    An arm plans :attr:`Arm.prune_share` of ``ours``' batches. An :attr:`Arm.stop_at_freeze` run stops where the
    planned run would freeze its masks: its target sparsity ramps over as many batches as the planned run's does,
    and its masks freeze on its last batch, so that its cut is the 0/1 sub-network that batch trained.
    """
    planned = max(1, round(bench.prune_batches * run.arm.prune_share))
    if not run.arm.stop_at_freeze:
        return planned, {}
    pruning = recipe_with(PRUNE_RECIPE, run.arm.prune_overrides).pruning
    batches = max(1, round(pruning.harden_from * planned))
    warmup = min(round(pruning.sparsity_warmup * planned), batches - 1)
    return batches, {"pruning": {"sparsity_warmup": warmup / batches, "harden_from": (batches - 1) / batches}}


def calibration_sequences(run: ArmRun) -> int:
    """Sequences the source reads forward-only before training: one-shot scores or a pruning run's importance
    init."""
    if run.arm.start == "importance":
        return CALIBRATION_BATCHES * CALIBRATION_SEQS
    if run.learned:
        cfg = recipe_with(PRUNE_RECIPE, run.arm.prune_overrides)
        pruning = OmegaConf.merge(OmegaConf.structured(PruningSection(target={})), cfg.pruning)
        return pruning.init_batches * cfg.train.micro_batch_size if pruning.init == "importance" else 0
    return 0


def arm_flops(bench: Bench, run: ArmRun, batches: dict, prune_flops: float | None = None) -> dict:
    """Training FLOPs of ``run`` with ``batches`` (``{"prune": n, "continue": m}``), by part.

    Calibration forwards of the source; the pruning steps: ``prune_flops`` when given (what a run measured,
    :func:`measured_prune_flops`), else every step at the source's shape (a dense masked step multiplies every
    weight of the source); continued steps at the target's shape; a distillation teacher's forward in every step
    of a stage that distils (:func:`llmshear.costs.train_flops_per_token`). The evaluations are not counted:
    every arm evaluates alike.
    """
    source, target = bench.shapes
    teacher = {stage: source if recipe_with(template, overrides).get("distill") else None
               for stage, template, overrides in (("prune", PRUNE_RECIPE, run.arm.prune_overrides),
                                                  ("continue", CONTINUE_RECIPE, run.arm.continue_overrides))}
    per_batch = {stage: bench.batch_tokens * train_flops_per_token(shape, bench.seq_len, teacher[stage])
                 for stage, shape in (("prune", source), ("continue", target))}
    parts = {"calibration": calibration_sequences(run) * bench.seq_len * forward_flops_per_token(source, bench.seq_len),
             **{stage: batches[stage] * per_batch[stage] for stage in per_batch}}
    if prune_flops is not None:
        parts["prune"] = prune_flops
    return {"per_batch": per_batch, "parts": parts, "total": sum(parts.values())}


def measured_prune_flops(bench: Bench, run: ArmRun) -> float:
    """The training FLOPs a learned arm's pruning run logged (``l0/batch_flops`` of every batch in its
    ``metrics.jsonl``: what its compact steps computed, or the source's shape for dense ones).

    Raises:
        ValueError: the log lacks the count for some batch (a run from before it was logged).
    """
    flops = logged_prune_flops(bench.out / run.key)
    batches = pruning_plan(bench, run)[0]
    if len(flops) != batches:
        raise ValueError(f"{bench.out / run.key / 'prune' / METRICS_FILE}: l0/batch_flops logged for {len(flops)} "
                         f"of the run's {batches} batches; rerun the arm (delete {bench.out / run.key})")
    return float(sum(count for count, _ in flops.values()))


def prune_metrics(folder: Path) -> list[dict]:
    """The lines the pruning run in ``folder`` logged (``prune/metrics.jsonl``); empty without the log."""
    path = folder / "prune" / METRICS_FILE
    return read_metrics(path) if path.is_file() else []


def logged_prune_flops(folder: Path) -> dict[int, tuple[float, bool]]:
    """Per batch of the pruning run in ``folder``: the training FLOPs it logged (``l0/batch_flops``) and whether its
    masks were frozen (``l0/hardened``); empty without the run's log."""
    return {int(line["batch"]): (line["l0/batch_flops"], line.get("l0/hardened") == 1.0)
            for line in prune_metrics(folder) if "l0/batch_flops" in line}


def logged_layer_choice(folder: Path) -> dict:
    """``{"layer_choice": {"candidates", "rank", "gain"}}`` when the pruning run in ``folder`` compared layer cuts
    at its freeze (``pruning.layer_choice: loss``; ``rank`` 0: the ranking's cut won), else empty."""
    lines = [line for line in prune_metrics(folder) if "l0/layer_choice/rank" in line]
    return {"layer_choice": {key: lines[-1][f"l0/layer_choice/{key}"] for key in ("candidates", "rank", "gain")}
            } if lines else {}


def logged_freeze_report(folder: Path) -> dict:
    """``{"freeze_report": {structure: {"decided", "undecided"}}}``: the gates' state where the pruning run in
    ``folder`` froze its masks (``l0/freeze/...``, logged by the pruning callback); empty without it."""
    lines = [line for line in prune_metrics(folder) if any(key.startswith("l0/freeze/") for key in line)]
    if not lines:
        return {}
    report: dict[str, dict] = {}
    for key, value in lines[-1].items():
        if key.startswith("l0/freeze/"):
            structure, name = key.removeprefix("l0/freeze/").split("/")
            report.setdefault(structure, {})[name] = value
    return {"freeze_report": report}


def learned_reports(folder: Path) -> dict:
    """A learned arm's reports on its pruning run in ``folder``: the cut report, and the layer choice and the
    gates' state at the freeze where the run logged them."""
    return {"cut_report": json.loads((folder / CUT_REPORT).read_text()), **logged_layer_choice(folder),
            **logged_freeze_report(folder)}


def frozen_cost(frozen: float, continued: float) -> dict:
    """A pruning batch's FLOPs once the masks froze (``frozen``) and their ratio to a continued batch's."""
    return {"prune_flops_frozen": frozen, "frozen_vs_continue": round(frozen / continued, 5)}


def frozen_prune_flops(folder: Path) -> float | None:
    """The mean training FLOPs per batch a pruning run logged once its masks were frozen, which compact steps bring
    to the cut model's; None without such batches (or without the run's log)."""
    flops = [count for count, frozen in logged_prune_flops(folder).values() if frozen]
    return sum(flops) / len(flops) if flops else None


def plan_batches(bench: Bench, run: ArmRun, prune_flops: float | None = None) -> dict:
    """Batches per stage of ``run``. ``--match tokens``: ``prune + continue`` batches in all (an arm continues for
    what its pruning run did not use); ``--match flops``: a continued stage that fills the budget, what ``ours``'
    schedule costs with every pruning step at the source's shape, after ``prune_flops`` (a learned arm's
    measured pruning FLOPs)."""
    prune = pruning_plan(bench, run)[0] if run.learned else 0
    if bench.match == "tokens":
        return {"prune": prune, "continue": bench.prune_batches + bench.continue_batches - prune}
    ours = {"prune": bench.prune_batches, "continue": bench.continue_batches}
    budget = arm_flops(bench, ArmRun(ARM_BY_NAME["ours"]), ours)["total"]
    fixed = arm_flops(bench, run, {"prune": prune, "continue": 0}, prune_flops)
    return {"prune": prune, "continue": max(1, round((budget - fixed["total"]) / fixed["per_batch"]["continue"]))}


def prune_stages(bench: Bench, run: ArmRun, stages: Stages) -> Path:
    """A learned arm's pruning run (:func:`pruning_plan`), its cut (``OUT/<key>/pruned``) and its cut report; the
    cut model's path."""
    folder = bench.out / run.key
    folder.mkdir(parents=True, exist_ok=True)
    prune_run, pruned = folder / "prune", folder / "pruned"
    batches, schedule = pruning_plan(bench, run)
    overrides = recipe_overrides(bench, run, prune_run, batches, bench.prune_batches, PRUNE_EVALS)
    overrides["model"] = {"pretrained": bench.source}
    overrides["pruning"] = {"target": bench.target, **schedule.get("pruning", {})}
    overrides["data"]["proportions"] = uniform(bench)
    recipe = write_recipe(folder / "prune.yaml", PRUNE_RECIPE, f"arm {run.key}, pruning stage", overrides,
                          run.arm.prune_overrides, bench.source)
    stages.run("prune", prune_run / PROPORTIONS_FILE, lambda: train(recipe))
    stages.run("cut", pruned / "config.json", lambda: export_checkpoint(prune_run / LATEST_CHECKPOINT, pruned))
    cached(folder / CUT_REPORT, lambda: load_pruning_checkpoint(prune_run / LATEST_CHECKPOINT)[1].cut_report())
    return pruned


def learned_start(bench: Bench, run: ArmRun, stages: Stages) -> tuple[Path, dict]:
    """The cut model of ``run``'s pruning run and the continue stage's proportion setting (its final ones)."""
    pruned = prune_stages(bench, run, stages)
    return pruned, {"proportions_from": str(bench.out / run.key / "prune" / PROPORTIONS_FILE)}


def importance_calibration(bench: Bench, seed: int) -> list[torch.Tensor]:
    """The importance arm's calibration data: :data:`CALIBRATION_BATCHES` batches of 4 sequences drawn, with
    uniform proportions and ``seed``, from the part of the train split the pruning stage reads (the learned arms'
    importance init draws from there too)."""
    train_range = list(OmegaConf.load(PRUNE_RECIPE).data.train_range)
    parts = open_train_parts([bench.data / "train" / d for d in bench.domains], bench.seq_len, train_range)
    return calibration_batches(parts, bench.domains, uniform(bench), CALIBRATION_SEQS, CALIBRATION_BATCHES, seed)


def make_start(bench: Bench, run: ArmRun, out_dir: Path) -> None:
    """Arms that do not prune: the cut model (random or one-shot importance masks) or the initialised target."""
    if run.arm.start == "scratch":
        source = load_config(bench.source)
        target = TargetShape.from_dict(bench.target, source)
        save_pretrained(build_model(target.to_config(source), seed=run.seed), out_dir)
        return
    model = load_model(bench.source)
    target = TargetShape.from_dict(bench.target, model.cfg)
    if run.arm.start == "random":
        masks = random_masks(model.cfg, target, torch.Generator().manual_seed(run.seed))
    else:
        masks = importance_masks(model, target, importance_calibration(bench, run.seed))
    cut = cut_model(model, masks)
    save_pretrained(cut, out_dir, extra_files={"summary.json": prune_summary(model, masks, cut)})


def start_stages(bench: Bench, run: ArmRun, stages: Stages) -> tuple[Path, dict, dict, float | None]:
    """The start model of ``run``'s continued pre-training, its proportion setting, the batches per stage and
    the pruning run's measured FLOPs (``None`` for arms that do not prune)."""
    if run.arm.start == "l0":
        start, data = learned_start(bench, run, stages)
        prune_flops = measured_prune_flops(bench, run)
        return start, data, plan_batches(bench, run, prune_flops), prune_flops
    start = bench.out / run.key / ("init" if run.arm.start == "scratch" else "pruned")
    stages.run(run.arm.start, start / "config.json", lambda: make_start(bench, run, start))
    return start, {"proportions": uniform(bench), "proportions_from": None}, plan_batches(bench, run), None


def continue_recipe(bench: Bench, run: ArmRun, start: Path, data: dict, batches: int) -> Path:
    """The continued-pre-training recipe of ``run`` from the model ``start``, ``data`` setting its proportions."""
    folder = bench.out / run.key
    overrides = recipe_overrides(bench, run, folder / "continue", batches, bench.continue_batches, CONTINUE_EVALS)
    overrides["data"].update(data)
    overrides["model"] = {"pretrained": str(start)}
    return write_recipe(folder / "continue.yaml", CONTINUE_RECIPE, f"arm {run.key}, continued pre-training",
                        overrides, run.arm.continue_overrides, bench.source)


def start_row(bench: Bench, start: Path) -> dict:
    """The start model's perplexities on the test split, kept next to it (``start.json``: shared by its users)."""
    def compute() -> dict:
        row = evaluate(load_model(start), bench)
        return {"model": str(start), "ppl": {d: v["ppl"] for d, v in row["domains"].items()},
                "mean_ppl": row["mean_ppl"]}
    return cached(start.parent / START, compute)


def evaluate_arm(bench: Bench, run: ArmRun, stages: Stages, batches: dict, reference: dict,
                 prune_flops: float | None) -> dict:
    """The final model's evaluation, size, training tokens, gaps and time (the evaluation's own included)."""
    started = time.perf_counter()
    model = load_model(bench.out / run.key / "final")
    result = {**evaluate(model, bench), "arm": run.key, "label": run.label, "seed": run.seed,
              "params": model.num_params(), "train_batches": batches}
    stages.seconds["eval"] = time.perf_counter() - started
    result["train_tokens"] = sum(batches.values()) * bench.batch_tokens
    flops = arm_flops(bench, run, batches, prune_flops)
    result.update(match=bench.match, train_flops=flops["total"], flops=flops["parts"],
                  flops_per_batch=flops["per_batch"])
    result["stages_s"], result["wall_s"] = dict(stages.seconds), sum(stages.seconds.values())
    add_gaps(result, reference)
    return result


def delete_checkpoints(folder: Path) -> None:
    """Delete the Composer checkpoints (and their latest link) of the run folders under ``folder``."""
    freed, count = 0, 0
    for run_folder in sorted(p for p in folder.iterdir() if p.is_dir()):
        for _, path in checkpoints_in(run_folder):
            count += 1
            if path.is_dir():  # a sharded checkpoint
                freed += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                shutil.rmtree(path)
            else:
                freed += path.stat().st_size
                path.unlink()
        (run_folder / LATEST_CHECKPOINT).unlink(missing_ok=True)
    if count:
        log.info("%s: deleted %d checkpoint(s), %.2f GB (--keep-checkpoints keeps them)", folder, count, freed / 1e9)


def run_arm(bench: Bench, run: ArmRun, reference: dict, keep_checkpoints: bool) -> dict:
    """Every stage of one arm, then its evaluation (and its start model's); ``OUT/<key>/result.json``. The runs'
    checkpoints are deleted afterwards unless ``keep_checkpoints``."""
    folder = bench.out / run.key
    if (folder / RESULT).is_file():
        log.info("arm %s: finished earlier, skipped", run.key)
        return json.loads((folder / RESULT).read_text())
    log.info("arm %s: %s", run.key, run.label)
    folder.mkdir(parents=True, exist_ok=True)
    stages = Stages(folder)
    start, data, batches, prune_flops = start_stages(bench, run, stages)
    recipe = continue_recipe(bench, run, start, data, batches["continue"])
    continued = folder / "continue"
    stages.run("continue", continued / PROPORTIONS_FILE, lambda: train(recipe))
    stages.run("export", folder / "final" / "config.json",
               lambda: export_checkpoint(continued / LATEST_CHECKPOINT, folder / "final"))
    result = evaluate_arm(bench, run, stages, batches, reference, prune_flops)
    result["start"] = start_row(bench, start)
    if run.learned:
        result.update(learned_reports(folder))
    replace_json(folder / RESULT, result, indent=2)
    if not keep_checkpoints:
        delete_checkpoints(folder)
    return result


def run_pruning_stage(bench: Bench, run: ArmRun, keep_checkpoints: bool) -> dict:
    """``--prune-only``: a learned arm's pruning run and cut (what a full run of the arm skips later), the cut
    model's test perplexities, the cut and freeze reports and the pruning FLOPs; ``OUT/<key>/prune_result.json``.
    The pruning run's checkpoints are deleted afterwards unless ``keep_checkpoints``."""
    folder = bench.out / run.key
    if (folder / PRUNE_RESULT).is_file():
        log.info("arm %s: pruning stage finished earlier, skipped", run.key)
        return json.loads((folder / PRUNE_RESULT).read_text())
    log.info("arm %s, pruning stage only: %s", run.key, run.label)
    stages = Stages(folder)
    pruned = prune_stages(bench, run, stages)
    result = {"arm": run.key, "label": run.label, "seed": run.seed, "prune_batches": pruning_plan(bench, run)[0],
              "prune_flops": measured_prune_flops(bench, run), "start": start_row(bench, pruned),
              **learned_reports(folder), "stages_s": dict(stages.seconds), "wall_s": sum(stages.seconds.values())}
    frozen = frozen_prune_flops(folder)
    if frozen is not None:
        result.update(frozen_cost(frozen, arm_flops(bench, run, {"prune": 0, "continue": 0})["per_batch"]["continue"]))
    replace_json(folder / PRUNE_RESULT, result, indent=2)
    if not keep_checkpoints:
        delete_checkpoints(folder)
    return result


def add_gaps(row: dict, reference: dict) -> None:
    """Per-domain loss gap to the source and the worst domain, into ``row``."""
    for domain, values in row["domains"].items():
        values["gap"] = values["loss"] - reference["domains"][domain]["loss"]
    worst = max(row["domains"], key=lambda d: row["domains"][d]["gap"])
    row["worst_gap"] = {"domain": worst, "gap": row["domains"][worst]["gap"]}


def table_head(head: list[str], text_columns: int = 1) -> list[str]:
    """A markdown table's head: the names, then the rule (the first ``text_columns`` left-aligned, the rest
    right-aligned)."""
    return ["| " + " | ".join(head) + " |", "|---" * text_columns + "|---:" * (len(head) - text_columns) + "|"]


def document(tables: Iterable[list[str]], notes: list[str]) -> str:
    """The non-empty ``tables``, then the notes as a list."""
    return "".join("\n".join(t) + "\n\n" for t in tables if t) + "\n".join(f"- {n}" for n in notes) + "\n"


def results_table(bench: Bench, reference: dict, results: list[dict]) -> list[str]:
    """One row per model: perplexity per domain, mean, the start model's mean, worst gap, size, batches per
    stage, tokens, training FLOPs, time."""
    head = ["arm", *bench.domains, "mean ppl", "cut ppl", "worst gap (domain)", "params", "batches",
            "train tokens", "train FLOPs", "wall"]
    rows = table_head(head)
    for r in [reference, *results]:
        ppl = [f"{r['domains'][d]['ppl']:.2f}" for d in bench.domains]
        trained = r is not reference
        cut = f"{r['start']['mean_ppl']:.2f}" if trained else "-"
        gap = f"{r['worst_gap']['gap']:+.3f} ({r['worst_gap']['domain']})" if trained else "-"
        spent = ["-"] * 4
        if trained:
            batches = r["train_batches"]
            spent = [f"{batches['prune']} + {batches['continue']}", f"{r['train_tokens']:,}",
                     f"{r['train_flops']:.3g}" if "train_flops" in r else "-", f"{r['wall_s'] / 60:.1f} min"]
        rows.append(f"| {r['label']} | " + " | ".join(ppl) + f" | {r['mean_ppl']:.2f} | {cut} | {gap} | "
                    f"{r['params'] / 1e6:.1f}M | " + " | ".join(spent) + " |")
    return rows


def paired_differences(results: list[dict]) -> list[dict]:
    """For every two arms run at two or more common seeds: the mean over those seeds of the difference of their
    log mean perplexities (first minus second: below zero, the first is better) and its 95% interval (Student's
    t with n - 1 degrees of freedom), in the order the arms first appear."""
    from scipy.stats import t as student_t

    logs: dict[str, dict[int, float]] = {}
    for r in results:
        logs.setdefault(r["arm"].partition("@")[0], {})[r["seed"]] = math.log(r["mean_ppl"])
    names, pairs = list(logs), []
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            seeds = sorted(set(logs[first]) & set(logs[second]))
            if len(seeds) < 2:
                continue
            diffs = np.array([logs[first][s] - logs[second][s] for s in seeds])
            half = student_t.ppf(0.975, len(seeds) - 1) * diffs.std(ddof=1) / math.sqrt(len(seeds))
            mean = float(diffs.mean())
            pairs.append({"first": first, "second": second, "seeds": seeds, "mean": round(mean, 5),
                          "low": round(mean - half, 5), "high": round(mean + half, 5),
                          "ratio": round(math.exp(mean), 4)})
    return pairs


def pairs_table(pairs: list[dict]) -> list[str]:
    """One row per pair of :func:`paired_differences` (empty when there is none)."""
    rows = [f"| {p['first']} vs {p['second']} | {len(p['seeds'])} | {p['mean']:+.4f} | "
            f"[{p['low']:+.4f}, {p['high']:+.4f}] | {p['ratio']:.3f} |" for p in pairs]
    head = ["arms (first vs second)", "seeds", "mean log-ppl difference", "95% interval", "ppl ratio"]
    return [*table_head(head), *rows] if rows else []


def cut_table(results: list[dict]) -> list[str]:
    """One row per structure of every learned arm's cut report (empty when no arm has one)."""
    reports = [(r["arm"], name, s, r.get("freeze_report", {}).get(name, {}).get("decided")) for r in results
               for name, s in r.get("cut_report", {}).items()]
    rows = [f"| {arm} | {name} | {s['expected_keep']:.1f} | {s['target_keep']} | {100 * s['size_error']:.1f} | "
            f"{100 * s['decided']:.1f} | {'' if frozen is None else f'{100 * frozen:.1f}'} |"
            for arm, name, s, frozen in reports]
    head = ["arm", "structure", "expected keep", "target", "size error %", "decided %", "decided at the freeze %"]
    return [*table_head(head, 2), *rows] if rows else []


def markdown(bench: Bench, reference: dict, results: list[dict]) -> str:
    """The results table, the paired differences, the learned arms' cut reports, and how to read them."""
    split = "the test split" if bench.test.name == "test" else "the eval split (no test split in --data)"
    spent = ("as many training FLOPs as ours: the arms whose pruning stage is shorter or absent, or that distil, "
             "get as many continued batches as fill it" if bench.match == "flops" else
             "as many tokens as ours: the arms that do not prune continue for both stages' batches")
    notes = [
        f"Source {bench.source} -> target {bench.target}. ours prunes for {bench.prune_batches} batches of "
        f"{bench.batch_tokens:,} tokens and continues for {bench.continue_batches} (--prune-budget "
        f"{bench.prune_budget:g}); --match {bench.match}: every arm spends {spent} (batches: pruning + continued).",
        "Training FLOPs: calibration forwards of the source, pruning steps at the source's shape, continued steps at "
        "the target's, a teacher's forward in every distilled step (llmshear.costs); evaluations not counted. "
        f"distill distils from the source in both stages. importance runs {CALIBRATION_BATCHES} forward-only "
        "calibration batches of the source.",
        f"Perplexity on every sequence of {split} of each domain ({bench.test}); the in-training evaluations and "
        "dynamic loading read the eval split. cut ppl: the model the continued pre-training started from (cut, "
        "one-shot pruned or initialised), on the same sequences. mean ppl = exp(mean of the domain losses); "
        "gap = domain loss minus the source's loss there.",
    ]
    pairs, cuts = pairs_table(paired_differences(results)), cut_table(results)
    if pairs:
        notes.append("Paired differences: for two arms run at the same seeds, the mean over the seeds of log(mean "
                     "ppl of the first) - log(mean ppl of the second), with its 95% t interval; below zero, the "
                     "first is better; an interval that excludes zero settles the sign.")
    if cuts:
        notes.append("Cut report: per structure of a pruning run's final gates, the expected number "
                     "kept, the target, the expected size's error, and the share of the kept units whose gate is "
                     "decided (P(gate != 0) >= 0.95), at the run's end and where the masks froze (the logits "
                     "drift a little after the freeze; nothing reads them then).")
    return document([results_table(bench, reference, results), pairs, cuts], notes)


def prune_markdown(bench: Bench, results: list[dict]) -> str:
    """``--prune-only``'s tables: per arm its cut model, pruning FLOPs and layer gates at the freeze; the cut
    reports."""
    head = ["arm", "cut ppl", "pruning batches", "pruning FLOPs", "frozen / continued batch FLOPs",
            "layer gates decided at the freeze %", "wall"]
    rows = table_head(head)
    for r in results:
        decided = r.get("freeze_report", {}).get("layer", {}).get("decided")
        rows.append(f"| {r['label']} | {r['start']['mean_ppl']:.2f} | {r['prune_batches']} | {r['prune_flops']:.3g} "
                    f"| {r['frozen_vs_continue'] if 'frozen_vs_continue' in r else '-'} | "
                    f"{'-' if decided is None else f'{100 * decided:.1f}'} | {r['wall_s'] / 60:.1f} min |")
    notes = [f"Source {bench.source} -> target {bench.target}: the pruning stages alone (--prune-only), ours' "
             f"{bench.prune_batches} batches of {bench.batch_tokens:,} tokens scaled by each arm's share.",
             f"cut ppl: the cut model on the test split ({bench.test}). Decided: the share of a structure's kept "
             "units whose gate has P(gate != 0) >= 0.95, at the run's end and where the masks froze (-: no freeze)."]
    return document([rows, cut_table(results)], notes)


def prune_line(bench: Bench, results: list[dict], wall: float) -> dict:
    """``--prune-only``'s JSON line: per arm its cut model's perplexities, pruning FLOPs, cut and freeze
    reports."""
    keys = ("seed", "prune_batches", "prune_flops", "prune_flops_frozen", "frozen_vs_continue", "cut_report",
            "layer_choice", "freeze_report")
    arms = {r["arm"]: {"start_ppl": {d: round(v, 4) for d, v in r["start"]["ppl"].items()},
                       "start_mean_ppl": round(r["start"]["mean_ppl"], 4), **{k: r[k] for k in keys if k in r},
                       "wall_s": round(r["wall_s"], 1)} for r in results}
    return {"stage": "prune", "source": bench.source, "target": bench.target, "prune_batches": bench.prune_batches,
            "prune_budget": bench.prune_budget, "batch_tokens": bench.batch_tokens, "test": str(bench.test),
            "arms": arms, "wall_s": round(wall, 1), "results": str(bench.out / PRUNE_TABLE)}


def short(r: dict, frozen_flops: float | None = None) -> dict:
    """A row of the JSON line: perplexities, worst gap, size; seed, start perplexity, cut report and time; a learned
    arm's pruning FLOPs per batch once its masks froze (``frozen_flops``) and their ratio to a continued batch's."""
    row = {"ppl": {d: round(v["ppl"], 4) for d, v in r["domains"].items()}, "mean_ppl": round(r["mean_ppl"], 4),
           "worst_gap": round(r["worst_gap"]["gap"], 4), "worst_domain": r["worst_gap"]["domain"],
           "params": r["params"]}
    if "seed" in r:
        row.update(seed=r["seed"], start_mean_ppl=round(r["start"]["mean_ppl"], 4))
    if "cut_report" in r:
        row["cut_report"] = r["cut_report"]
    for key in ("layer_choice", "freeze_report"):
        if key in r:
            row[key] = r[key]
    if "train_flops" in r:
        row.update(train_batches=r["train_batches"], train_flops=r["train_flops"],
                   flops_per_batch=r["flops_per_batch"])
        if frozen_flops is not None:
            row.update(frozen_cost(frozen_flops, r["flops_per_batch"]["continue"]))
    if "wall_s" in r:
        row["wall_s"] = round(r["wall_s"], 1)
    return row


def summary_line(bench: Bench, reference: dict, results: list[dict], wall: float) -> dict:
    """The JSON line: every arm's perplexities, worst gap, size, start perplexity, cut report and time."""
    return {"source": bench.source, "target": bench.target, "prune_batches": bench.prune_batches,
            "continue_batches": bench.continue_batches, "prune_budget": bench.prune_budget, "match": bench.match,
            "batch_tokens": bench.batch_tokens, "test": str(bench.test), "reference": short(reference),
            "arms": {r["arm"]: short(r, frozen_prune_flops(bench.out / r["arm"])) for r in results},
            "pairs": paired_differences(results),
            "wall_s": round(wall, 1), "results": str(bench.out / "results.md")}


def setup_data(bench: Bench, use_demo_data: bool) -> None:
    """The data (built for the demo), its domains and sequence length, and the tokens of a batch, into ``bench``."""
    if use_demo_data:
        prepare_demo_data(bench)
        bench.domains, bench.seq_len = check_data(bench.data, load_config(bench.source).vocab_size, bench.test,
                                                    bench.source)
    elif bench.test.name != "test":
        log.warning("%s has no test split: the final evaluation reads %s, the split the in-training evaluations "
                    "and dynamic loading read too", bench.data, bench.test)
    bench.batch_tokens = OmegaConf.load(PRUNE_RECIPE).train.global_batch_size * bench.seq_len


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args, bench, runs = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    lock = Lock(bench.out / LOCK)
    try:
        lock.acquire()
    except LockedError as err:
        build_parser().error(f"--out {bench.out} is in use by another bench_quality.py ({err}): two benches in one "
                             f"folder would clear each other's starting runs; wait for it, or give another --out")
    try:
        (bench.out / SETTINGS).write_text(json.dumps(bench.settings(), indent=2) + "\n")
        setup_data(bench, args.data is None)
        reference = {**source_row(bench), "label": f"{bench.source} (source, uncut)"}
        add_gaps(reference, reference)
        if args.prune_only:
            results = [run_pruning_stage(bench, run, args.keep_checkpoints) for run in runs]
        else:
            results = [run_arm(bench, run, reference, args.keep_checkpoints) for run in runs]
    finally:
        lock.release()
    if args.prune_only:
        (bench.out / PRUNE_TABLE).write_text(prune_markdown(bench, results))
        log.info("table: %s", bench.out / PRUNE_TABLE)
        print(json.dumps(prune_line(bench, results, time.perf_counter() - started)))
        return 0
    (bench.out / "results.md").write_text(markdown(bench, reference, results))
    replace_json(bench.out / "results.json", {"reference": reference, "arms": results}, indent=2)
    line = summary_line(bench, reference, results, time.perf_counter() - started)
    log.info("table: %s", bench.out / "results.md")
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
