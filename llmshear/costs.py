"""What a model shape costs: parameters, training FLOPs per token, and GPU memory of one training step.

Pure arithmetic on a :class:`~llmshear.models.llama.LlamaConfig`; :mod:`llmshear.tools.plan` applies it to a recipe.
The memory model counts what our code keeps (see ``models/llama.py``), per token of one micro batch:

* every decoder layer saves, for the backward pass: both RMSNorms' fp32 input and their output; the rotated
  queries, the keys and values as SDPA reads them (repeated to every query head under GQA), its output and the
  ``o_proj`` input; the SwiGLU gate, its SiLU, the up projection and their product; with masks also the gated
  MLP product and both gated block outputs (``addcmul``);
* with activation checkpointing a layer keeps only its input, and one layer at a time is recomputed;
* the loss keeps the logits, their flattened fp32 copy, ``log_softmax`` and its gradient (distillation: the
  teacher's fp32 logits, both log-probabilities and the teacher's probabilities).

Activations are in the compute dtype (bf16 when FSDP's mixed precision casts the weights, else fp32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # shapes are read by attribute: the arithmetic needs no model code (nor torch)
    from llmshear.models.llama import ActiveShape, LlamaConfig

FP32 = 4
ADAM_STATES = 2  # exp_avg and exp_avg_sq, fp32


def embedding_params(cfg: LlamaConfig) -> int:
    """Input embedding, plus the output head when it is not tied to it."""
    return cfg.vocab_size * cfg.d_model * (1 if cfg.tie_word_embeddings else 2)


def layer_params(cfg: LlamaConfig) -> int:
    """One decoder layer: attention (with biases), SwiGLU MLP and two RMSNorm weights."""
    d, q, kv = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    attention = 2 * d * q + 2 * d * kv + (q + 2 * kv if cfg.qkv_bias else 0) + (d if cfg.o_bias else 0)
    return attention + 3 * d * cfg.intermediate_size + 2 * d


def total_params(cfg: LlamaConfig) -> int:
    """Distinct parameters (a tied embedding counts once), as :meth:`LlamaLM.num_params` counts them."""
    return embedding_params(cfg) + cfg.n_layers * layer_params(cfg) + cfg.d_model


def non_embedding_params(cfg: LlamaConfig) -> int:
    """Parameters without the embedding table and the output head."""
    return total_params(cfg) - embedding_params(cfg)


def forward_flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """Forward FLOPs of one token: 2 per multiplying weight (layers and output head) plus attention's
    ``QKᵀ`` and ``AV`` over the whole sequence (causality not discounted, as in bench_train's MFU)."""
    matmul = non_embedding_params(cfg) + cfg.vocab_size * cfg.d_model  # norms count like weights; a tied head too
    attention = 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    return 2.0 * matmul + attention


def train_flops_per_token(cfg: LlamaConfig, seq_len: int, teacher: LlamaConfig | None = None) -> float:
    """Forward and backward (3 × forward); a distillation teacher adds its forward only.

    A dense masked pruning step multiplies every weight of the source: its cost is the source's (the masks add
    element-wise products only); a compact one costs what it computed (:func:`active_forward_flops_per_token`).
    """
    flops = 3 * forward_flops_per_token(cfg, seq_len)
    return flops + (forward_flops_per_token(teacher, seq_len) if teacher is not None else 0.0)


def active_forward_flops_per_token(cfg: LlamaConfig, active: ActiveShape, seq_len: int) -> float:
    """:func:`forward_flops_per_token` of a compact masked forward of a ``cfg``-shaped model that computed
    ``active`` (the residual width and every layer's query heads, KV heads and channels): at every unit
    kept it equals the full model's."""
    d, hd = active.d_model, cfg.head_dim
    matmul, attention = cfg.vocab_size * d + d, 0
    for heads, groups, channels in active.layers:
        matmul += 2 * d * hd * (heads + groups) + 3 * d * channels + 2 * d
        matmul += ((heads + 2 * groups) * hd if cfg.qkv_bias else 0) + (d if cfg.o_bias else 0)
        attention += 4 * heads * hd * seq_len
    return 2.0 * matmul + attention


@dataclass(frozen=True)
class StepShape:
    """How a training step runs: tokens per micro batch, dtypes, sharding, masks, checkpointing."""

    micro_batch: int
    seq_len: int
    world_size: int = 1
    sharded: bool = False  # FSDP full shard over world_size
    act_bytes: int = FP32  # bytes of an activation element (2 under bf16 mixed precision)
    masked: bool = False
    checkpointing: bool = False


def layer_activation_bytes(cfg: LlamaConfig, act: int, masked: bool) -> float:
    """Bytes one decoder layer saves for backward, per token (see the module docstring)."""
    d, i = cfg.d_model, cfg.intermediate_size
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    kv_read = q if cfg.n_heads != cfg.n_kv_heads else kv  # repeat_interleave under GQA
    norms = 2 * (FP32 * d + 2 * act * d)
    attention = act * (3 * q + 2 * kv_read)
    mlp = 4 * act * i
    gated = act * (2 * d + i) if masked else 0
    return norms + attention + mlp + gated


def loss_bytes(cfg: LlamaConfig, act: int, distill: bool) -> float:
    """Per token: logits, their flattened fp32 copy, log_softmax and its gradient (+ distillation's tensors)."""
    v = cfg.vocab_size
    logits = 2 * act * v + (FP32 * v if act != FP32 else 0) + 2 * FP32 * v
    return logits + (4 * FP32 * v if distill else 0)


def activation_bytes(cfg: LlamaConfig, step: StepShape, distill: bool = False) -> float:
    """Peak bytes of saved activations of one micro batch (all layers, the loss, the embedding output)."""
    tokens = step.micro_batch * step.seq_len
    layer = layer_activation_bytes(cfg, step.act_bytes, step.masked)
    if step.checkpointing:
        layers = cfg.n_layers * step.act_bytes * cfg.d_model + layer
    else:
        layers = cfg.n_layers * layer
    final_norm = FP32 * cfg.d_model + 2 * step.act_bytes * cfg.d_model
    return tokens * (layers + final_norm + step.act_bytes * cfg.d_model + loss_bytes(cfg, step.act_bytes, distill))


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU of one training step; ``peak`` is their sum at the step's high point."""

    weights: float
    grads: float
    adam: float
    gates: float
    gathered: float
    activations: float
    teacher: float

    @property
    def peak(self) -> float:
        static = self.weights + self.adam + self.gates + self.gathered + self.teacher
        # Gradients start as None each step: unsharded they grow as the activations are freed, so the two
        # peak apart; sharded they are small and counted on top.
        dynamic = self.activations + self.grads if self.gathered else max(self.activations, self.grads)
        return static + dynamic


def step_memory(cfg: LlamaConfig, step: StepShape, gate_params: int = 0, gate_buffers: int = 0,
                teacher: LlamaConfig | None = None, teacher_bytes: int = FP32) -> Memory:
    """Per-GPU memory of a step of ``cfg`` (fp32 master weights, fp32 gradients, AdamW's two fp32 states).

    Under FSDP full shard the weights, gradients and Adam states are split over ``world_size``; a layer's
    weights are gathered in the compute dtype (the one running and the one prefetched), and the root's
    embedding, head and final norm stay gathered through the step. The gates and multipliers (``gate_params``,
    with gradient and Adam states; ``gate_buffers``: hardened masks and shifts) and the teacher (``teacher_bytes``
    per weight, not sharded: it is not a child module of the model) are whole on every GPU.
    """
    n = total_params(cfg)
    shards = step.world_size if step.sharded else 1
    gathered = 0.0
    if step.sharded:
        gathered = step.act_bytes * (2 * layer_params(cfg) + embedding_params(cfg) + cfg.d_model)
    return Memory(weights=FP32 * n / shards, grads=FP32 * n / shards, adam=ADAM_STATES * FP32 * n / shards,
                  gates=(2 + ADAM_STATES) * FP32 * gate_params + FP32 * gate_buffers, gathered=gathered,
                  activations=activation_bytes(cfg, step, distill=teacher is not None),
                  teacher=teacher_bytes * total_params(teacher) if teacher is not None else 0.0)
