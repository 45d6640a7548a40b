"""A validated :class:`~llmshear.config.RunConfig` → the model, optimizer, loaders, callbacks and Composer Trainer.

Nothing here validates: :func:`llmshear.config.load` has already rejected every bad value, so the builders
only translate. The order in :func:`build_trainer` is cheap first (schedules, callbacks), then weights, then
data, then the Trainer (which initialises the process group and resumes).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from composer import Trainer
from composer.core import Evaluator
from composer.utils import dist
from composer.utils.parallelism import FSDP2Config

from llmshear.callbacks.clipping import ClipGradNorm
from llmshear.callbacks.dynamic_loading import DynamicLoadingCallback
from llmshear.callbacks.gradient_mean import FSDPGradientMean
from llmshear.callbacks.nonfinite import NonFiniteLossGuard
from llmshear.callbacks.preemption import PreemptionStop, save_schedule
from llmshear.callbacks.pruning import PruningCallback
from llmshear.callbacks.resume_rng import ResumeRNG
from llmshear.callbacks.run_folder import KeepAcrossResumes, MirrorRunFolder
from llmshear.checkpoints import LATEST_CHECKPOINT
from llmshear.composer_parts import build_algorithms, build_composer_callbacks, build_loggers, clip_threshold
from llmshear.config import RunConfig
from llmshear.datasets.dynamic import (
    build_eval_dataloader,
    build_train_dataloader,
    calibration_batches,
    open_train_parts,
)
from llmshear.loggers import JSONLinesLogger
from llmshear.models.composer_llama import ComposerLlama, Distillation
from llmshear.models.hf import build_model, load_config, load_model
from llmshear.models.importance import init_l0_from_importance
from llmshear.models.l0 import L0Module, TargetShape
from llmshear.models.llama import DTYPES
from llmshear.optim import build_optimizer, build_scheduler
from llmshear.sources import source_record

log = logging.getLogger(__name__)

EVAL_LABEL = "eval"
TARGET_EVAL_LABEL = "eval_target"  # pruning runs with pruning.eval_target: the target-shape cut, logged only


def build_l0(cfg: RunConfig, source) -> L0Module | None:
    """The L0 module of a pruning run (on the CPU, it is small), or None for continued pre-training.

    Its initial gate logits carry a little random noise (ties broken); it is drawn from ``seed`` (the global RNG is
    left as it was), since the module is built before Composer seeds the run: otherwise ``pruning.init: constant``
    would start from whatever the process had drawn before.
    """
    if cfg.pruning is None:
        return None
    p, batches = cfg.pruning, cfg.train.max_batches
    target = TargetShape.from_dict(p.target, source, p.structures)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return L0Module(source, target, p.structures, lagrangian_warmup=round(p.sparsity_warmup * batches),
                        harden_batch=None if p.harden_from >= 1 else round(p.harden_from * batches),
                        harden_by=p.harden_by,
                        constraint=p.constraint, eval_masks=p.eval_masks, init_log_alpha=p.init_log_alpha,
                        log_alpha_limit=p.log_alpha_limit, temperature=p.temperature,
                        final_temperature=p.final_temperature, layer_final_temperature=p.layer_final_temperature)


def build_composer_model(cfg: RunConfig, device: str | None = None) -> ComposerLlama:
    """The :class:`ComposerLlama` of the run: the source loaded strictly, the L0 module, the teacher.

    Args:
        cfg: the validated config.
        device: ``"meta"`` builds every weight without storage (shape checks, and the non-zero ranks of a
            run with ``model.init_device=meta``, which FSDP fills from rank 0); default: from the config.
    """
    device = device or _init_device(cfg)
    source = load_config(cfg.model.pretrained)
    if device == "meta":
        model = build_model(source, device="meta")
    else:
        model = load_model(cfg.model.pretrained).train()
    model.cfg.attn_impl = cfg.model.attn_impl
    distill = None
    if cfg.distill is not None:
        dtype = DTYPES[cfg.distill.dtype]
        teacher = build_model(load_config(cfg.distill.teacher), device="meta", dtype=dtype) if device == "meta" \
            else load_model(cfg.distill.teacher, dtype=dtype)
        distill = Distillation(teacher, alpha=cfg.distill.alpha, temperature=cfg.distill.temperature)
    return ComposerLlama(model, l0=build_l0(cfg, source), domains=cfg.data.domains, distill=distill,
                         source=source_record(cfg.model.pretrained),
                         compact=cfg.pruning is not None and cfg.pruning.compact)


def run_calibration_batches(cfg: RunConfig, vocab_size: int | None = None) -> list[torch.Tensor]:
    """The run's calibration data (:func:`~llmshear.datasets.dynamic.calibration_batches`): ``pruning.init_batches``
    batches of ``train.micro_batch_size`` sequences (``train.eval_batch_size`` when that is ``auto``) from this
    run's part of the train split, drawn with the run's proportions and seed (token ids checked against
    ``vocab_size`` where the data records none). The eval split stays unseen."""
    d = cfg.data
    parts = open_train_parts([Path(d.path) / d.train_split / domain for domain in d.domains], d.seq_len,
                             d.train_range, vocab_size)
    size = cfg.train.eval_batch_size if cfg.train.micro_batch_size == "auto" else cfg.train.micro_batch_size
    return calibration_batches(parts, d.domains, d.proportions, size, cfg.pruning.init_batches, cfg.seed)


def resumes_own_run(cfg: RunConfig) -> bool:
    """Whether the Trainer will load the run folder's own latest checkpoint (autoresume; Composer prefers it to
    ``load_path``), wherever the folder was when the checkpoint was written."""
    c = cfg.checkpoint
    return c.autoresume and (Path(c.save_folder) / LATEST_CHECKPOINT).exists()


def resumes(cfg: RunConfig) -> bool:
    """Whether the Trainer will load a checkpoint (``load_path``, or autoresume with a latest checkpoint)."""
    return cfg.checkpoint.load_path is not None or resumes_own_run(cfg)


def init_gates(cfg: RunConfig, model: ComposerLlama) -> None:
    """``pruning.init=importance``: gate logits from the source model's activation importance, before training.

    Skipped when the run resumes: the checkpoint's logits win (they are loaded after this anyway). The scores
    are computed on the GPU when the run uses one, then the model goes back to the CPU for the Trainer.
    """
    if cfg.pruning is None or cfg.pruning.init != "importance":
        return
    if resumes(cfg):
        log.info("pruning.init=importance: resuming, the checkpoint's gate logits are kept")
        return
    use_gpu = torch.cuda.is_available() and cfg.train.device != "cpu"
    lm = model.model.to("cuda") if use_gpu else model.model
    try:
        init_l0_from_importance(model.l0, lm, run_calibration_batches(cfg, lm.cfg.vocab_size))
    finally:
        lm.to("cpu")
    log.info("pruning.init=importance: gate logits set from %d calibration batches", cfg.pruning.init_batches)


def _init_device(cfg: RunConfig) -> str:
    """``meta`` on every rank but 0 when ``model.init_device=meta`` (FSDP broadcasts rank 0's weights)."""
    return "meta" if cfg.model.init_device == "meta" and dist.get_global_rank() != 0 else "cpu"


def build_train_loader(cfg: RunConfig, world_size: int, vocab_size: int | None = None):
    """The train dataloader (dynamic domain proportions; token ids checked against the model's ``vocab_size``
    where the data records none)."""
    d = cfg.data
    return build_train_dataloader(
        [Path(d.path) / d.train_split / domain for domain in d.domains], d.domains, d.proportions,
        batch_size=cfg.train.global_batch_size // world_size, seq_len=d.seq_len, seed=cfg.seed,
        num_workers=d.num_workers, train_range=d.train_range, vocab_size=vocab_size)


def build_eval_loader(cfg: RunConfig, vocab_size: int | None = None):
    """The eval dataloader (every domain's eval split once; token ids checked as for the train loader)."""
    d = cfg.data
    return build_eval_dataloader(
        [Path(d.path) / d.eval_split / domain for domain in d.domains], d.domains,
        batch_size=cfg.train.eval_batch_size or cfg.train.micro_batch_size, seq_len=d.seq_len,
        vocab_size=vocab_size)


def build_callbacks(cfg: RunConfig) -> list:
    """The non-finite loss guard, dynamic loading (which writes ``proportions.json`` at the end), RNG restoration
    on resume, FSDP2's gradient mean on backends that sum, gradient clipping (unless its threshold is 0), the pruning
    callback (pruning runs), with a bounded ``checkpoint.keep`` its count across resumes, and the recipe's Composer
    ``callbacks:``."""
    d = cfg.data
    callbacks = [NonFiniteLossGuard(cfg.train.max_nonfinite),
                 DynamicLoadingCallback(d.domains, rule=d.update, reference_losses=d.reference_losses, eta=d.eta,
                                        smoothing=d.smoothing, floor=d.floor, cap=d.cap, eval_label=EVAL_LABEL,
                                        folder=cfg.checkpoint.save_folder),
                 ResumeRNG()]
    if cfg.fsdp.enabled and cfg.fsdp.version == 2:
        callbacks.append(FSDPGradientMean())
    if clip_threshold(cfg) > 0:
        callbacks.append(ClipGradNorm(clip_threshold(cfg)))
    if cfg.pruning is not None:
        p = cfg.pruning
        callbacks.append(PruningCallback(cfg.checkpoint.save_folder, target_label=TARGET_EVAL_LABEL,
                                         layer_candidates=p.layer_candidates if p.layer_choice == "loss" else 1))
    if cfg.checkpoint.keep > 0:
        callbacks.append(KeepAcrossResumes(cfg.checkpoint.save_folder))
    return callbacks + build_composer_callbacks(cfg)


def build_evaluators(cfg: RunConfig, vocab_size: int | None = None) -> list[Evaluator]:
    """The evaluation every run has (dynamic loading reads it) and, when pruning with ``pruning.eval_target``,
    a second pass over the same data through the target-shape cut (see :class:`PruningCallback`)."""
    labels = [EVAL_LABEL] + ([TARGET_EVAL_LABEL] if cfg.pruning is not None and cfg.pruning.eval_target else [])
    return [Evaluator(label=label, dataloader=build_eval_loader(cfg, vocab_size)) for label in labels]


def parallelism_config(cfg: RunConfig) -> dict | None:
    """Composer's ``parallelism_config``: FSDP full shard (FSDP2 object, or FSDP1 settings), or None."""
    f = cfg.fsdp
    if not f.enabled:
        return None
    if f.version == 2:
        return {"fsdp": FSDP2Config(activation_checkpointing=f.activation_checkpointing,
                                    state_dict_type=f.state_dict_type, mixed_precision=f.mixed_precision)}
    return {"fsdp": {"sharding_strategy": "FULL_SHARD", "state_dict_type": "full", "mixed_precision":
                     f.mixed_precision, "activation_checkpointing": f.activation_checkpointing,
                     "activation_checkpointing_reentrant": False}}


def checkpoint_kwargs(cfg: RunConfig, stop: PreemptionStop) -> dict:
    """Trainer arguments for saving and resuming: a checkpoint every ``checkpoint.save_interval`` batches, at the
    end, and where ``stop`` stops the run on a signal; existing checkpoints are never overwritten."""
    c = cfg.checkpoint
    interval = c.save_interval or cfg.train.max_batches
    return {"save_folder": c.save_folder, "save_interval": save_schedule(f"{interval}ba", stop),
            "save_overwrite": False, "save_num_checkpoints_to_keep": c.keep, "autoresume": c.autoresume,
            "load_path": c.load_path, "load_weights_only": c.load_weights_only}


def build_trainer(cfg: RunConfig, world_size: int | None = None) -> Trainer:
    """Everything the run needs, assembled into a Composer :class:`Trainer` (not yet fitted); after the checkpoint
    saver, with ``checkpoint.remote`` the :class:`~llmshear.callbacks.run_folder.MirrorRunFolder` callback, then the
    :class:`~llmshear.callbacks.preemption.PreemptionStop` that ends the run on a signal once both are done."""
    world_size = world_size or dist.get_world_size()
    t = cfg.train
    stop = PreemptionStop(t.max_batches)
    model = build_composer_model(cfg)
    init_gates(cfg, model)
    o = cfg.optimizer
    optimizer = build_optimizer(model, lr=o.lr, lag_lr=o.lag_lr, betas=o.betas, eps=o.eps,
                                weight_decay=o.weight_decay)
    vocab_size = model.model.cfg.vocab_size
    train_loader = build_train_loader(cfg, world_size, vocab_size)
    log.info("model: %s parameters; %d batches of %d x %d tokens", f"{model.model.num_params():,}",
             t.max_batches, t.global_batch_size, cfg.data.seq_len)
    trainer = Trainer(
        model=model,
        train_dataloader=train_loader,
        eval_dataloader=build_evaluators(cfg, vocab_size),
        eval_interval=f"{t.eval_interval}ba",
        eval_subset_num_batches=t.eval_batches,
        max_duration=f"{t.max_batches}ba",
        optimizers=optimizer,
        schedulers=build_scheduler(optimizer, cfg.scheduler.warmup, cfg.scheduler.alpha_f, t.max_batches,
                                   o.gate_schedule),
        step_schedulers_every_batch=True,
        device_train_microbatch_size=t.micro_batch_size,
        callbacks=build_callbacks(cfg),
        algorithms=build_algorithms(cfg),
        loggers=[JSONLinesLogger(cfg.checkpoint.save_folder, resumes_own_run(cfg)), *build_loggers(cfg)],
        run_name=cfg.run_name,
        seed=cfg.seed,
        precision=t.precision,
        device=t.device,
        parallelism_config=parallelism_config(cfg),
        progress_bar=t.progress_bar,
        log_to_console=not t.progress_bar,
        console_log_interval=f"{t.log_interval}ba",
        **checkpoint_kwargs(cfg, stop),
    )
    if cfg.checkpoint.remote is not None:
        # After Composer's checkpoint saver (which the Trainer appended last): each event's checkpoint is on disk
        # by the time the mirror looks.
        trainer.state.callbacks.append(MirrorRunFolder(cfg.checkpoint.save_folder, cfg.checkpoint.remote))
    trainer.state.callbacks.append(stop)
    return trainer

