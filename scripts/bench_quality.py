"""A miniature Sheared-LLaMA experiment: six ways to reach one target shape on one token budget, compared.

    python scripts/bench_quality.py --out out/bench_quality [--data out/demo/data] [--budget 1.0]

SmolLM2-135M (the embedded GGUF) is brought to the demo target (d_model 384, 20 layers, 6 heads / 2 KV heads,
intermediate 1024) six ways, each training on the same number of tokens and evaluated alike:

1. ``ours``: learned L0 gates (pruning run) + continued pre-training, both with dynamic batch loading;
2. ``constant``: as 1 with constant domain proportions (``data.update: constant``) in both stages;
3. ``distill``: as 1 with logit distillation from the source during continued pre-training (it continues from
   arm 1's cut model: its pruning stage would be the same run);
4. ``random``: a random structured selection of the target shape, then continued pre-training;
5. ``importance``: one-shot activation-importance pruning (Minitron-style scores on a few calibration batches),
   then continued pre-training;
6. ``scratch``: the target architecture from random initialisation.

Arms 4-6 spend the pruning stage's batches on continued pre-training instead, so every arm trains on
``prune + continue`` batches. Training goes through ``train.py`` with recipes derived from ``yaml/demo/`` and
written to ``OUT/<arm>/*.yaml``. Without ``--data`` the demo corpus is built as ``scripts/demo.sh`` builds it
(``OUT/corpus``, ``OUT/data``). Every model is evaluated on the eval split of every domain
(:func:`llmshear.evaluation.evaluate_domains`); the gap of a domain is its loss minus the source's loss there.

Writes ``OUT/<arm>/`` (recipes, runs, cut and final HF models, ``result.json``), ``OUT/results.md`` (the table)
and ``OUT/results.json``, and prints one JSON line last. A finished arm is skipped on rerun, a finished stage
too; an interrupted stage starts again. ``--budget`` scales every stage's number of batches.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from llmshear.datasets.demo import make_demo_corpus
from llmshear.datasets.mds import SUMMARY, open_domains, prepare
from llmshear.datasets.reference import check_vocab, eval_domains
from llmshear.evaluation import evaluate_domains
from llmshear.export import export_checkpoint
from llmshear.models.build import PRESETS, build_model
from llmshear.models.hf import load_config, load_model, save_pretrained
from llmshear.models.importance import importance_masks, random_masks
from llmshear.models.l0 import TargetShape
from llmshear.models.prune import cut_model, prune_checkpoint, prune_summary

log = logging.getLogger("bench_quality")

REPO = Path(__file__).resolve().parents[1]
PRUNE_RECIPE, CONTINUE_RECIPE = REPO / "yaml/demo/prune.yaml", REPO / "yaml/demo/continue.yaml"
SOURCE = "smollm2"
TARGET = {"d_model": 384, "n_layers": 20, "n_heads": 6, "n_kv_heads": 2, "intermediate_size": 1024}
SEED = 17
PRUNE_BATCHES, CONTINUE_BATCHES = 36, 44  # at --budget 1 (~50 min on 2 CPU cores); batches of 4 x 256 tokens
PRUNE_EVALS, CONTINUE_EVALS = 4, 2  # evaluations (= domain re-weightings) per stage; ~17 s each
CALIBRATION_BATCHES = 8  # arm 5: forward passes (no training) of the source for the importance scores
EVAL_BATCH_SIZE = 8
CORPUS_CHARS, DATA_SEQ_LEN, DATA_EVAL_SEQS = 600_000, 256, 8  # as scripts/demo.sh prepares the demo data
LATEST, PROPORTIONS, RESULT, SETTINGS = "latest-rank0.pt", "proportions.json", "result.json", "settings.json"


@dataclass(frozen=True)
class Arm:
    """One way to reach the target: how the start model is made, the domain rule, distillation."""

    name: str
    label: str
    start: str  # "l0" (a pruning run), "random", "importance" (one-shot masks) or "scratch" (random weights)
    update: str = "doremi"
    distill: bool = False
    pruned_by: str | None = None  # the arm whose pruning stage and cut model this one continues from


ARMS = (
    Arm("ours", "1. learned gates + dynamic loading (ours)", "l0"),
    Arm("constant", "2. learned gates, constant proportions", "l0", update="constant"),
    Arm("distill", "3. learned gates + distillation", "l0", distill=True, pruned_by="ours"),
    Arm("random", "4. random structured selection", "random"),
    Arm("importance", "5. one-shot activation importance", "importance"),
    Arm("scratch", "6. random initialisation", "scratch"),
)


@dataclass
class Bench:
    """What every arm shares: where things are, the shapes, the data and the batch counts."""

    out: Path
    data: Path
    source: str
    target: dict
    prune_batches: int
    continue_batches: int
    domains: list[str] | None = None
    seq_len: int | None = None
    batch_tokens: int = 0

    @property
    def reference(self) -> Path:
        return self.out / "reference_losses.json"

    def settings(self) -> dict:
        """What the arms' results depend on; a rerun into the same ``--out`` must not change it."""
        return {"source": self.source, "target": self.target, "data": str(self.data),
                "prune_batches": self.prune_batches, "continue_batches": self.continue_batches}


def load_train_py():
    """The repository's ``train.py`` as a module: the arms run through its ``main`` like the command line."""
    spec = importlib.util.spec_from_file_location("llmshear_train_py", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_data(data: Path, vocab_size: int) -> tuple[list[str], int]:
    """The domains and sequence length of a prepared MDS root (train and eval split of every domain).

    Raises:
        FileNotFoundError / ValueError: a missing split or domain, empty or unequal sequences, a larger vocabulary.
    """
    domains = eval_domains(data / "eval")
    seq_len = open_domains([data / "eval" / domains[0]])[0].seq_len
    open_domains([data / split / d for split in ("train", "eval") for d in domains], seq_len)
    check_vocab(data / "eval", vocab_size)
    return domains, seq_len


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Bench]:
    """Arguments, checked before any expensive work (exit 2 with a message on a bad one)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory (reused: finished arms are skipped)")
    parser.add_argument("--data", type=Path, help="an MDS root from prepare_data.py (default: build the demo data)")
    parser.add_argument("--budget", type=float, default=1.0, help="scales every stage's batches (default: 1.0)")
    parser.add_argument("--source", default=SOURCE, help=argparse.SUPPRESS)  # tests: a tiny preset
    parser.add_argument("--target", type=json.loads, default=TARGET, help=argparse.SUPPRESS)  # tests: JSON shape
    args = parser.parse_args(argv)
    if not args.budget > 0:
        parser.error(f"--budget must be positive, got {args.budget}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file")
    if args.data is None and args.source in PRESETS:
        parser.error(f"--source {args.source} has no tokenizer to prepare the demo data: give --data")
    try:
        source = load_config(args.source)
        TargetShape.from_dict(args.target, source)
        domains, seq_len = check_data(args.data, source.vocab_size) if args.data else (None, None)
    except (OSError, ValueError, TypeError) as err:
        parser.error(str(err))
    bench = Bench(args.out, args.data or args.out / "data", args.source, args.target,
                  max(1, round(PRUNE_BATCHES * args.budget)), max(1, round(CONTINUE_BATCHES * args.budget)),
                  domains, seq_len)
    earlier = args.out / SETTINGS
    if earlier.is_file() and json.loads(earlier.read_text()) != bench.settings():
        parser.error(f"{args.out} holds arms run with other settings ({earlier}): choose another --out")
    return args, bench


def prepare_demo_data(bench: Bench) -> None:
    """Build the demo corpus and its MDS data in ``OUT`` as ``scripts/demo.sh`` does, unless already there."""
    if (bench.data / SUMMARY).is_file():
        return
    corpus = bench.out / "corpus"
    if not (corpus / "sources.json").is_file():
        log.info("demo corpus -> %s", corpus)
        make_demo_corpus(corpus, max_chars=CORPUS_CHARS, overwrite=True)
    log.info("tokenize with %s, pack into %d-token MDS sequences -> %s", bench.source, DATA_SEQ_LEN, bench.data)
    prepare(corpus, bench.source, bench.data, seq_len=DATA_SEQ_LEN, eval_seqs=DATA_EVAL_SEQS, workers=2)


def evaluate(model, bench: Bench) -> dict:
    """The same evaluation for every model: every sequence of every domain's eval split."""
    return evaluate_domains(model, bench.data / "eval", bench.domains, batch_size=EVAL_BATCH_SIZE)


def source_row(bench: Bench) -> dict:
    """The source's own evaluation, whose per-domain losses are the reference (``reference_losses.json``)."""
    if not bench.reference.is_file():
        model = load_model(bench.source)
        row = {**evaluate(model, bench), "params": model.num_params()}
        losses = [row["domains"][d]["loss"] for d in bench.domains]
        bench.reference.write_text(json.dumps({"domains": bench.domains, "reference_losses": losses,
                                               "source": bench.source, "row": row}) + "\n")
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


def write_recipe(path: Path, template: Path, purpose: str, overrides: dict) -> Path:
    """``template`` merged with ``overrides``, written as a recipe that opens with its purpose and command."""
    cfg = OmegaConf.merge(OmegaConf.load(template), OmegaConf.create(overrides))
    header = (f"# bench_quality.py: {purpose}. Derived from {template.relative_to(REPO)}; alone:\n"
              f"#   python train.py {path}\n")
    path.write_text(header + OmegaConf.to_yaml(cfg))
    return path


def recipe_overrides(bench: Bench, folder: Path, batches: int, stage_batches: int, evals: int, update: str) -> dict:
    """What every stage of every arm sets: data, rule, length, evaluation cadence, a checkpoint at the end.

    Warm-up and evaluation interval follow ``stage_batches``, the length of arm 1's stage of this kind, so the
    longer continue stage of arms 4-6 warms up and re-weights the domains like arm 1's.
    """
    return {
        "run_name": folder.parent.name + "_" + folder.name,
        "seed": SEED,
        "data": {"path": str(bench.data), "domains": bench.domains, "seq_len": bench.seq_len,
                 "reference_losses_from": str(bench.reference), "update": update},
        "scheduler": {"warmup": max(1, stage_batches // 10)},
        "train": {"max_batches": batches, "eval_interval": max(1, stage_batches // evals)},
        "checkpoint": {"save_folder": str(folder), "save_interval": 0, "autoresume": True},
    }


def train(train_py, recipe: Path) -> None:
    """``train.py RECIPE``; a run folder without a checkpoint (an interrupted start) is cleared first."""
    folder = Path(OmegaConf.load(recipe).checkpoint.save_folder)
    if folder.exists() and not (folder / LATEST).exists():
        shutil.rmtree(folder)
    status = train_py.main([str(recipe)])
    if status != 0:
        raise RuntimeError(f"train.py {recipe} exited with status {status}")


def uniform(bench: Bench) -> list[float]:
    return [1 / len(bench.domains)] * len(bench.domains)


def prune_stages(bench: Bench, arm: Arm, stages: Stages, train_py) -> tuple[Path, dict]:
    """Arms 1-3: the pruning run and its cut; the cut model and the continue stage's proportion setting."""
    owner = bench.out / (arm.pruned_by or arm.name)
    run, pruned = owner / "prune", owner / "pruned"
    if arm.pruned_by is None:
        overrides = recipe_overrides(bench, run, bench.prune_batches, bench.prune_batches, PRUNE_EVALS, arm.update)
        overrides["model"] = {"pretrained": bench.source}
        overrides["pruning"] = {"target": bench.target, "lagrangian_warmup": round(0.4 * bench.prune_batches)}
        overrides["data"]["proportions"] = uniform(bench)
        recipe = write_recipe(owner / "prune.yaml", PRUNE_RECIPE, f"arm {arm.name}, pruning stage", overrides)
        stages.run("prune", run / PROPORTIONS, lambda: train(train_py, recipe))
        stages.run("cut", pruned / "config.json", lambda: prune_checkpoint(run / LATEST, pruned))
    else:  # the same pruning run: reuse it, and count its time as this arm's too
        shared = json.loads((owner / "stages.json").read_text())
        stages.seconds.update({k: shared[k] for k in ("prune", "cut")})
    return pruned, {"proportions_from": str(run / PROPORTIONS)}


def calibration_batches(bench: Bench) -> list[torch.Tensor]:
    """Arm 5's calibration data: the first training sequences of the domains in turn, ``(4, seq_len)`` each."""
    sources = open_domains([bench.data / "train" / d for d in bench.domains])
    rows = [torch.from_numpy(sources[i % len(sources)][i // len(sources)].astype("int64"))
            for i in range(4 * CALIBRATION_BATCHES)]
    return list(torch.stack(rows).split(4))


def make_start(bench: Bench, arm: Arm, out_dir: Path) -> None:
    """Arms 4-6: the cut model (random or one-shot importance masks) or the randomly initialised target."""
    if arm.start == "scratch":
        source = load_config(bench.source)
        target = TargetShape.from_dict(bench.target, source)
        save_pretrained(build_model(target.to_config(source), seed=SEED), out_dir)
        return
    model = load_model(bench.source)
    target = TargetShape.from_dict(bench.target, model.cfg)
    if arm.start == "random":
        masks = random_masks(model.cfg, target, torch.Generator().manual_seed(SEED))
    else:
        masks = importance_masks(model, target, calibration_batches(bench))
    cut = cut_model(model, masks)
    save_pretrained(cut, out_dir, extra_files={"summary.json": prune_summary(model, masks, cut)})


def continue_recipe(bench: Bench, arm: Arm, start: Path, data: dict, batches: int) -> Path:
    """The continued-pre-training recipe of ``arm`` from the model ``start``, ``data`` setting its proportions."""
    folder = bench.out / arm.name
    overrides = recipe_overrides(bench, folder / "continue", batches, bench.continue_batches, CONTINUE_EVALS,
                                 arm.update)
    overrides["data"].update(data)
    overrides["model"] = {"pretrained": str(start)}
    if arm.distill:
        overrides["distill"] = {"teacher": bench.source}
    return write_recipe(folder / "continue.yaml", CONTINUE_RECIPE, f"arm {arm.name}, continued pre-training",
                        overrides)


def evaluate_arm(bench: Bench, arm: Arm, stages: Stages, batches: dict, reference: dict) -> dict:
    """The final model's evaluation, size, training tokens, gaps and time (the evaluation's own included)."""
    started = time.perf_counter()
    model = load_model(bench.out / arm.name / "final")
    result = {**evaluate(model, bench), "arm": arm.name, "label": arm.label, "params": model.num_params(),
              "train_batches": batches}
    stages.seconds["eval"] = time.perf_counter() - started
    result["train_tokens"] = sum(batches.values()) * bench.batch_tokens
    result["stages_s"], result["wall_s"] = dict(stages.seconds), sum(stages.seconds.values())
    add_gaps(result, reference)
    return result


def run_arm(bench: Bench, arm: Arm, train_py, reference: dict) -> dict:
    """Every stage of one arm, then its evaluation; ``OUT/<arm>/result.json``."""
    folder = bench.out / arm.name
    if (folder / RESULT).is_file():
        log.info("arm %s: finished earlier, skipped", arm.name)
        return json.loads((folder / RESULT).read_text())
    log.info("arm %s: %s", arm.name, arm.label)
    folder.mkdir(parents=True, exist_ok=True)
    stages = Stages(folder)
    if arm.start == "l0":
        start, data = prune_stages(bench, arm, stages, train_py)
        batches = {"prune": bench.prune_batches, "continue": bench.continue_batches}
    else:  # the pruning stage's batches go to continued pre-training
        start = folder / ("init" if arm.start == "scratch" else "pruned")
        stages.run(arm.start, start / "config.json", lambda: make_start(bench, arm, start))
        data = {"proportions": uniform(bench), "proportions_from": None}
        batches = {"prune": 0, "continue": bench.prune_batches + bench.continue_batches}
    recipe = continue_recipe(bench, arm, start, data, batches["continue"])
    run = folder / "continue"
    stages.run("continue", run / PROPORTIONS, lambda: train(train_py, recipe))
    stages.run("export", folder / "final" / "config.json", lambda: export_checkpoint(run / LATEST, folder / "final"))
    result = evaluate_arm(bench, arm, stages, batches, reference)
    (folder / RESULT).write_text(json.dumps(result, indent=2) + "\n")
    return result


def add_gaps(row: dict, reference: dict) -> None:
    """Per-domain loss gap to the source and the worst domain, into ``row``."""
    for domain, values in row["domains"].items():
        values["gap"] = values["loss"] - reference["domains"][domain]["loss"]
    worst = max(row["domains"], key=lambda d: row["domains"][d]["gap"])
    row["worst_gap"] = {"domain": worst, "gap": row["domains"][worst]["gap"]}


def markdown(bench: Bench, reference: dict, results: list[dict]) -> str:
    """The results table (perplexity per domain, mean, worst gap, size, tokens, time) and how to read it."""
    head = ["arm", *bench.domains, "mean ppl", "worst gap (domain)", "params", "train tokens", "wall"]
    rows = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for r in [reference, *results]:
        ppl = [f"{r['domains'][d]['ppl']:.2f}" for d in bench.domains]
        trained = r is not reference
        gap = f"{r['worst_gap']['gap']:+.3f} ({r['worst_gap']['domain']})" if trained else "-"
        tokens, wall = (f"{r['train_tokens']:,}", f"{r['wall_s'] / 60:.1f} min") if trained else ("-", "-")
        rows.append(f"| {r['label']} | " + " | ".join(ppl) + f" | {r['mean_ppl']:.2f} | {gap} | "
                    f"{r['params'] / 1e6:.1f}M | {tokens} | {wall} |")
    notes = [
        f"Source {bench.source} -> target {bench.target}. Every arm trains on {bench.prune_batches} + "
        f"{bench.continue_batches} batches of {bench.batch_tokens:,} tokens: arms 1-3 prune for the first and "
        f"continue for the second, arms 4-6 continue for both.",
        f"Arm 3 continues from arm 1's cut model (its pruning stage would be the same run); its wall time counts "
        f"that stage. Arm 5 also runs {CALIBRATION_BATCHES} forward-only calibration batches of the source.",
        "Perplexity on every eval sequence of each domain; mean ppl = exp(mean of the domain losses); gap = "
        "domain loss minus the source's loss there (the reference losses of dynamic loading).",
    ]
    return "\n".join(rows) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def summary_line(bench: Bench, reference: dict, results: list[dict], wall: float) -> dict:
    """The JSON line: every arm's perplexities, worst gap, size and time."""
    def short(r: dict) -> dict:
        return {"ppl": {d: round(v["ppl"], 4) for d, v in r["domains"].items()}, "mean_ppl": round(r["mean_ppl"], 4),
                "worst_gap": round(r["worst_gap"]["gap"], 4), "worst_domain": r["worst_gap"]["domain"],
                "params": r["params"], **({"wall_s": round(r["wall_s"], 1)} if "wall_s" in r else {})}
    return {"source": bench.source, "target": bench.target, "prune_batches": bench.prune_batches,
            "continue_batches": bench.continue_batches, "batch_tokens": bench.batch_tokens,
            "reference": short(reference), "arms": {r["arm"]: short(r) for r in results},
            "wall_s": round(wall, 1), "results": str(bench.out / "results.md")}


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args, bench = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    bench.out.mkdir(parents=True, exist_ok=True)
    (bench.out / SETTINGS).write_text(json.dumps(bench.settings(), indent=2) + "\n")
    if args.data is None:
        prepare_demo_data(bench)
        bench.domains, bench.seq_len = check_data(bench.data, load_config(bench.source).vocab_size)
    train_py = load_train_py()
    recipe = OmegaConf.load(PRUNE_RECIPE)
    bench.batch_tokens = recipe.train.global_batch_size * bench.seq_len
    reference = {**source_row(bench), "label": f"{bench.source} (source, uncut)"}
    add_gaps(reference, reference)
    results = [run_arm(bench, arm, train_py, reference) for arm in ARMS]
    (bench.out / "results.md").write_text(markdown(bench, reference, results))
    (bench.out / "results.json").write_text(json.dumps({"reference": reference, "arms": results}, indent=2) + "\n")
    line = summary_line(bench, reference, results, time.perf_counter() - started)
    log.info("table: %s", bench.out / "results.md")
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
