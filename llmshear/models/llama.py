"""LLaMA-family decoder (LLaMA 1/2/3, Mistral, Qwen2-style biases) whose structures can be gated by masks.

Parameter names follow Hugging Face's ``LlamaForCausalLM`` (``model.layers.0.self_attn.q_proj.weight`` ...), so
conversion in both directions is a rename-free copy (see ``hf.py``).

Masks are plain arguments of :meth:`LlamaLM.forward`: a dict of tensors, every entry optional,

=================  ==================================  =====================================================
name               shape                               gates
=================  ==================================  =====================================================
``layer``          ``(n_layers,)``                     attention and MLP output of a whole decoder layer
``kv_group``       ``(n_layers, n_kv_heads)``          every query head that shares one KV head
``head``           ``(n_layers, n_kv_heads, q_per_kv)``  one query head inside its KV group
``intermediate``   ``(n_layers, intermediate_size)``   one SwiGLU channel
``hidden``         ``(d_model,)``                      one dimension of the residual stream
=================  ==================================  =====================================================

A zero entry removes its unit exactly: cutting the zeroed units out (``models/cut.py``) gives the same logits.

With ``compact=True`` a masked forward computes only the units whose gate is not exactly 0 (:class:`LayerUnits`):
it gathers their rows and columns of every weight, so its cost follows the units still in play (hard-concrete
samples put most removed units at exactly 0) instead of the source's shape. Logits and every gradient equal the
dense masked forward's (a skipped unit's output is multiplied by 0 there, and a clamped gate has no gradient);
every weight still receives a gradient, zero where its units were skipped, so the optimizer steps alike.
:attr:`LlamaLM.active` records the shape the last compact forward computed (for its FLOPs).
"""

from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from llmshear.choices import DTYPE_NAMES

Masks = dict[str, torch.Tensor]
Index = torch.Tensor | None  # indices of the units a compact forward computes; None: all of them
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # weights' dtypes
# The fields of LlamaConfig that give the shape (the rest are numerics and conventions).
SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "intermediate_size")


@dataclass
class LlamaConfig:
    """Shape and numerics of a LLaMA-family model (``head_dim`` and ``vocab_size`` never change by pruning)."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_seq_len: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    hf_model_type: str = "llama"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    attn_impl: str = "sdpa"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for key in SHAPE_KEYS:
            value = getattr(self, key)
            try:
                size = operator.index(value)
            except TypeError:
                size = 0
            if isinstance(value, bool) or size < 1:
                raise ValueError(f"{key}={value!r}: every size of a model must be a positive integer")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.attn_impl not in ("sdpa", "flash"):
            raise ValueError(f"attn_impl must be 'sdpa' or 'flash', got {self.attn_impl!r}")

    @property
    def q_per_kv(self) -> int:
        """Query heads that share one KV head."""
        return self.n_heads // self.n_kv_heads

    def to_dict(self) -> dict:
        return asdict(self)


def rope_inv_freq(cfg: LlamaConfig) -> tuple[torch.Tensor, float]:
    """Rotary inverse frequencies ``(head_dim // 2,)`` and attention scaling, for default/linear/llama3 RoPE."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling), 1.0
    raise ValueError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3)")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    # Llama-3.1 keeps high frequencies, divides low ones by `factor`, and blends smoothly in between.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions ``0..T-1``, computed in fp32 like Hugging Face does."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        inv_freq, self.attention_scaling = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seq_len: int, device: torch.device, dtype: torch.dtype):
        """Returns cos, sin of shape ``(T, head_dim)``."""
        positions = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq.to(device=device, dtype=torch.float32))
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``(B, heads, T, head_dim)`` by cos/sin ``(T, head_dim)``."""
    return x * cos + _rotate_half(x) * sin


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, kept: torch.Tensor | None = None) -> torch.Tensor:
    """``weight`` × ``x`` over its root mean square, in fp32; ``kept``: the mean of squares divides the sum by it
    (the kept dimensions of a hidden mask) instead of by ``x``'s width."""
    dtype = x.dtype
    x = x.float()
    variance = x.pow(2).mean(-1, keepdim=True) if kept is None else x.pow(2).sum(-1, keepdim=True) / kept
    return weight * (x * torch.rsqrt(variance + eps)).to(dtype)


class RMSNorm(nn.Module):
    """RMSNorm; with a hidden mask, the mean of squares runs over the kept (nonzero-gate) dimensions only.

    That is what the cut model computes over its remaining dimensions, so masked and cut models agree.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, hidden_kept: torch.Tensor | None = None) -> torch.Tensor:
        return _rms_norm(x, self.weight, self.eps, hidden_kept)

    def forward_dims(self, x: torch.Tensor, dims: Index) -> torch.Tensor:
        """RMSNorm of ``x`` that holds only the dimensions ``dims`` of the residual stream (the kept ones)."""
        return _rms_norm(x, self.weight if dims is None else self.weight.index_select(0, dims), self.eps)


@dataclass(frozen=True)
class LayerUnits:
    """What a compact masked forward computes in one decoder layer (each ``None``: every unit).

    Attributes:
        hidden: the kept dimensions of the residual stream (shared by all layers).
        heads: the query heads whose gate is not 0, ascending.
        groups: the KV heads those query heads read, ascending.
        head_groups: for each of ``heads``, the position of its KV head in ``groups``.
        channels: the SwiGLU channels whose gate is not 0.
    """

    hidden: Index = None
    heads: Index = None
    groups: Index = None
    head_groups: Index = None
    channels: Index = None


@dataclass(frozen=True)
class ActiveShape:
    """The shape a compact masked forward computed: the residual width and, per layer, its (query heads, KV
    heads, channels)."""

    d_model: int
    layers: tuple[tuple[int, int, int], ...]


def _unit_rows(units: Index, width: int) -> Index:
    """Row indices of ``units`` that are ``width`` rows each (a head's ``head_dim`` rows of a projection)."""
    if units is None:
        return None
    return (units.unsqueeze(-1) * width + torch.arange(width, device=units.device)).flatten()


def _gathered_linear(x: torch.Tensor, layer: nn.Linear, rows: Index, cols: Index) -> torch.Tensor:
    """``layer(x)`` restricted to the output ``rows`` and input ``cols`` of its weight (bias: its ``rows``)."""
    weight, bias = layer.weight, layer.bias
    if rows is not None:
        weight = weight.index_select(0, rows)
        bias = bias.index_select(0, rows) if bias is not None else None
    if cols is not None:
        weight = weight.index_select(1, cols)
    return F.linear(x, weight, bias)


def _flash_available(x: torch.Tensor) -> bool:
    if not x.is_cuda or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


class Attention(nn.Module):
    """Grouped-query attention with RoPE; ``head_gate`` ``(n_heads,)`` scales each head's output."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.d_model, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, d, bias=cfg.o_bias)

    def forward(self, x, cos, sin, head_gate: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``(B, T, d_model)`` → ``(B, T, d_model)``."""
        b, t, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_proj(x).view(b, t, -1, hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, hd).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = self._attend(q, k, v)
        if head_gate is not None:
            out = out * head_gate.view(1, -1, 1, 1).to(out.dtype)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def forward_units(self, x, cos, sin, head_gate: torch.Tensor | None, units: LayerUnits) -> torch.Tensor:
        """:meth:`forward` of the query heads ``units.heads`` (their KV heads only) on the dimensions
        ``units.hidden`` of ``x`` ``(B, T, len(hidden))``; ``head_gate`` ``(n_heads,)``."""
        b, t, _ = x.shape
        hd, cfg = self.cfg.head_dim, self.cfg
        n, g = (cfg.n_heads, cfg.n_kv_heads) if units.heads is None else (len(units.heads), len(units.groups))
        q_rows, kv_rows = _unit_rows(units.heads, hd), _unit_rows(units.groups, hd)
        q = _gathered_linear(x, self.q_proj, q_rows, units.hidden).view(b, t, n, hd).transpose(1, 2)
        k = _gathered_linear(x, self.k_proj, kv_rows, units.hidden).view(b, t, g, hd).transpose(1, 2)
        v = _gathered_linear(x, self.v_proj, kv_rows, units.hidden).view(b, t, g, hd).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if units.heads is not None:
            k, v = k.index_select(1, units.head_groups), v.index_select(1, units.head_groups)
            if head_gate is not None:
                head_gate = head_gate.index_select(0, units.heads)
        # No head left: an empty output that keeps k and v in the graph (their weights get zero gradients).
        out = self._attend(q, k, v) if n else q + k + v
        if head_gate is not None:
            out = out * head_gate.view(1, -1, 1, 1).to(out.dtype)
        return _gathered_linear(out.transpose(1, 2).reshape(b, t, n * hd), self.o_proj, units.hidden, q_rows)

    def _attend(self, q, k, v) -> torch.Tensor:
        """Causal attention; q ``(B, H, T, hd)``, k/v ``(B, KV, T, hd)`` → ``(B, H, T, hd)``."""
        if self.cfg.attn_impl == "flash" and _flash_available(q):
            from flash_attn import flash_attn_func

            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
            return out.transpose(1, 2)
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class MLP(nn.Module):
    """SwiGLU MLP; ``channel_gate`` ``(intermediate_size,)`` scales each intermediate channel."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, channel_gate: torch.Tensor | None = None) -> torch.Tensor:
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        if channel_gate is not None:
            h = h * channel_gate.to(h.dtype)
        return self.down_proj(h)

    def forward_units(self, x: torch.Tensor, channel_gate: torch.Tensor | None, units: LayerUnits) -> torch.Tensor:
        """:meth:`forward` of the channels ``units.channels`` on the dimensions ``units.hidden`` of ``x``."""
        channels, hidden = units.channels, units.hidden
        h = F.silu(_gathered_linear(x, self.gate_proj, channels, hidden)) * _gathered_linear(
            x, self.up_proj, channels, hidden)
        if channel_gate is not None:
            gate = channel_gate if channels is None else channel_gate.index_select(0, channels)
            h = h * gate.to(h.dtype)
        return _gathered_linear(h, self.down_proj, hidden, channels)


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``, each output optionally gated."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, gates: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """``gates``: ``head`` (n_heads,), ``channel`` (I,), ``out`` (d,) or (1,), ``kept`` (count); all optional.

        ``out`` (layer gate × hidden gate) multiplies both block outputs. With ``units`` (a :class:`LayerUnits`)
        the layer computes only those units, on the kept dimensions of ``x`` (``out`` holds those dimensions).
        """
        units = gates.get("units")
        if units is not None:
            return self._forward_units(x, cos, sin, gates, units)
        kept, out = gates.get("kept"), gates.get("out")
        attn = self.self_attn(self.input_layernorm(x, kept), cos, sin, gates.get("head"))
        x = x + attn if out is None else torch.addcmul(x, attn, out)  # fused: no temporary for attn * out
        mlp = self.mlp(self.post_attention_layernorm(x, kept), gates.get("channel"))
        return x + mlp if out is None else torch.addcmul(x, mlp, out)

    def _forward_units(self, x, cos, sin, gates: dict, units: LayerUnits) -> torch.Tensor:
        out = gates.get("out")
        attn = self.self_attn.forward_units(self.input_layernorm.forward_dims(x, units.hidden), cos, sin,
                                            gates.get("head"), units)
        x = x + attn if out is None else torch.addcmul(x, attn, out)
        mlp = self.mlp.forward_units(self.post_attention_layernorm.forward_dims(x, units.hidden),
                                     gates.get("channel"), units)
        return x + mlp if out is None else torch.addcmul(x, mlp, out)


class LlamaBackbone(nn.Module):
    """Embeddings, decoder layers and final norm (HF's ``LlamaModel``)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)


def _kept(flags: torch.Tensor | None, device: torch.device | None) -> Index:
    """Indices of the true ``flags`` (on the host), moved to ``device``; ``None`` when every flag is true."""
    if flags is None or bool(flags.all()):
        return None
    index = flags.nonzero().flatten()
    return index if device is None else index.to(device, non_blocking=True)


class LlamaLM(nn.Module):
    """Causal LM: ``forward(input_ids (B, T), masks=None) → logits (B, T, vocab)``."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.active: ActiveShape | None = None  # what the last compact forward computed
        self.model = LlamaBackbone(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, masks: Masks | None = None, compact: bool = False) -> torch.Tensor:
        """Logits; ``compact``: with masks, compute only the units whose gate is not 0 (see the module doc)."""
        if compact and masks:
            return self._forward_compact(input_ids, masks)
        masks = masks or {}
        x = self.model.embed_tokens(input_ids)
        hidden = masks.get("hidden")
        kept = None
        if hidden is not None:
            # The embedding is only selected, never scaled: with tied embeddings a scale could not be folded
            # into the shared matrix. Layer outputs carry the hidden gate's values.
            keep = hidden != 0
            kept = keep.sum().float()  # counted in fp32: bf16 rounds integers above 256 (577 -> 576)
            x = x * keep.to(x.dtype)
        cos, sin = self.rotary(input_ids.shape[1], x.device, x.dtype)
        gates = self._stacked_gates(masks, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, {"kept": kept, **{name: gate[i] for name, gate in gates.items()}})
        return self.lm_head(self.model.norm(x, kept))

    def _forward_compact(self, input_ids: torch.Tensor, masks: Masks) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        gates = self._stacked_gates(masks, x.dtype)
        units = self._units(masks, gates, x.device)
        hidden = units[0].hidden
        if hidden is not None:
            x = x.index_select(-1, hidden)  # selected, never scaled, as in the dense forward
        cos, sin = self.rotary(input_ids.shape[1], x.device, x.dtype)
        out = gates.get("out")
        if out is not None and hidden is not None and out.shape[-1] > 1:
            out = out.index_select(-1, hidden)
        for i, layer in enumerate(self.model.layers):
            layer_gates = {name: gates[name][i] for name in ("head", "channel") if name in gates}
            if out is not None:
                layer_gates["out"] = out[i]
            x = layer(x, cos, sin, {**layer_gates, "units": units[i]})
        head = self.lm_head.weight if hidden is None else self.lm_head.weight.index_select(1, hidden)
        return F.linear(self.model.norm.forward_dims(x, hidden), head)

    def _units(self, masks: Masks, gates: dict[str, torch.Tensor], device: torch.device) -> list[LayerUnits]:
        """Every layer's :class:`LayerUnits` (one transfer of the gates' zero pattern to the host), and
        :attr:`active` set to the shape they compute."""
        cfg = self.cfg
        flags = {"hidden": masks.get("hidden"), "head": gates.get("head"), "channel": gates.get("channel"),
                 "layer": masks.get("layer")}
        flags = {name: flag for name, flag in flags.items() if flag is not None}
        host = torch.cat([flag.detach().flatten() != 0 for flag in flags.values()]).cpu().split(
            [flag.numel() for flag in flags.values()])
        flags = {name: flat.view(flags[name].shape) for name, flat in zip(flags, host, strict=True)}
        layer_on = flags.get("layer", torch.ones(cfg.n_layers, dtype=torch.bool))
        heads = flags.get("head", torch.ones(cfg.n_layers, cfg.n_heads, dtype=torch.bool)) & layer_on[:, None]
        channels = flags.get("channel", torch.ones(cfg.n_layers, cfg.intermediate_size, dtype=torch.bool))
        channels = channels & layer_on[:, None]
        hidden = _kept(flags.get("hidden"), device)
        units, shape = [], []
        for i in range(cfg.n_layers):
            head_index = _kept(heads[i], device=None)
            groups = head_groups = None
            if head_index is not None:
                groups, head_groups = torch.unique(head_index // cfg.q_per_kv, return_inverse=True)
                head_index, groups, head_groups = (t.to(device) for t in (head_index, groups, head_groups))
            units.append(LayerUnits(hidden, head_index, groups, head_groups, _kept(channels[i], device)))
            shape.append((int(heads[i].sum()), int(groups.numel()) if groups is not None else cfg.n_kv_heads,
                          int(channels[i].sum())))
        self.active = ActiveShape(int(flags["hidden"].sum()) if "hidden" in flags else cfg.d_model, tuple(shape))
        return units

    def _stacked_gates(self, masks: Masks, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Per-layer gates, combined once for all layers (not per layer: the masked step stays cheap).

        Returns ``head`` ``(n_layers, n_heads)`` (KV-group gate × head gate), ``channel`` ``(n_layers, I)`` and
        ``out`` ``(n_layers, d_model)`` or ``(n_layers, 1)`` (layer gate × hidden gate), each only when masked.
        """
        cfg, gates = self.cfg, {}
        if "kv_group" in masks or "head" in masks:
            head = masks["kv_group"].unsqueeze(-1) if "kv_group" in masks else masks["head"]
            if "kv_group" in masks and "head" in masks:
                head = head * masks["head"]
            gates["head"] = head.expand(cfg.n_layers, cfg.n_kv_heads, cfg.q_per_kv).reshape(cfg.n_layers, -1)
        if "intermediate" in masks:
            gates["channel"] = masks["intermediate"]
        layer, hidden = masks.get("layer"), masks.get("hidden")
        if layer is not None:
            gates["out"] = layer.unsqueeze(-1) if hidden is None else layer.unsqueeze(-1) * hidden
        elif hidden is not None:
            gates["out"] = hidden.expand(cfg.n_layers, -1)
        return {name: gate.to(dtype) for name, gate in gates.items()}

    def num_params(self) -> int:
        """Distinct parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())
