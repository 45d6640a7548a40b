"""Preflight: checks of a typed, resolved run config against numbers, files and the machine, each problem naming
its key.

Only configs and indexes are read here (the source's ``config.json``, MDS ``index.json``, a checkpoint's zip
directory, one listing of ``checkpoint.remote``), never weights or samples, so a bad run fails in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmshear.checkpoints import (
    LATEST_CHECKPOINT,
    CheckpointError,
    CheckpointInfo,
    checkpoint_problem,
    checkpoints_in,
    describe,
)
from llmshear.composer_parts import check_parts
from llmshear.config.schema import RunConfig
from llmshear.datasets.dynamic import open_train_parts
from llmshear.datasets.mds import open_domains
from llmshear.datasets.proportions import bounds_errors, proportion_errors, reference_loss_errors
from llmshear.datasets.reference import split_fingerprints
from llmshear.datasets.vocab import vocab_problems
from llmshear.files import PLAIN_NAME
from llmshear.models.hf import check_weights, load_config, require_weights
from llmshear.models.l0 import TargetShape
from llmshear.remote import RemoteError, remote_checkpoints, uri_problem

__all__ = ["check_run", "weight_problems"]


def check_numbers(cfg: RunConfig) -> list[str]:
    """Values out of range: sizes, rates, intervals."""
    t, o, d = cfg.train, cfg.optimizer, cfg.data
    rules = [
        ("train.max_batches", t.max_batches, t.max_batches > 0, "must be positive"),
        ("train.global_batch_size", t.global_batch_size, t.global_batch_size > 0, "must be positive"),
        ("train.micro_batch_size", t.micro_batch_size, t.micro_batch_size == "auto" or (
            isinstance(t.micro_batch_size, int) and t.micro_batch_size > 0),
         "must be positive or 'auto'"),
        ("train.eval_interval", t.eval_interval, t.eval_interval > 0, "must be positive"),
        ("train.log_interval", t.log_interval, t.log_interval > 0, "must be positive"),
        ("train.eval_batches", t.eval_batches, t.eval_batches == -1 or t.eval_batches > 0,
         "must be positive, or -1 for the whole eval split (dynamic loading needs evaluation)"),
        ("train.max_nonfinite", t.max_nonfinite, t.max_nonfinite > 0, "must be positive"),
        ("seed", cfg.seed, 0 <= cfg.seed < 2**32, "must lie in [0, 2**32)"),
        ("train.eval_batch_size", t.eval_batch_size, t.eval_batch_size is None or t.eval_batch_size > 0,
         "must be positive"),
        ("data.seq_len", d.seq_len, d.seq_len >= 2, "must be at least 2"),
        ("data.train_range", d.train_range, len(d.train_range) == 2 and 0 <= d.train_range[0] < d.train_range[-1] <= 1,
         "must be [begin, end] with 0 <= begin < end <= 1 (the fraction of each domain's train split to read)"),
        ("data.num_workers", d.num_workers, d.num_workers == 0,
         "must be 0: worker processes would see proportion updates late and break exact resumption"),
        ("data.eta", d.eta, d.eta > 0, "must be positive"),
        ("data.smoothing", d.smoothing, 0 <= d.smoothing < 1, "must lie in [0, 1)"),
        ("optimizer.lr", o.lr, o.lr > 0, "must be positive"),
        ("optimizer.lag_lr", o.lag_lr, o.lag_lr >= 0, "must not be negative"),
        ("optimizer.betas", o.betas, len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
         "must be two numbers in [0, 1)"),
        ("optimizer.weight_decay", o.weight_decay, o.weight_decay >= 0, "must not be negative"),
        ("optimizer.clip_norm", o.clip_norm, o.clip_norm is None or o.clip_norm >= 0,
         "must not be negative (0: no clipping)"),
        ("scheduler.warmup", cfg.scheduler.warmup, 0 <= cfg.scheduler.warmup <= t.max_batches,
         "must lie in [0, train.max_batches]"),
        ("scheduler.alpha_f", cfg.scheduler.alpha_f, 0 <= cfg.scheduler.alpha_f <= 1, "must lie in [0, 1]"),
        ("checkpoint.save_interval", cfg.checkpoint.save_interval, cfg.checkpoint.save_interval >= 0,
         "must not be negative (0: only at the end)"),
        ("checkpoint.keep", cfg.checkpoint.keep, cfg.checkpoint.keep == -1 or cfg.checkpoint.keep >= 1,
         "must be -1 (keep every checkpoint) or a positive count (0 would delete each checkpoint as soon as it "
         "is written)"),
    ]
    if cfg.pruning is not None:
        p = cfg.pruning
        rules.append(("pruning.sparsity_warmup", p.sparsity_warmup, 0 <= p.sparsity_warmup <= 1,
                      "must lie in [0, 1] (a fraction of train.max_batches)"))
        rules.append(("pruning.final_temperature", p.final_temperature, 0 < p.final_temperature <= p.temperature,
                      f"must lie in (0, pruning.temperature={p.temperature}]"))
        if p.layer_final_temperature is not None:
            rules.append(("pruning.layer_final_temperature", p.layer_final_temperature,
                          0 < p.layer_final_temperature <= p.temperature,
                          f"must lie in (0, pruning.temperature={p.temperature}] (or null: pruning.final_temperature)"))
        rules.append(("pruning.harden_from", p.harden_from, p.sparsity_warmup <= p.harden_from <= 1,
                      f"must lie in [pruning.sparsity_warmup={p.sparsity_warmup}, 1] (a fraction of train.max_batches; "
                      "1: never harden)"))
        rules.append(("pruning.init_batches", cfg.pruning.init_batches, cfg.pruning.init_batches > 0,
                      "must be positive"))
        rules.append(("pruning.layer_candidates", p.layer_candidates, p.layer_candidates >= 2,
                      "must be at least 2 (the ranking's cut and one other)"))
        rules.append(("pruning.layer_choice", p.layer_choice, p.layer_choice != "loss" or p.harden_from < 1,
                      f"compares layer cuts where the masks freeze, and pruning.harden_from={p.harden_from} never "
                      "freezes them (set it below 1, or layer_choice: ranking)"))
    if cfg.distill is not None:
        rules.append(("distill.alpha", cfg.distill.alpha, 0 <= cfg.distill.alpha <= 1, "must lie in [0, 1]"))
        rules.append(("distill.temperature", cfg.distill.temperature, cfg.distill.temperature > 0,
                      "must be positive"))
    return [f"{key}={value!r} {why}" for key, value, ok, why in rules if not ok]


def check_batches(cfg: RunConfig, world_size: int) -> list[str]:
    """The global batch must split into whole micro-batches on every rank."""
    t = cfg.train
    if not isinstance(t.micro_batch_size, int) or t.global_batch_size <= 0 or t.micro_batch_size <= 0:
        return []
    if t.global_batch_size % (t.micro_batch_size * world_size):
        return [f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size="
                f"{t.micro_batch_size} x world size {world_size}"]
    return []


_CONFIGS: dict[str, object] = {}  # source configs read during one check_run (a GGUF takes seconds to read)


def source_config(name: str):
    """``load_config(name)``, read once per :func:`check_run`."""
    if name not in _CONFIGS:
        _CONFIGS[name] = load_config(name)
    return _CONFIGS[name]


def check_model(cfg: RunConfig) -> list[str]:
    """The source (and teacher) configs and weight-file headers load, and the pruning target fits in the source."""
    problems = []
    try:
        source = source_config(cfg.model.pretrained)
        check_weights(cfg.model.pretrained)
    except (OSError, ValueError) as err:
        return [f"model.pretrained={cfg.model.pretrained!r}: {err}"]
    if cfg.pruning is not None:
        try:
            TargetShape.from_dict(cfg.pruning.target, source, cfg.pruning.structures)
        except ValueError as err:
            problems += [f"pruning.{line.strip()}" for line in str(err).splitlines()[1:]]
    if cfg.distill is not None:
        try:
            teacher = load_config(cfg.distill.teacher)
            check_weights(cfg.distill.teacher)
        except (OSError, ValueError) as err:
            problems.append(f"distill.teacher={cfg.distill.teacher!r}: {err}")
        else:
            if teacher.vocab_size != source.vocab_size:
                problems.append(f"distill.teacher: vocabulary {teacher.vocab_size} differs from the student's "
                                f"{source.vocab_size}")
    return problems


def check_proportions(cfg: RunConfig, resolved: frozenset[str] = frozenset()) -> list[str]:
    """Proportions, reference losses and bounds against the domains.

    ``resolved``: the keys whose value :func:`~llmshear.config.loading.resolve_files` has read from the file
    its ``*_from`` key names. A value still unread (planning without files, or an unreadable file, reported
    there) is not checked.
    """
    d = cfg.data
    problems = []
    if len(set(d.domains)) != len(d.domains) or not d.domains:
        problems.append(f"data.domains={d.domains}: must be a non-empty list of distinct names")
    problems += [f"data.domains: {domain!r} is not a plain name (letters, digits, '.', '_', '-'): a domain is a "
                 f"folder directly under data.path/<split>/" for domain in d.domains
                 if not PLAIN_NAME.fullmatch(str(domain))]
    for key in ("proportions", "reference_losses"):
        if getattr(d, key) is not None and getattr(d, f"{key}_from") is not None and key not in resolved:
            problems.append(f"data.{key} / data.{key}_from: set one of them, not both")
    if d.proportions is None and d.proportions_from is None:
        problems.append("data.proportions / data.proportions_from: set one of them")
    if d.proportions is not None:
        key = "data.proportions_from" if "proportions" in resolved else "data.proportions"
        problems += proportion_errors(d.proportions, d.domains, key=key)
    if d.reference_losses is not None or d.reference_losses_from is None:
        key = "data.reference_losses_from" if "reference_losses" in resolved else "data.reference_losses"
        problems += reference_loss_errors(d.reference_losses, d.domains, rule=d.update, key=key)
    return problems + bounds_errors(d.floor, d.cap, len(d.domains))


def check_data(cfg: RunConfig) -> list[str]:
    """Every ``data.path/<split>/<domain>`` is non-empty MDS of ``data.seq_len`` sequences whose shards match their
    index; ``data.train_range`` selects samples of every domain; the eval split is not the train split; the
    token ids fit the model's vocabulary (``summary.json``); the reference losses were measured on this eval split
    (:func:`check_reference_split`)."""
    d = cfg.data
    root = Path(d.path)
    if not root.is_dir():
        return [f"data.path={str(root)!r}: no such directory"]
    problems = []
    valid_range = len(d.train_range) == 2 and 0 <= d.train_range[0] < d.train_range[1] <= 1  # else reported
    if d.train_split == d.eval_split:
        problems.append(f"data.eval_split={d.eval_split!r} is data.train_split: evaluation must use held-out sequences")
    for split_key in ("train_split", "eval_split"):
        split = getattr(d, split_key)
        for domain in d.domains:
            directory = root / split / domain
            if not (directory / "index.json").is_file():
                problems.append(f"data.domains: {domain!r} has no MDS data for data.{split_key}={split!r} "
                                f"({directory}/index.json is missing)")
                continue
            try:
                if split_key == "train_split" and valid_range:
                    open_train_parts([directory], d.seq_len, d.train_range)
                else:
                    open_domains([directory], d.seq_len)
            except (OSError, ValueError) as err:
                problems.append(f"data.path: {err}")
    return problems + check_vocabulary(cfg) + (check_reference_split(cfg) if not problems else [])


def check_reference_split(cfg: RunConfig) -> list[str]:
    """``data.reference_losses_from`` measured on this run's eval split: a file that records the split's
    fingerprints (``scripts/reference_loss.py --source``, ``bench_quality.py``) must match the data's, wherever
    the split was copied; a file without them (a scaling-law fit) is not checked."""
    d = cfg.data
    if d.reference_losses_from is None:
        return []
    try:
        recorded = json.loads(Path(d.reference_losses_from).read_text()).get("eval_fingerprints")
    except (OSError, ValueError, AttributeError):
        return []  # unreadable: reported where the losses are read
    if not isinstance(recorded, dict):
        return []
    split = Path(d.path) / d.eval_split
    here = split_fingerprints(split, [domain for domain in d.domains if domain in recorded])
    differ = [domain for domain, value in here.items() if recorded[domain] != value]
    if not differ:
        return []
    return [f"data.reference_losses_from={d.reference_losses_from!r}: measured on another eval split than {split} "
            f"(domains {differ} hold other sequences: another preparation, tokenizer or sequence length); measure "
            f"the reference on this data (scripts/reference_loss.py --source MODEL --data {split})"]


def check_vocabulary(cfg: RunConfig) -> list[str]:
    """The data's token ids (and tokenizer, when known) fit ``model.pretrained`` (:mod:`llmshear.datasets.vocab`)."""
    try:
        vocab = source_config(cfg.model.pretrained).vocab_size
    except (OSError, ValueError):
        return []  # reported by check_model
    problems = vocab_problems(cfg.data.path, cfg.data.domains, vocab, cfg.model.pretrained)
    return [f"data.path: {problem}" for problem in problems]


def resume_problems(cfg: RunConfig, info: CheckpointInfo, key: str) -> list[str]:
    """Why the checkpoint ``info`` cannot be loaded by this run: another kind, or train data drawn otherwise."""
    expected = "continued" if cfg.pruning is None else "pruning"
    if info.kind != expected:
        what = "has no pruning section" if cfg.pruning is None else "has a pruning section"
        return [f"{key}: {info.path} is a {info.kind} checkpoint ({'with' if info.kind == 'pruning' else 'without'} "
                f"L0 masks), but this run {what} and needs a {expected} checkpoint"]
    sharded = cfg.fsdp.enabled and cfg.fsdp.version == 2 and cfg.fsdp.state_dict_type == "sharded"
    if info.path.is_dir() != sharded:
        found, wanted = ("sharded", "full") if info.path.is_dir() else ("full", "sharded")
        return [f"{key}: {info.path} is a {found} checkpoint, but this run reads {wanted} ones "
                f"(fsdp.state_dict_type={cfg.fsdp.state_dict_type!r}, fsdp.enabled={cfg.fsdp.enabled})"]
    if cfg.checkpoint.load_weights_only and key == "checkpoint.load_path":
        return []
    mine = {"train.global_batch_size": ("global_batch_size", cfg.train.global_batch_size),
            "data.domains": ("domains", cfg.data.domains), "seed": ("seed", cfg.seed)}
    return [f"{name}={value!r} differs from {info.data[field]!r} in {info.path} ({key}): an exact resume needs "
            f"the same; restore it, or start a new checkpoint.save_folder"
            for name, (field, value) in mine.items() if field in info.data and info.data[field] != value]


def check_checkpoint(cfg: RunConfig) -> list[str]:
    """``load_path`` readable and of this run's kind; the latest checkpoint (autoresume) of this run's kind; no
    foreign checkpoints overwritten. An incomplete latest checkpoint is no problem: the run sets it aside
    (:func:`llmshear.run_folder.recover`). Only zip directories and pickled metadata are read, never tensors."""
    c = cfg.checkpoint
    problems = []
    candidates = []
    if c.load_path is not None and "://" not in c.load_path:
        problem = checkpoint_problem(Path(c.load_path))
        if problem:
            problems.append(f"checkpoint.load_path: {problem}")
        else:
            candidates.append(("checkpoint.load_path", Path(c.load_path)))
    folder = Path(c.save_folder)
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return problems + [f"checkpoint.save_folder={c.save_folder!r}: {blocker} is a file, not a directory"]
    existing = [path.name for _, path in checkpoints_in(folder)]
    latest = folder / LATEST_CHECKPOINT
    if c.autoresume and latest.exists() and checkpoint_problem(latest) is None:
        candidates.append(("checkpoint.autoresume", latest.resolve()))
    elif existing and not c.autoresume:
        problems.append(f"checkpoint.save_folder={c.save_folder!r} already holds checkpoints {existing[:3]}; set "
                        f"checkpoint.autoresume=true to continue that run, or choose another folder")
    for key, path in candidates:
        try:
            problems += resume_problems(cfg, describe(path), key)
        except CheckpointError as err:
            problems.append(f"{key}: {err}")
    return problems


def weight_problems(cfg: RunConfig) -> list[str]:
    """What a run needs beyond a valid config: the weights of its source and teacher (a config-only directory or
    preset passes :func:`check_run`, which recipes are checked with, and the planner; a run cannot use one)."""
    problems = []
    for key, source in (("model.pretrained", cfg.model.pretrained),
                        ("distill.teacher", cfg.distill.teacher if cfg.distill is not None else None)):
        if source is None:
            continue
        try:
            require_weights(source)
        except (OSError, ValueError) as err:
            problems.append(f"{key}={source!r}: {err}")
    return problems


def check_runtime(cfg: RunConfig, cuda: bool) -> list[str]:
    """Settings the machine or the chosen parallelism cannot honour."""
    problems = []
    if cfg.train.precision != "fp32" and not cuda:
        problems.append(f"train.precision={cfg.train.precision!r} needs a GPU (none visible); use fp32 on CPU")
    if cfg.train.device == "gpu" and not cuda:
        problems.append("train.device='gpu' but no GPU is visible")
    if cfg.fsdp.enabled and cfg.fsdp.version == 1 and not cuda:
        problems.append("fsdp.version=1 needs a GPU; FSDP on CPU works with fsdp.version=2")
    if cfg.train.micro_batch_size == "auto" and not cuda:
        problems.append("train.micro_batch_size='auto' needs a GPU (none visible): Composer finds the size by "
                        "catching CUDA out-of-memory errors; give a number on CPU")
    if cfg.train.micro_batch_size == "auto" and cfg.train.device == "cpu":
        problems.append("train.micro_batch_size='auto' needs train.device='gpu' (or unset)")
    if cfg.train.micro_batch_size == "auto" and cfg.train.eval_batch_size is None:
        problems.append("train.micro_batch_size='auto' needs train.eval_batch_size (evaluation and the importance "
                        "init use it)")
    if cfg.fsdp.activation_checkpointing and not cfg.fsdp.enabled:
        problems.append("fsdp.activation_checkpointing needs fsdp.enabled=true")
    if cfg.model.init_device == "meta" and not cfg.fsdp.enabled:
        problems.append("model.init_device='meta' needs fsdp.enabled=true (rank 0 loads, FSDP broadcasts)")
    if cfg.fsdp.state_dict_type == "sharded" and not (cfg.fsdp.enabled and cfg.fsdp.version == 2):
        problems.append("fsdp.state_dict_type='sharded' needs fsdp.enabled=true and fsdp.version=2")
    if cfg.model.init_device == "meta" and cfg.distill is not None:
        problems.append("distill with model.init_device='meta': the teacher is not sharded by FSDP, so ranks other "
                        "than 0 would keep it on the meta device (no weights); use model.init_device='cpu'")
    if cfg.model.init_device == "meta" and cfg.pruning is not None and cfg.pruning.init == "importance":
        problems.append("pruning.init='importance' needs model.init_device='cpu': every rank scores the source "
                        "model's activations, and with 'meta' only rank 0 has its weights")
    return problems


def check_local_paths(cfg: RunConfig) -> list[str]:
    """Object-store URIs (``s3://``, ``gs://``, …) are refused: the run folder and checkpoints are local files;
    ``checkpoint.remote`` mirrors the folder to an object store. A run folder inside the data root is refused: its
    ``masks/`` would sit among a split's domains and ``prepare_data.py --overwrite`` of the data would delete it."""
    c = cfg.checkpoint
    problems = []
    folder, data = Path(c.save_folder).resolve(), Path(cfg.data.path).resolve()
    if folder == data or data in folder.parents:
        problems.append(f"checkpoint.save_folder={c.save_folder!r} lies inside data.path={cfg.data.path!r}: the run "
                        f"would write its checkpoints, masks/ and metrics among the data (and lose them to a "
                        f"re-prepared data root); give the run a folder of its own")
    if "://" in c.save_folder:
        problems.append(f"checkpoint.save_folder={c.save_folder!r}: must be a local (or mounted) path: checkpoints, "
                        f"metrics.jsonl, masks/ and proportions.json are written and read as local files, and this "
                        f"would create a local directory {c.save_folder.split('://')[0]}:/... instead. To keep the "
                        f"run in an object store, set checkpoint.remote={c.save_folder!r} and a local save_folder")
    if c.load_path is not None and "://" in c.load_path:
        problems.append(f"checkpoint.load_path={c.load_path!r}: must be a local path; the checks and the resume read "
                        f"checkpoints as local files. Download it first, or resume a run mirrored there with "
                        f"checkpoint.remote and checkpoint.autoresume=true")
    return problems


def check_remote(cfg: RunConfig, files: bool) -> list[str]:
    """``checkpoint.remote``: an ``s3://`` location and (``files``) a bucket that can be listed
    (one listing, nothing downloaded), holding no checkpoints unless the run resumes them."""
    c = cfg.checkpoint
    if c.remote is None:
        return []
    problem = uri_problem(c.remote)
    if problem:
        return [f"checkpoint.remote={c.remote!r}: {problem}"]
    if not files:
        return []
    try:
        found = remote_checkpoints(c.remote)
    except RemoteError as err:
        return [str(err)]
    if found and not c.autoresume:
        return [f"checkpoint.remote={c.remote!r} already holds checkpoints {found[:3]}; set checkpoint.autoresume=true "
                f"to continue that run, or choose another prefix"]
    return []


def check_run(cfg: RunConfig, world_size: int, cuda: bool, files: bool = True,
              resolved: frozenset[str] = frozenset()) -> list[str]:
    """All semantic checks; a check that trips over a value of the wrong type (already reported) is skipped.
    ``resolved``: the data keys read from ``*_from`` files (see :func:`check_proportions`).

    ``files=False`` leaves out the checks of the data and the checkpoints.
    """
    file_checks = [check_data, check_checkpoint] if files else []
    checks = [check_numbers, lambda c: check_batches(c, world_size), check_model,
              lambda c: check_proportions(c, resolved), *file_checks, check_local_paths,
              lambda c: check_remote(c, files),
              lambda c: check_runtime(c, cuda), lambda c: check_parts(c, world_size, cuda)]
    problems = []
    _CONFIGS.clear()
    for check in checks:
        try:
            problems += check(cfg)
        except (TypeError, AttributeError):
            continue
    return problems
