"""Activation importance (Minitron-style width and depth scores): gate initialisation and one-shot pruning.

:func:`activation_importance` runs the model on a few calibration batches with forward hooks (the model's
forward is not changed) and scores every unit of every structure of :mod:`llmshear.models.l0`; a higher score
means a more important unit. The scores measure what removing the unit removes from the residual stream:

=================  ===================================================================================
structure          score (mean over calibration tokens)
=================  ===================================================================================
``head``           L2 norm of the head's contribution ``W_o[:, h] · attn_h`` to the residual stream
``kv_group``       sum of the scores of its query heads
``intermediate``   ``|silu(gate_c) · up_c| · ||W_down[:, c]||``: the norm of the channel's contribution
``hidden``         sum over every RMSNorm (two per layer and the final one) of ``|norm(x)_j|``
``layer``          ``1 - cos(x_in, x_out)`` of the layer's input and output hidden states (ShortGPT)
=================  ===================================================================================

Head and channel scores include the output projection on purpose: a head whose ``o_proj`` columns are zero
contributes nothing, however large its attention output is.

:func:`importance_log_alpha` turns scores into initial gate logits for :class:`~llmshear.models.l0.L0Module`
(``pruning.init: importance``); :func:`importance_masks` prunes in one shot (no training) and
:func:`random_masks` draws a random structured selection of the same shape, a baseline.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch

from llmshear.models.l0 import L0Module, MaskSpec, TargetShape, deterministic_gates, mask_shapes, mask_specs
from llmshear.models.llama import LlamaConfig, LlamaLM, Masks

logger = logging.getLogger(__name__)

DEFAULT_SPREAD = 2.0


def _register_hooks(model: LlamaLM, sums: dict[str, torch.Tensor]) -> list:
    """Hooks that add each batch's per-unit sums over tokens into ``sums`` (``head`` as ``(n_layers, n_heads)``)."""
    cfg = model.cfg
    handles = []

    def head_hook(i: int, module: torch.nn.Module, args: tuple) -> None:
        x = args[0].float()  # (B, T, n_heads * head_dim): per-head attention outputs, before o_proj
        x = x.reshape(-1, cfg.n_heads, cfg.head_dim)
        w = module.weight.float().view(-1, cfg.n_heads, cfg.head_dim)  # (d, H, hd)
        gram = torch.einsum("dhk,dhl->hkl", w, w)  # ||W_h x||^2 = x^T (W_h^T W_h) x, without a (tokens, H, d) tensor
        squared = torch.einsum("nhk,hkl,nhl->nh", x, gram, x)
        sums["head"][i] += squared.clamp_min(0).sqrt().sum(0)

    def channel_hook(i: int, module: torch.nn.Module, args: tuple) -> None:
        h = args[0].float().reshape(-1, cfg.intermediate_size)  # silu(gate) * up, (tokens, I)
        sums["intermediate"][i] += h.abs().sum(0) * module.weight.float().norm(dim=0)

    def norm_hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        sums["hidden"] += output.float().abs().reshape(-1, cfg.d_model).sum(0)

    def layer_hook(i: int, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        cos = torch.nn.functional.cosine_similarity(args[0].float(), output.float(), dim=-1)
        sums["layer"][i] += (1 - cos).sum()

    for i, layer in enumerate(model.model.layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: head_hook(i, m, a)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: channel_hook(i, m, a)))
        handles.append(layer.register_forward_hook(lambda m, a, o, i=i: layer_hook(i, m, a, o)))
        handles.append(layer.input_layernorm.register_forward_hook(norm_hook))
        handles.append(layer.post_attention_layernorm.register_forward_hook(norm_hook))
    handles.append(model.model.norm.register_forward_hook(norm_hook))
    return handles


@torch.no_grad()
def activation_importance(model: LlamaLM, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-unit importance scores of ``model`` on calibration ``batches`` (see the module docstring).

    The model runs unmasked, in eval mode and without gradients; its training mode is restored afterwards.

    Args:
        model: the (unpruned) model to score.
        batches: input ids ``(B, T)`` each, moved to the model's device.

    Returns:
        ``layer`` ``(n_layers,)``, ``kv_group`` ``(n_layers, n_kv_heads)``, ``head`` ``(n_layers, n_kv_heads,
        q_per_kv)``, ``intermediate`` ``(n_layers, intermediate_size)`` and ``hidden`` ``(d_model,)``: fp32 on
        the CPU, means over the calibration tokens, higher = more important.

    Raises:
        ValueError: ``batches`` is empty.
    """
    cfg = model.cfg
    device = model.lm_head.weight.device
    shapes = {**mask_shapes(cfg), "head": (cfg.n_layers, cfg.n_heads)}
    sums = {name: torch.zeros(shape, device=device) for name, shape in shapes.items() if name != "kv_group"}
    handles = _register_hooks(model, sums)
    was_training, tokens = model.training, 0
    model.eval()
    try:
        for input_ids in batches:
            model(input_ids.to(device))
            tokens += input_ids.numel()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if tokens == 0:
        raise ValueError("activation_importance needs at least one calibration batch")
    scores = {name: (total / tokens).cpu() for name, total in sums.items()}
    scores["head"] = scores["head"].view(mask_shapes(cfg)["head"])
    scores["kv_group"] = scores["head"].sum(-1)
    logger.info("activation importance from %d calibration tokens", tokens)
    return {name: scores[name] for name in mask_shapes(cfg)}


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every element within its row (last axis): 0 = highest score; ties go to the lower index."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    positions = torch.arange(scores.shape[-1]).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def importance_log_alpha(scores: Mapping[str, torch.Tensor], specs: Iterable[MaskSpec], init: float = 5.0,
                         spread: float = DEFAULT_SPREAD) -> dict[str, torch.Tensor]:
    """Initial gate logits that rank every structure's units by importance, around the constant init.

    Within each row (the last axis, where :func:`~llmshear.models.l0.deterministic_gates` takes its top-k),
    units are ranked by score (``r = 0`` the most important; ties go to the lower index). Of ``n`` units the
    spec keeps ``k``; the logits are piecewise linear in the rank, with the constant init as the boundary:

    - kept ranks ``r < k``: ``init + spread · (k - r) / k``, in ``(init, init + spread]``;
    - pruned ranks ``r >= k``: ``init - spread · (r - k + 1) / (n - k)``, in ``[init - spread, init)``.

    So the top ``k`` logits lie strictly above all others (deterministic masks from them select the most
    important sub-network from the first step), every logit lies within ``init ± spread``, and the mean lies
    within ``spread / 2`` of ``init``. With the default ``init = 5`` and ``spread = 2`` every gate still
    starts open (``P(z != 0) > 0.98``), so the expected sparsity starts near 0 like the Lagrangian's target
    ramp; the less important gates, with lower logits, sit on the steeper part of the sigmoid and close first.

    Args:
        scores: per structure, scores of its mask shape (:func:`activation_importance`).
        specs: the structures to initialise (``L0Module.specs`` or :func:`~llmshear.models.l0.mask_specs`).
        init: the constant init the logits spread around (``pruning.init_log_alpha``).
        spread: the largest distance from ``init``.

    Returns:
        Per spec name, fp32 logits of the spec's shape.
    """
    logits = {}
    for spec in specs:
        score = scores[spec.name].float().cpu()
        if tuple(score.shape) != spec.shape:
            raise ValueError(f"scores {spec.name!r} have shape {tuple(score.shape)}, expected {spec.shape}")
        rank = _ranks(score).float()
        n, k = spec.units, spec.keep
        kept = init + spread * (k - rank) / k
        pruned = init - spread * (rank - k + 1) / max(n - k, 1)
        logits[spec.name] = torch.where(rank < k, kept, pruned)
    return logits


@torch.no_grad()
def init_l0_from_importance(l0: L0Module, model: LlamaLM, batches: Iterable[torch.Tensor],
                            spread: float = DEFAULT_SPREAD) -> dict[str, torch.Tensor]:
    """Set ``l0``'s gate logits from the activation importance of ``model`` (``pruning.init: importance``).

    Returns:
        The scores (:func:`activation_importance`).
    """
    scores = activation_importance(model, batches)
    logits = importance_log_alpha(scores, l0.specs, init=l0.options["init_log_alpha"], spread=spread)
    for name, value in logits.items():
        l0.log_alpha[name].copy_(value)
    return scores


def _binary(logits: Mapping[str, torch.Tensor], specs: Iterable[MaskSpec]) -> Masks:
    """0/1 masks keeping each spec's top ``keep`` per row (exactly the target counts, valid GQA groups)."""
    return {s.name: (deterministic_gates(logits[s.name], s.keep) != 0).float() for s in specs}


def importance_masks(model: LlamaLM, target: TargetShape, batches: Iterable[torch.Tensor]) -> Masks:
    """One-shot pruning: 0/1 masks of exactly ``target``'s shape that keep the most important units.

    Every structure keeps its top units by :func:`activation_importance`, selected like the learned
    deterministic masks (per layer, per KV group for query heads, so every kept KV group keeps the same
    number of query heads). ``prune.cut_model(model, masks)`` then gives a dense model of the target config.
    Structures whose target equals the source have no mask (keep everything).

    Raises:
        ValueError: the target cannot be cut from ``model`` (see :meth:`TargetShape.check`), or no batches.
    """
    specs = mask_specs(model.cfg, target)
    scores = activation_importance(model, batches)
    return _binary(importance_log_alpha(scores, specs), specs)


def random_masks(cfg: LlamaConfig, target: TargetShape, generator: torch.Generator) -> Masks:
    """A uniformly random structured selection of ``target``'s shape (0/1 masks, same rules as above).

    Args:
        cfg: the source config.
        target: the shape to reach.
        generator: a seeded CPU generator; the same seed gives the same masks.
    """
    specs = mask_specs(cfg, target)
    return _binary({s.name: torch.rand(s.shape, generator=generator) for s in specs}, specs)
