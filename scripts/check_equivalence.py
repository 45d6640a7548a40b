"""Check that a source model, its masked version, its cut version and their Hugging Face copies agree.

    python scripts/check_equivalence.py --model tiny-gqa [--target d_model=48 n_heads=4 ...] [--seed 0]
    python scripts/check_equivalence.py --model smollm2 --device gpu --dtype bfloat16 --attn flash --tolerance 0.5

SOURCE is an HF directory, a ``.gguf`` file, ``smollm2`` or a random preset. The checks (fp32 on the CPU by
default; ``--device gpu --dtype bfloat16`` with a tolerance of bf16's rounding):

1. HF logits ≡ ours (for a preset, "HF" is the HF reload of our saved model);
2. gates of all ones ≡ no gates;
3. random gate logits → deterministic masks for the target (default: about half of every axis):
   masked model ≡ cut model ≡ the HF reload of the cut model ≡ the compact masked forward (``pruning.compact``);
   the cut config equals the target and its parameter count equals the expected count of the masks.

Prints one JSON object last and exits 1 when a difference exceeds the tolerance, 2 on bad input.
On a real model, randomly masked, fp32 rounding alone can reach ~1e-3 (the damaged network amplifies it);
``--dtype float64`` then shows whether masked and cut models really agree (they match to ~1e-12).
Porting a new model family: run this on one of its checkpoints first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from llmshear.models.cut import cut_model
from llmshear.models.hf import PRESETS, build_model, load_config, load_model, save_pretrained
from llmshear.models.l0 import L0Module, TargetShape, params_of_masks
from llmshear.sources import resolve_source

logger = logging.getLogger("check_equivalence")
SHAPE = ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "intermediate_size", "vocab_size")


def parse_target(items: list[str]) -> dict:
    """``["d_model=48", ...]`` → ``{"d_model": 48, ...}`` (values that are not integers are kept as text)."""
    target = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--target {item!r}: expected key=value")
        target[key] = int(value) if value.lstrip("-").isdigit() else value
    return target


def half_target(source) -> dict:
    """About half of every axis; the KV heads follow from the heads (see :meth:`TargetShape.from_dict`)."""
    return {key: max(1, getattr(source, key) // 2) for key in ("d_model", "n_layers", "n_heads", "intermediate_size")}


def load_pair(source: str, seed: int, workdir: Path, dtype: torch.dtype,
              device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Our model and an HF model with the same weights: HF loads the source itself, or our save of a preset."""
    if source in PRESETS:
        ours = build_model(PRESETS[source](), seed=seed, dtype=dtype).eval()
        return ours.to(device), hf_reload(ours, workdir / "source", device)
    ours = load_model(source, dtype=dtype).to(device)
    location = resolve_source(source)
    kwargs = {"gguf_file": location.gguf_file} if location.gguf_file else {}
    return ours, AutoModelForCausalLM.from_pretrained(location.directory, dtype=dtype, **kwargs).eval().to(device)


def hf_reload(model, directory: Path, device: torch.device) -> torch.nn.Module:
    """Save ``model`` as an HF directory and load it back with ``transformers`` alone, in the model's dtype."""
    save_pretrained(model, directory)
    return AutoModelForCausalLM.from_pretrained(directory, dtype=model.lm_head.weight.dtype).eval().to(device)


def random_masks(source, target: TargetShape, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic masks from gate logits ~ N(0, 2²), so that kept values differ from 1 and get folded."""
    l0 = L0Module(source, target, constraint="row")  # raw logits: the kept values are P(gate != 0), not 1
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for log_alpha in l0.log_alpha.values():
            log_alpha.copy_(torch.randn(log_alpha.shape, generator=generator) * 2)
    return l0.deterministic_masks()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def check(source: str, target_items: list[str], seed: int, tolerance: float, workdir: Path,
          dtype: torch.dtype = torch.float32, device: str = "cpu", attn: str = "sdpa") -> dict:
    """Run every comparison; returns the report (see the module docstring). Validates before loading weights."""
    cfg = load_config(source)
    target = TargetShape.from_dict({**half_target(cfg), **parse_target(target_items)}, cfg)
    device = torch.device(device)
    ours, hf = load_pair(source, seed, workdir, dtype, device)
    ours.cfg.attn_impl = attn
    tokens = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(seed)).to(device)
    logits = ours(tokens)
    ones = {spec.name: torch.ones(spec.shape, dtype=dtype, device=device) for spec in L0Module(cfg, target).specs}
    masks = {name: mask.to(device, dtype) for name, mask in random_masks(cfg, target, seed).items()}
    masked = ours(tokens, masks)
    cut = cut_model(ours, masks)
    cut.cfg.attn_impl = attn
    cut_logits = cut(tokens)
    diffs = {
        "hf_vs_ours": max_diff(hf(tokens).logits, logits),
        "all_ones_vs_no_masks": max_diff(ours(tokens, ones), logits),
        "masked_vs_cut": max_diff(masked, cut_logits),
        "compact_vs_masked": max_diff(ours(tokens, masks, compact=True), masked),
        "cut_vs_hf_reload": max_diff(hf_reload(cut, workdir / "cut", device)(tokens).logits, cut_logits),
    }
    expected = params_of_masks(cfg, {name: (m != 0).float() for name, m in masks.items()})
    params = {"source": ours.num_params(), "cut": cut.num_params(), "expected_at_masks": int(expected.item())}
    shape_ok = cut.cfg == target.to_config(cfg) and params["cut"] == params["expected_at_masks"]
    return {
        "model": source, "seed": seed, "dtype": str(dtype).removeprefix("torch."), "device": str(device),
        "attn": attn, "tolerance": tolerance,
        "ok": shape_ok and all(d <= tolerance for d in diffs.values()),
        "max_abs_diff": diffs, "params": params,
        "source_config": {k: getattr(cfg, k) for k in SHAPE}, "target": dataclasses.asdict(target),
        "cut_config": {k: getattr(cut.cfg, k) for k in SHAPE},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF directory, .gguf file, smollm2 or a tiny-* preset")
    parser.add_argument("--target", nargs="*", default=[], metavar="KEY=VALUE",
                        help="target sizes: d_model, n_layers, n_heads, n_kv_heads, intermediate_size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the preset weights, tokens and gate logits")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed max |Δlogit|")
    parser.add_argument("--dtype", choices=("float32", "float64", "bfloat16"), default="float32",
                        help="float64 separates real mismatches from rounding on large real models")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--attn", choices=("sdpa", "flash"), default="sdpa",
                        help="our attention (flash: flash-attn when installed, on a GPU in bf16; else SDPA)")
    args = parser.parse_args(argv)
    if args.device == "gpu" and not torch.cuda.is_available():
        parser.error("--device gpu: no GPU is visible")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        with tempfile.TemporaryDirectory() as workdir:
            report = check(args.model, args.target, args.seed, args.tolerance, Path(workdir),
                           getattr(torch, args.dtype), "cuda" if args.device == "gpu" else "cpu", args.attn)
    except (OSError, ValueError) as err:
        logger.error("%s", err)
        print(json.dumps({"model": args.model, "ok": False, "error": str(err)}))
        return 2
    if not report["ok"]:
        logger.error("equivalence check failed: %s", report["max_abs_diff"])
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
