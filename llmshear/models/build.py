"""Named model shapes (presets) and building a :class:`LlamaLM` on a device, randomly initialised or empty.

Presets are usable wherever a model source is accepted (``load_model("tiny-gqa")``). The ``tiny-*`` presets are
small random models for tests and for porting checks; ``llama2-7b``, ``smollm2-135m`` and
the two Sheared-LLaMA targets are shapes only, meant
for ``build_model(load_config(name), device="meta")`` (no memory is allocated on the meta device).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmshear.models.llama import LlamaConfig, LlamaLM, rope_inv_freq

INIT_STD = 0.02


def _tiny_llama2() -> LlamaConfig:
    return LlamaConfig(vocab_size=256, d_model=64, n_layers=4, n_heads=4, n_kv_heads=4, head_dim=16,
                       intermediate_size=176, max_seq_len=256)


def _tiny_gqa() -> LlamaConfig:
    # head_dim * n_heads (128) differs from d_model (96) on purpose: head_dim must be explicit everywhere.
    # original_max_position_embeddings is small so that the llama3 scaling reaches all three frequency bands
    # (kept, blended, divided) of a 16-dim head.
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    return LlamaConfig(vocab_size=256, d_model=96, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=16,
                       intermediate_size=192, rope_theta=500000.0, rope_scaling=scaling, max_seq_len=512,
                       bos_token_id=0, eos_token_id=[1, 2])


def _tiny_qwen2() -> LlamaConfig:
    return LlamaConfig(vocab_size=256, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16,
                       intermediate_size=128, rms_norm_eps=1e-6, rope_theta=1e6, max_seq_len=256,
                       tie_word_embeddings=True, qkv_bias=True, hf_model_type="qwen2", bos_token_id=None)


def _tiny_smollm2() -> LlamaConfig:
    return LlamaConfig(vocab_size=256, d_model=144, n_layers=4, n_heads=9, n_kv_heads=3, head_dim=16,
                       intermediate_size=384, rope_theta=1e5, max_seq_len=256, tie_word_embeddings=True)


def _llama2_7b() -> LlamaConfig:
    return LlamaConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128,
                       intermediate_size=11008, max_seq_len=4096)


def _sheared_llama(d_model: int, n_layers: int, n_heads: int, intermediate_size: int) -> LlamaConfig:
    """A Sheared-LLaMA shape (Xia et al. 2023, table 1): LLaMA2's vocabulary and head size, no GQA."""
    return LlamaConfig(vocab_size=32000, d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads,
                       head_dim=128, intermediate_size=intermediate_size, max_seq_len=4096)


def _smollm2_135m() -> LlamaConfig:
    return LlamaConfig(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                       intermediate_size=1536, rope_theta=1e5, max_seq_len=8192, tie_word_embeddings=True,
                       pad_token_id=2)


PRESETS: dict[str, Callable[[], LlamaConfig]] = {
    "tiny-llama2": _tiny_llama2,
    "tiny-gqa": _tiny_gqa,
    "tiny-qwen2": _tiny_qwen2,
    "tiny-smollm2": _tiny_smollm2,
    "llama2-7b": _llama2_7b,
    "smollm2-135m": _smollm2_135m,
    "sheared-llama-1.3b": lambda: _sheared_llama(2048, 24, 16, 5504),
    "sheared-llama-2.7b": lambda: _sheared_llama(2560, 32, 20, 6912),
}
# Shapes of real models: random weights of this size are useless and large, so load_model refuses them.
CONFIG_ONLY = frozenset({"llama2-7b", "smollm2-135m", "sheared-llama-1.3b", "sheared-llama-2.7b"})


def empty_model(cfg: LlamaConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> LlamaLM:
    """A model with uninitialised parameters (``torch.empty``) on ``device``; tied weights stay tied.

    The rotary ``inv_freq`` buffer is recomputed (it is not persistent, so no checkpoint restores it).
    On ``device="meta"`` nothing is allocated.
    """
    with torch.device("meta"):
        model = LlamaLM(cfg).to(dtype)
    if torch.device(device).type != "meta":
        model.to_empty(device=device)
    if cfg.tie_word_embeddings:
        # `to_empty` gives every module its own new tensor, which unties lm_head from the embedding.
        model.lm_head.weight = model.model.embed_tokens.weight
    reset_rotary(model)
    return model


def reset_rotary(model: LlamaLM) -> None:
    """Recompute the rotary ``inv_freq`` buffer ``(head_dim // 2,)`` in fp32 on the model's device.

    Needed after ``to_empty`` or meta materialisation, and after casting the model to a low-precision dtype.
    """
    device = model.lm_head.weight.device
    model.rotary.inv_freq = rope_inv_freq(model.cfg)[0].to(device)


@torch.no_grad()
def init_weights(model: LlamaLM, seed: int | None = None) -> None:
    """Norm weights to one, every other parameter (biases included) ~ N(0, 0.02²).

    Biases are random, not zero, so that tests comparing against Hugging Face exercise them. Values are drawn
    on the CPU from a generator seeded with ``seed`` (the global RNG when None), so they do not depend on the
    device.
    """
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            values = torch.randn(param.shape, generator=generator, dtype=torch.float32) * INIT_STD
            param.copy_(values)


def build_model(cfg: LlamaConfig, device: str | torch.device = "cpu", seed: int | None = None,
                dtype: torch.dtype = torch.float32) -> LlamaLM:
    """Build a randomly initialised :class:`LlamaLM` (see :func:`init_weights`), or an empty one on ``meta``.

    Args:
        cfg: the model shape.
        device: ``"cpu"``, ``"cuda"``, ... or ``"meta"`` (parameters without storage, for shape checks).
        seed: seed of the initial weights; None draws from the global RNG.
        dtype: parameter dtype (``inv_freq`` stays fp32).
    """
    model = empty_model(cfg, device=device, dtype=dtype)
    if torch.device(device).type != "meta":
        init_weights(model, seed)
    return model
