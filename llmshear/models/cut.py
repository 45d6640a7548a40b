"""Cut a masked :class:`LlamaLM` into the dense model its deterministic masks describe.

The kept gate values are folded into the weights, so the cut model computes exactly what the masked model
computed: per-head gates scale ``o_proj`` columns, channel gates scale ``down_proj`` columns, and the layer
and hidden gates scale the rows (and bias) of ``o_proj`` and ``down_proj``. Pruned units are dropped from
every matrix, norm and embedding that has them; kept layers are renumbered ``0..n-1``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from llmshear.models.build import empty_model, reset_rotary
from llmshear.models.llama import SHAPE_KEYS, LlamaConfig, LlamaLM, Masks

logger = logging.getLogger(__name__)

@dataclass
class LayerKeep:
    """What one kept layer keeps, as indices into the source layer, and the gate values to fold."""

    source_index: int
    kv_groups: torch.Tensor  # (kv',) long
    heads: torch.Tensor  # (kv' * q',) long, query-head indices in the source layer, grouped by KV head
    head_gate: torch.Tensor  # (kv' * q',) kv_group * head value of each kept query head
    channels: torch.Tensor  # (I',) long
    channel_gate: torch.Tensor  # (I',)
    layer_gate: torch.Tensor  # () value of the layer gate


@dataclass
class KeepPlan:
    """Everything :func:`cut_model` keeps: the hidden dimensions (with gate values) and each kept layer."""

    hidden: torch.Tensor  # (d',) long
    hidden_gate: torch.Tensor  # (d',)
    layers: list[LayerKeep]

    def config(self, source: LlamaConfig) -> LlamaConfig:
        """The cut model's config: the source's with the kept sizes."""
        first = self.layers[0]
        return dataclasses.replace(source, d_model=len(self.hidden), n_layers=len(self.layers),
                                   n_heads=len(first.heads), n_kv_heads=len(first.kv_groups),
                                   intermediate_size=len(first.channels))


def _gate(masks: Masks, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The mask ``name`` on the CPU in fp32, or ones of ``shape`` when absent."""
    if name not in masks:
        return torch.ones(shape)
    mask = masks[name].detach().float().cpu()
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask {name!r} has shape {tuple(mask.shape)}, expected {shape}")
    return mask


def plan_cut(cfg: LlamaConfig, masks: Masks) -> KeepPlan:
    """Read the kept units off deterministic masks (zero = pruned) and check they form a valid model.

    Raises:
        ValueError: a mask has the wrong shape, or kept layers disagree on their head, KV-group or channel
            counts, or a KV group keeps a different number of query heads than another (not a valid GQA model).
    """
    n_kv, q = cfg.n_kv_heads, cfg.q_per_kv
    layer = _gate(masks, "layer", (cfg.n_layers,))
    kv = _gate(masks, "kv_group", (cfg.n_layers, n_kv))
    head = _gate(masks, "head", (cfg.n_layers, n_kv, q))
    channel = _gate(masks, "intermediate", (cfg.n_layers, cfg.intermediate_size))
    hidden = _gate(masks, "hidden", (cfg.d_model,))
    layers = []
    for i in layer.nonzero().flatten().tolist():
        groups = kv[i].nonzero().flatten()
        per_group = [head[i, g].nonzero().flatten() for g in groups.tolist()]
        if len({len(h) for h in per_group}) > 1:
            raise ValueError(f"layer {i}: KV groups keep {[len(h) for h in per_group]} query heads; GQA needs equal")
        heads = torch.cat([g * q + h for g, h in zip(groups.tolist(), per_group, strict=True)])
        gate = (kv[i].unsqueeze(-1) * head[i]).flatten()[heads]
        channels = channel[i].nonzero().flatten()
        layers.append(LayerKeep(i, groups, heads, gate, channels, channel[i][channels], layer[i]))
    if not layers:
        raise ValueError("the masks prune every layer")
    for field in ("kv_groups", "heads", "channels"):
        counts = {keep.source_index: len(getattr(keep, field)) for keep in layers}
        if len(set(counts.values())) != 1 or 0 in counts.values():
            raise ValueError(f"kept layers keep different or zero numbers of {field}: {counts}")
    kept_hidden = hidden.nonzero().flatten()
    if len(kept_hidden) == 0:
        raise ValueError("the masks prune every hidden dimension")
    return KeepPlan(kept_hidden, hidden[kept_hidden], layers)


def _rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices ``(len(heads) * head_dim,)`` of the given heads in a q/k/v projection."""
    return (heads.unsqueeze(-1) * head_dim + torch.arange(head_dim)).flatten()


def _pick(w: torch.Tensor, dim: int, index: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``w`` restricted to ``index`` along ``dim``, optionally multiplied by ``scale`` along that dim."""
    out = w.index_select(dim, index.to(w.device))
    if scale is not None:
        shape = [1] * out.dim()
        shape[dim] = -1
        out = out * scale.to(device=w.device, dtype=w.dtype).view(shape)
    return out


def _cut_layer(old: dict[str, torch.Tensor], keep: LayerKeep, plan: KeepPlan, cfg: LlamaConfig) -> dict:
    """The new layer's tensors, from the old layer's (names relative to the layer)."""
    hd, hidden = cfg.head_dim, plan.hidden
    # Layer and hidden gates multiply the block outputs: fold them into the output rows of o_proj/down_proj.
    out_scale = plan.hidden_gate * keep.layer_gate
    q_rows, kv_rows = _rows(keep.heads, hd), _rows(keep.kv_groups, hd)
    new = {
        "self_attn.q_proj.weight": _pick(_pick(old["self_attn.q_proj.weight"], 0, q_rows), 1, hidden),
        "self_attn.k_proj.weight": _pick(_pick(old["self_attn.k_proj.weight"], 0, kv_rows), 1, hidden),
        "self_attn.v_proj.weight": _pick(_pick(old["self_attn.v_proj.weight"], 0, kv_rows), 1, hidden),
        "self_attn.o_proj.weight": _pick(_pick(old["self_attn.o_proj.weight"], 1, q_rows,
                                               keep.head_gate.repeat_interleave(hd)), 0, hidden, out_scale),
        "mlp.gate_proj.weight": _pick(_pick(old["mlp.gate_proj.weight"], 0, keep.channels), 1, hidden),
        "mlp.up_proj.weight": _pick(_pick(old["mlp.up_proj.weight"], 0, keep.channels), 1, hidden),
        "mlp.down_proj.weight": _pick(_pick(old["mlp.down_proj.weight"], 1, keep.channels, keep.channel_gate),
                                      0, hidden, out_scale),
        "input_layernorm.weight": _pick(old["input_layernorm.weight"], 0, hidden),
        "post_attention_layernorm.weight": _pick(old["post_attention_layernorm.weight"], 0, hidden),
    }
    if cfg.qkv_bias:
        new["self_attn.q_proj.bias"] = _pick(old["self_attn.q_proj.bias"], 0, q_rows)
        new["self_attn.k_proj.bias"] = _pick(old["self_attn.k_proj.bias"], 0, kv_rows)
        new["self_attn.v_proj.bias"] = _pick(old["self_attn.v_proj.bias"], 0, kv_rows)
    if cfg.o_bias:
        new["self_attn.o_proj.bias"] = _pick(old["self_attn.o_proj.bias"], 0, hidden, out_scale)
    return new


@torch.no_grad()
def cut_model(model: LlamaLM, masks: Masks) -> LlamaLM:
    """The dense model that computes what ``model(x, masks)`` computes, with the zero-gated units removed.

    Args:
        model: the source model, on any device (``meta`` too: the result is then a meta model of the cut shape).
        masks: deterministic masks (names and shapes as in :mod:`llmshear.models.llama`); zero means pruned,
            a nonzero value is folded into the weights.

    Returns:
        A new :class:`LlamaLM` with the source's dtype and device; the source is left unchanged.
    """
    cfg = model.cfg
    plan = plan_cut(cfg, masks)
    state = model.state_dict()
    hidden = plan.hidden
    new_state = {
        "model.embed_tokens.weight": _pick(state["model.embed_tokens.weight"], 1, hidden),
        "model.norm.weight": _pick(state["model.norm.weight"], 0, hidden),
        "lm_head.weight": _pick(state["lm_head.weight"], 1, hidden),
    }
    for new_index, keep in enumerate(plan.layers):
        prefix = f"model.layers.{keep.source_index}."
        old = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        new_state.update({f"model.layers.{new_index}.{k}": v for k, v in _cut_layer(old, keep, plan, cfg).items()})
    return model_from_state(plan.config(cfg), new_state)


def model_from_state(cfg: LlamaConfig, state: dict[str, torch.Tensor]) -> LlamaLM:
    """A :class:`LlamaLM` that takes over the tensors of ``state`` (no copy), strictly: every key, no other.

    Raises:
        ValueError: a key is missing or unexpected, or a shape differs (the keys are named).
    """
    model = empty_model(cfg, device="meta", dtype=state["lm_head.weight"].dtype)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"weights do not match the config: {err}") from err
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # `assign` gave lm_head its own Parameter
    reset_rotary(model)
    return model


def prune_summary(model: LlamaLM, masks: Masks, cut: LlamaLM | None = None) -> dict:
    """A JSON-ready account of the cut: parameter counts, kept layers, heads and channels per layer.

    Args:
        model: the source model.
        masks: the deterministic masks the cut used.
        cut: the cut model (counted directly when given; otherwise it is built).
    """
    plan = plan_cut(model.cfg, masks)
    cut = cut if cut is not None else cut_model(model, masks)
    return {
        "params_before": model.num_params(),
        "params_after": cut.num_params(),
        "source": {k: getattr(model.cfg, k) for k in SHAPE_KEYS},
        "pruned": {k: getattr(cut.cfg, k) for k in SHAPE_KEYS},
        "kept_layers": [keep.source_index for keep in plan.layers],
        "layers": [{"source_layer": keep.source_index, "kv_groups": keep.kv_groups.tolist(),
                    "heads": keep.heads.tolist(), "channels": len(keep.channels)} for keep in plan.layers],
    }
