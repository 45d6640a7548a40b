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

A zero entry removes its unit exactly: cutting the zeroed units out (``prune.py``) gives the same logits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

Masks = dict[str, torch.Tensor]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # weights' dtypes
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


class RMSNorm(nn.Module):
    """RMSNorm; with a hidden mask, the mean of squares runs over the kept (nonzero-gate) dimensions only.

    That is what the cut model computes over its remaining dimensions, so masked and cut models agree.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, hidden_kept: torch.Tensor | None = None) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        if hidden_kept is None:
            variance = x.pow(2).mean(-1, keepdim=True)
        else:
            variance = x.pow(2).sum(-1, keepdim=True) / hidden_kept
        return self.weight * (x * torch.rsqrt(variance + self.eps)).to(dtype)


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

        ``out`` (layer gate × hidden gate) multiplies both block outputs.
        """
        kept, out = gates.get("kept"), gates.get("out")
        attn = self.self_attn(self.input_layernorm(x, kept), cos, sin, gates.get("head"))
        x = x + attn if out is None else torch.addcmul(x, attn, out)  # fused: no temporary for attn * out
        mlp = self.mlp(self.post_attention_layernorm(x, kept), gates.get("channel"))
        return x + mlp if out is None else torch.addcmul(x, mlp, out)


class LlamaBackbone(nn.Module):
    """Embeddings, decoder layers and final norm (HF's ``LlamaModel``)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)


class LlamaLM(nn.Module):
    """Causal LM: ``forward(input_ids (B, T), masks=None) → logits (B, T, vocab)``."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.model = LlamaBackbone(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, masks: Masks | None = None) -> torch.Tensor:
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
