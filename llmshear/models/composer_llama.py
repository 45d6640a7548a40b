"""Composer wrapper: LM cross-entropy (+ the Lagrangian while pruning), per-domain metrics, FSDP/AC hooks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import ComposerModel
from torch import nn

from llmshear.batch import IGNORE_INDEX
from llmshear.costs import active_forward_flops_per_token, forward_flops_per_token, train_flops_per_token
from llmshear.metrics import DomainMetric, build_domain_metrics
from llmshear.models.llama import SHAPE_KEYS, DecoderLayer, LlamaConfig, LlamaLM


def shift_for_next_token(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align position t's logits with token t+1: ``(B, T, V), (B, T)`` → ``(B, T-1, V), (B, T-1)``."""
    return logits[:, :-1].contiguous(), labels[:, 1:].contiguous()


def model_flops(cfg: LlamaConfig, batch: int, seq_len: int, backward: bool = True) -> int:
    """FLOPs of a forward (and backward) pass over ``batch`` sequences of ``seq_len`` tokens of a ``cfg``-shaped
    model, as :mod:`llmshear.costs` counts them (one definition for the speed monitor, the benchmarks and the
    planner):

        ``6·N·B·T + 12·L·H·d_head·T²·B``      (B sequences of T tokens, L layers, H query heads)

    ``N``: every parameter but the input embedding (a tied output head still multiplies). A masked (pruning)
    model computes at its full source shape, the masks only scale activations; a cut model at its own shape.
    """
    per_token = train_flops_per_token(cfg, seq_len) if backward else forward_flops_per_token(cfg, seq_len)
    return round(per_token * batch * seq_len)


class Distillation:
    """Logit distillation from a frozen teacher that sees the same batch.

    The teacher is deliberately not a submodule: it must not enter the optimizer, the checkpoints or the
    gradient sync, so it is kept outside the module tree and moved to the batch's device on first use.

    Args:
        teacher: the frozen model (usually the source model before pruning).
        alpha: weight of the distillation term; the LM loss gets ``1 - alpha``.
        temperature: both distributions are softened by it; the KL is scaled by ``temperature**2`` so its
            gradient scale does not shrink as the temperature grows.
    """

    def __init__(self, teacher: LlamaLM, alpha: float = 0.5, temperature: float = 1.0):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"distill.alpha must lie in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"distill.temperature must be positive, got {temperature}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.alpha = alpha
        self.temperature = temperature

    @torch.no_grad()
    def teacher_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Teacher logits ``(B, T-1, V)`` aligned with the student's shifted logits."""
        param = next(self.teacher.parameters())
        if param.device != input_ids.device:
            self.teacher.to(input_ids.device)
        return self.teacher(input_ids)[:, :-1].float()

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """``T² · KL(teacher ‖ student)`` averaged over the tokens that are not ignored.

        Args:
            logits: student logits ``(B, T-1, V)``, already shifted.
            labels: ``(B, T-1)``; positions equal to ``-100`` are excluded.
            input_ids: ``(B, T)``, what the teacher reads.
        """
        t = self.temperature
        teacher_logp = F.log_softmax(self.teacher_logits(input_ids) / t, dim=-1)
        student_logp = F.log_softmax(logits.float() / t, dim=-1)
        per_token = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
        keep = labels != IGNORE_INDEX
        return per_token[keep].mean() * t * t


class ComposerLlama(ComposerModel):
    """A :class:`LlamaLM` trained by Composer, optionally with an L0 module that masks it.

    Args:
        model: the language model (``.model`` in checkpoints, HF parameter names below it).
        l0: the pruning masks and their Lagrangian (``.l0`` in checkpoints), or ``None`` for plain training.
        domains: domain names, in the order of the batches' ``domain`` index, for per-domain eval metrics.
        distill: optional :class:`Distillation` (a frozen teacher whose logits the student also matches).
        source: the run's ``model.pretrained``, recorded in checkpoints so an export can save its tokenizer.
        compact: masked forwards compute only the units whose gate is not 0 (``pruning.compact``; see
            :mod:`llmshear.models.llama`); their FLOPs are counted as computed.
    """

    def __init__(
        self,
        model: LlamaLM,
        l0: nn.Module | None = None,
        domains: list[str] | tuple = (),
        distill: Distillation | None = None,
        source: str | None = None,
        compact: bool = False,
    ):
        super().__init__()
        # Composer's FSDP wrapping and activation checkpointing look for these hooks on the direct children.
        model.fsdp_wrap_fn = is_decoder_layer
        model.activation_checkpointing_fn = is_decoder_layer
        self.model = model
        self.l0 = l0
        self.domains = list(domains)
        self.distill = distill
        self.source = source
        self.compact = compact
        self.batch_flops = 0.0  # compact pruning: FLOPs of the training forwards since start_batch()
        self.side_flops = 0.0  # FLOPs of forwards outside the training step (forward_loss) since start_batch()
        self._flops_cache: dict[tuple[int, int], int] = {}
        self.train_metrics = {"LanguageCrossEntropy": LanguageCrossEntropy(ignore_index=IGNORE_INDEX)}
        self.eval_metrics = {
            "LanguageCrossEntropy": LanguageCrossEntropy(ignore_index=IGNORE_INDEX),
            "LanguagePerplexity": LanguagePerplexity(ignore_index=IGNORE_INDEX),
            **build_domain_metrics(self.domains),
        }

    def get_extra_state(self) -> dict:
        """The LM's config and source travel with the weights, so a checkpoint alone can be exported."""
        return {"model_config": self.model.cfg.to_dict(), "source": self.source}

    def set_extra_state(self, state: dict) -> None:
        mine = self.model.cfg.to_dict()
        stored = state["model_config"]
        different = sorted(k for k in SHAPE_KEYS if stored.get(k) != mine[k])
        if different:
            raise ValueError("checkpoint holds a model of another shape: " + ", ".join(
                f"{k} {stored.get(k)} (this run: {mine[k]})" for k in different))

    def start_batch(self) -> None:
        """Start counting a new batch's FLOPs (the pruning callback calls it at every batch start)."""
        self.batch_flops = self.side_flops = 0.0

    def flops_per_batch(self, batch: dict) -> int:
        """Training FLOPs of ``batch`` on this rank (read by Composer's ``speed_monitor`` for FLOPs/s and MFU):
        the model's forward and backward (:func:`model_flops`: at the source shape while masked, at the cut shape
        after; a compact masked step counts what its forwards computed since :meth:`start_batch`), plus the
        teacher's forward when distilling, plus the forwards of :meth:`forward_loss` since :meth:`start_batch`."""
        if self.l0 is not None and self.compact:
            return round(self.batch_flops + self.side_flops)
        shape = tuple(batch["input_ids"].shape)
        if shape not in self._flops_cache:
            flops = model_flops(self.model.cfg, *shape)
            if self.distill is not None:
                flops += model_flops(self.distill.teacher.cfg, *shape, backward=False)
            self._flops_cache[shape] = flops
        return self._flops_cache[shape] + round(self.side_flops)

    def masks(self) -> dict[str, torch.Tensor] | None:
        """Sampled masks in training mode, deterministic ones in eval mode, ``None`` without pruning."""
        return None if self.l0 is None else self.l0()

    def forward(self, batch: dict) -> torch.Tensor:
        """Logits ``(B, T, vocab)`` for ``batch['input_ids']`` ``(B, T)``."""
        masks = self.masks()
        logits = self.model(batch["input_ids"], masks, compact=self.compact)
        if self.training and self.compact and masks is not None:
            b, t = batch["input_ids"].shape
            per_token = 3 * active_forward_flops_per_token(self.model.cfg, self.model.active, t)
            if self.distill is not None:
                per_token += forward_flops_per_token(self.distill.teacher.cfg, t)
            self.batch_flops += per_token * b * t
        return logits

    @torch.no_grad()
    def forward_loss(self, batch: dict, micro_batch_size: int) -> tuple[float, int]:
        """The summed next-token cross-entropy of ``batch`` under the current masks and the tokens it counts:
        forwards only (no teacher), ``micro_batch_size`` sequences at a time, in eval mode; their FLOPs join
        this batch's count (:meth:`flops_per_batch`)."""
        training = self.training
        self.eval()
        total, tokens = 0.0, 0
        try:
            for start in range(0, len(batch["input_ids"]), micro_batch_size):
                input_ids = batch["input_ids"][start:start + micro_batch_size]
                logits, labels = shift_for_next_token(self.model(input_ids, self.masks(), compact=self.compact),
                                                      batch["labels"][start:start + micro_batch_size])
                total += next_token_cross_entropy(logits, labels, reduction="sum").item()
                tokens += int((labels != IGNORE_INDEX).sum())
                b, t = input_ids.shape
                if self.compact and self.l0 is not None:
                    self.side_flops += active_forward_flops_per_token(self.model.cfg, self.model.active, t) * b * t
                else:
                    self.side_flops += model_flops(self.model.cfg, b, t, backward=False)
        finally:
            self.train(training)
        return total, tokens

    def loss(self, outputs: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """Returns ``ce`` (LM loss), ``distill`` and ``lagrangian`` when enabled, and the ``total`` to minimise."""
        logits, labels = shift_for_next_token(outputs, batch["labels"])
        ce = next_token_cross_entropy(logits, labels)
        losses = {"ce": ce}
        total = ce
        if self.distill is not None:
            losses["distill"] = self.distill.loss(logits, labels, batch["input_ids"])
            total = (1 - self.distill.alpha) * ce + self.distill.alpha * losses["distill"]
        if self.l0 is not None:
            losses["lagrangian"] = self.l0.lagrangian_loss()
            total = total + losses["lagrangian"]
        losses["total"] = total
        return losses

    def eval_forward(self, batch: dict, outputs: torch.Tensor | None = None) -> torch.Tensor:
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict:
        return self.train_metrics if is_train else self.eval_metrics

    def update_metric(self, batch: dict, outputs: torch.Tensor, metric) -> None:
        logits, labels = shift_for_next_token(outputs, batch["labels"])
        if isinstance(metric, DomainMetric):
            metric.update(logits, labels, batch["domain"])
        else:
            metric.update(logits, labels)


def next_token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of shifted ``logits`` ``(B, T-1, V)`` against ``labels`` ``(B, T-1)`` in float32, the ignored
    positions left out; ``reduction`` as :func:`torch.nn.functional.cross_entropy`'s."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


def is_decoder_layer(module: nn.Module) -> bool:
    """FSDP wrapping and activation checkpointing both go block by block."""
    return isinstance(module, DecoderLayer)
