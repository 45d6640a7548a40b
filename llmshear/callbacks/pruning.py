"""Drive the L0 schedule from Composer's clock, log the pruning state, and save the masks at every evaluation."""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from composer.core import Callback, State
from composer.core.precision import get_precision_context
from composer.loggers import Logger
from composer.utils import dist
from torch import nn

from llmshear.models.cut import plan_cut
from llmshear.models.l0 import TARGET_KEYS, L0Module, params_of_masks
from llmshear.run_folder import set_aside

log = logging.getLogger(__name__)

SUPERSEDED_DIR = "superseded"
FREEZE_KEYS = ("decided", "undecided")  # of the cut report, logged where the masks freeze (l0/freeze/<structure>/)


def unwrap_model(state: State) -> nn.Module:
    """``state.model`` without its DDP wrapper (a :class:`ComposerLlama`)."""
    return state.model.module if isinstance(state.model, nn.parallel.DistributedDataParallel) else state.model


def unwrap_l0(state: State) -> L0Module:
    """The L0 module of ``state.model`` (a :class:`ComposerLlama`, or the DDP wrapper around one).

    Raises:
        ValueError: the model has no L0 module (the callback belongs to pruning runs only).
    """
    l0 = getattr(unwrap_model(state), "l0", None)
    if l0 is None:
        raise ValueError("PruningCallback needs a model with an L0 module (set pruning.target in the config)")
    return l0


@contextlib.contextmanager
def full_parameters(module: nn.Module) -> Iterator[None]:
    """Make an FSDP2-sharded module hold its full parameters for the duration (a no-op otherwise).

    Every rank must enter it together: gathering the shards is a collective.
    """
    unshard = getattr(module, "unshard", None)
    if unshard is None:
        yield
        return
    unshard()
    try:
        yield
    finally:
        module.reshard()


class PruningCallback(Callback):
    """The pruning run's bookkeeping around the :class:`~llmshear.models.l0.L0Module`.

    * ``batch_start``: tells the L0 module the current batch, from which it computes the target sparsity
      (linear warm-up), clamps its gate logits and (``exact``) solves the row shifts; at the hardening batch,
      freezes the masks as 0/1; before it, from the ramp's end, records the gates' usage. With
      ``layer_candidates`` above 1, the layers whose gates are undecided at the freeze are chosen by the
      lowest loss on this batch's tokens among at most that many cuts (:meth:`L0Module.layer_candidates`,
      forwards only, the losses summed over the ranks so that all choose alike; logged as
      ``l0/layer_choice/...``). Where the masks freeze, the kept units' share of decided gates and the share
      of undecided gates (:meth:`L0Module.cut_report`, after the layer choice) are logged as
      ``l0/freeze/<structure>/decided`` and ``.../undecided``: the gate logits still drift for a few batches after
      the freeze (Adam's momentum; nothing reads them then), so a report taken at the run's end can differ.
    * ``eval_start``: the evaluator labelled ``target_label`` measures the target-shape cut, every other one
      the run's ``pruning.eval_masks`` (by default the current model, which dynamic loading then reads).
    * ``batch_end``: re-solves the row shifts for the logits the step moved, then logs :meth:`L0Module.metrics`
      (``l0/...`` keys: expected and target sparsity, row gaps, undecided gates, multipliers, hardened).
    * ``eval_end``: writes the deterministic masks to ``<folder>/masks/ba<N>.pt`` and, next to it,
      ``ba<N>.json`` with the shape and parameter count they cut to (rank 0 only; an existing file is never
      replaced), with the :meth:`~L0Module.cut_report`.
    * ``fit_start``: masks of evaluations after the batch the run starts from (written by a run that was killed
      and is now resumed, which evaluates those batches again) are moved to ``masks/superseded/``, so the
      folder reads as one run.

    Args:
        folder: the run's folder; ``None`` logs but saves no masks.
        target_label: the label of the evaluator that measures the target-shape cut (if the run has one).
        layer_candidates: how many layer cuts the freeze may compare (``pruning.layer_candidates`` with
            ``pruning.layer_choice: loss``); 1 keeps the frozen ranking's.
    """

    def __init__(self, folder: str | Path | None, target_label: str = "eval_target", layer_candidates: int = 1):
        self.folder = Path(folder) if folder is not None else None
        self.target_label = target_label
        self.layer_candidates = layer_candidates

    def fit_start(self, state: State, logger: Logger) -> None:
        directory = self.folder / "masks" if self.folder is not None else None
        if directory is None or not directory.is_dir() or dist.get_global_rank() != 0:
            return
        start = int(state.timestamp.batch)
        for path in sorted(directory.glob("ba*.*")):
            match = re.fullmatch(r"ba(\d+)(-\d+)?\.(pt|json)", path.name)
            if match and int(match.group(1)) > start:
                set_aside(path, f"evaluated after batch {start}, where this run starts", into=SUPERSEDED_DIR)

    def batch_start(self, state: State, logger: Logger) -> None:
        l0 = unwrap_l0(state)
        unwrap_model(state).start_batch()
        l0.set_step(int(state.timestamp.batch))
        candidates, freezing = [], False
        with full_parameters(l0):
            l0.update_shifts()
            if l0.harden_due():
                freezing = True
                l0.harden()
                candidates = l0.layer_candidates(self.layer_candidates) if self.layer_candidates > 1 else []
            l0.record_usage()
        if len(candidates) > 1:
            self.choose_layers(state, logger, candidates)
        if freezing:
            with full_parameters(l0):
                report = l0.cut_report()
            logger.log_metrics({f"l0/freeze/{name}/{key}": s[key] for name, s in report.items()
                                for key in FREEZE_KEYS})

    def choose_layers(self, state: State, logger: Logger, candidates: list[torch.Tensor]) -> None:
        """Freeze the layer mask of ``candidates`` under which this batch's tokens have the lowest loss."""
        model, l0 = unwrap_model(state), unwrap_l0(state)
        micro = state.device_train_microbatch_size
        micro = micro if isinstance(micro, int) else len(state.batch["input_ids"])
        sums = []
        with get_precision_context(state.precision, state.precision_config):  # as the training forwards run
            for mask in candidates:
                l0.freeze_layers(mask)
                sums.append(model.forward_loss(state.batch, micro))
        totals = torch.tensor(sums, dtype=torch.float64)
        if dist.get_world_size() > 1:
            totals = state.device.tensor_to_device(totals)
            dist.all_reduce(totals, reduce_operation="SUM")
        losses = (totals[:, 0] / totals[:, 1].clamp_min(1)).cpu()
        best = int(losses.argmin())
        l0.freeze_layers(candidates[best])
        batch = int(state.timestamp.batch)
        kept = [mask.nonzero().flatten().tolist() for mask in (candidates[best], candidates[0])]
        log.info("batch %d: %d layer cuts compared on this batch's tokens (loss %s); kept layers %s%s", batch,
                 len(candidates), " / ".join(f"{x:.4f}" for x in losses.tolist()), kept[0],
                 " (the ranking's)" if best == 0 else f", not the ranking's {kept[1]}")
        logger.log_metrics({"l0/layer_choice/candidates": len(candidates), "l0/layer_choice/rank": best,
                            "l0/layer_choice/gain": float(losses[0] - losses[best])})

    def eval_start(self, state: State, logger: Logger) -> None:
        unwrap_l0(state).use_eval_masks("target" if state.dataloader_label == self.target_label else None)

    def batch_end(self, state: State, logger: Logger) -> None:
        l0 = unwrap_l0(state)
        with full_parameters(l0):
            l0.update_shifts()  # the logits moved in this step: report the state the next batch starts from
            metrics = l0.metrics()
        metrics["l0/batch_flops"] = unwrap_model(state).flops_per_batch(state.batch)
        logger.log_metrics(metrics)

    def eval_end(self, state: State, logger: Logger) -> None:
        l0 = unwrap_l0(state)
        l0.use_eval_masks(None)
        if state.dataloader_label == self.target_label:
            return  # the masks of this evaluation were saved after the first evaluator
        with full_parameters(l0):
            masks = {name: mask.detach().cpu().clone() for name, mask in l0.deterministic_masks().items()}
            report = l0.cut_report()
        batch = int(state.timestamp.batch)
        summary = {**mask_summary(l0, masks, batch), "hardened": l0.is_hardened(), "cut_report": report}
        logger.log_metrics({"l0/deterministic_params": summary["params"]})
        if self.folder is not None and dist.get_global_rank() == 0:
            path = save_masks(self.folder / "masks", f"ba{batch}", masks, summary)
            log.info("batch %d: masks saved to %s (would cut to %s)", batch, path, summary["shape"])


def mask_summary(l0: L0Module, masks: dict[str, torch.Tensor], batch: int) -> dict:
    """What the deterministic ``masks`` cut ``l0.source`` to: the shape, its exact parameter count, the target."""
    cut = plan_cut(l0.source, masks).config(l0.source)
    indicators = {name: (mask != 0).double() for name, mask in masks.items()}
    return {
        "batch": batch,
        "shape": {key: getattr(cut, key) for key in TARGET_KEYS},
        "target": {key: getattr(l0.target, key) for key in TARGET_KEYS},
        "params": int(params_of_masks(l0.source, indicators)),
    }


def save_masks(directory: Path, stem: str, masks: dict[str, torch.Tensor], summary: dict) -> Path:
    """Write ``<stem>.pt`` and ``<stem>.json`` into ``directory`` without replacing any existing file.

    When ``<stem>.pt`` or ``<stem>.json`` exists (an evaluation re-run after a resume), ``<stem>-1``,
    ``<stem>-2``, ... is used instead.

    Returns:
        The path of the ``.pt`` file written.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for attempt in range(1000):
        name = stem if attempt == 0 else f"{stem}-{attempt}"
        pt, js = directory / f"{name}.pt", directory / f"{name}.json"
        if js.exists():
            continue
        try:
            with open(pt, "xb") as handle:
                torch.save(masks, handle)
        except FileExistsError:
            continue
        js.write_text(json.dumps(summary, indent=2) + "\n")
        return pt
    raise FileExistsError(f"{directory}: no free file name for {stem}.pt after 1000 attempts")
