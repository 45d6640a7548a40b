"""One command that checks a GPU machine end to end; ``scripts/gpu_check.sh`` runs it (see docs/recipes.md).

    scripts/gpu_check.sh            # one GPU, bf16; about 10 minutes on an A100/H100/H200
    scripts/gpu_check.sh --cpu      # the same stages at tiny sizes, fp32, on the CPU (the test suite runs it)

Stages, each reported under its name in one JSON line (``ok`` false with the error when a stage fails):

* ``equivalence``: HF ≡ ours ≡ masked ≡ cut (``check_equivalence.py``) on SmolLM2 and a random model of
  Sheared-LLaMA-1.3B's shape, bf16, our attention flash-attn when installed (else SDPA);
* ``bench_model``: training-step tokens/s, MFU and peak memory of ours / masked / HF on the 1B-class shape;
* ``bench_train``: ``bench_train.py``'s Composer-vs-bare tokens/s and MFU of both stages;
* ``prune`` and ``continue``: 20-batch runs of the demo recipes through ``train.py`` (``composer -n 1``) with
  amp_bf16, FSDP2 and activation checkpointing, the cut by ``export_hf.py`` between them;
* ``memory``: the planner's estimate of a masked training step against the measured peak.

``--cpu`` keeps every stage but CUDA itself: tiny random presets, fp32, a few batches, no FSDP, the runs in this
process, bench_model without its fresh-process memory probe. Exit status 0 when every stage passes, else 1.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import logging
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from llmshear.checkpoints import LATEST_CHECKPOINT
from llmshear.models.hf import load_config

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("gpu_check")
DOMAINS = ["a", "b", "c"]
LOSS = "loss/train/total"  # the domains bench_train's synthetic data writes
BF16_TOLERANCE = 2.0  # max |Δlogit| in bf16: SmolLM2 HF vs ours reaches 1.7 on the CPU (fp32 agrees to 1e-4)
SIZES = {  # per mode: equivalence models, bench_model case, bench_train options, run source and length
    "gpu": {"models": ["smollm2", "sheared-llama-1.3b"], "case": "1b", "source": "smollm2", "batches": 20,
            "bench_train": ["--device", "gpu", "--precision", "amp_bf16", "--steps", "8"],
            "memory": ("sheared-llama-1.3b", 2, 4096)},
    "cpu": {"models": ["tiny-gqa", "tiny-llama2"], "case": "tiny", "source": "tiny-smollm2", "batches": 4,
            "bench_train": ["--preset", "tiny-gqa", "--steps", "2", "--warmup", "1", "--batch", "2",
                            "--seq-len", "16", "--threads", str(torch.get_num_threads())],
            "memory": ("tiny-gqa", 2, 128)},
}


def script(name: str, folder: Path = ROOT / "scripts"):
    """A module of scripts/ (they are not a package), or ``train.py`` with ``folder=ROOT``."""
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses of the module look themselves up there
    spec.loader.exec_module(module)
    return module


def last_json(main, argv: list[str]) -> dict:
    """Run a script's ``main(argv)`` here and return the JSON line it printed last."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    if code:
        raise RuntimeError(f"exit status {code}")
    return json.loads(out.getvalue().strip().splitlines()[-1])


def equivalence(mode: str, work: Path) -> dict:
    check = script("check_equivalence").check
    gpu = mode == "gpu"
    attn = "flash" if gpu and importlib.util.find_spec("flash_attn") else "sdpa"
    reports = {model: check(model, [], 0, BF16_TOLERANCE if gpu else 1e-4, work / model,
                            torch.bfloat16 if gpu else torch.float32, "cuda" if gpu else "cpu", attn)
               for model in SIZES[mode]["models"]}
    return {"ok": all(r["ok"] for r in reports.values()), "attn": attn,
            **{m: {"ok": r["ok"], "max_abs_diff": r["max_abs_diff"]} for m, r in reports.items()}}


def bench_model(mode: str, work: Path) -> dict:
    bench, case = script("bench_model"), SIZES[mode]["case"]
    if mode == "gpu":
        report = bench.bench_case(case, work, 3, "cuda")
        return {"ok": True, **{k: report[k] for k in ("tokens_per_s", "mfu", "peak_mib", "seconds")}}
    model_dir = bench.save_pretrained(bench.build_model(bench.PRESETS["tiny-llama2"](), seed=0), work / case)
    seconds = bench.time_case(case, model_dir, 1, "cpu")
    rates = bench.throughput(case, model_dir, seconds, bench.DEFAULT_PEAK_TFLOPS)["tokens_per_s"]
    return {"ok": all(s > 0 for s in seconds.values()), "tokens_per_s": rates}  # no MFU: no CPU peak


def bench_train(mode: str, work: Path) -> dict:
    report = last_json(script("bench_train").main, SIZES[mode]["bench_train"])
    return {"ok": all(report[s]["ratio"] > 0 for s in ("prune", "continue")),
            **{s: {k: report[s]["composer"].get(k) for k in ("tokens_per_s", "mfu")} for s in ("prune", "continue")}}


def run_overrides(mode: str, work: Path, stage: str, source: str) -> list[str]:
    """Overrides that turn a demo recipe into a short run on the synthetic data (GPU: bf16, FSDP2, checkpointing)."""
    batches = SIZES[mode]["batches"]
    common = [f"model.pretrained={source}", f"data.path={work / 'data'}", f"data.domains={DOMAINS}",
              "data.proportions=[0.34,0.33,0.33]", "data.proportions_from=null", "data.reference_losses_from=null",
              "data.reference_losses=[2.0,2.0,2.0]", f"train.max_batches={batches}", f"train.eval_interval={batches}",
              "train.eval_batches=1", "scheduler.warmup=1", f"checkpoint.save_folder={work / stage}",
              f"checkpoint.save_interval={batches}"]
    if stage == "prune" and mode == "cpu":  # about half of tiny-smollm2 (d 144, 4 layers, 9/3 heads, 384)
        common += ["pruning.target={d_model: 72, n_layers: 2, n_heads: 6, n_kv_heads: 2, intermediate_size: 192}",
                   "pruning.init_batches=1"]
    if mode == "gpu":
        common += ["train.precision=amp_bf16", "train.device=gpu", "fsdp.enabled=true",
                   "fsdp.activation_checkpointing=true"]
    return common


def train(mode: str, recipe: str, overrides: list[str]) -> None:
    """``train.py`` through the composer launcher on one GPU (FSDP needs its process group), here on the CPU."""
    if mode == "gpu":
        launcher = Path(sys.executable).parent / "composer"
        subprocess.run([str(launcher), "-n", "1", str(ROOT / "train.py"), recipe, *overrides], check=True)
    elif script("train", ROOT).main([recipe, *overrides]) != 0:
        raise RuntimeError(f"train.py {recipe} failed")


def final_loss(folder: Path) -> float:
    """The last ``loss/train/total`` of a run's ``metrics.jsonl``."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return next(r[LOSS] for r in reversed(rows) if r.get(LOSS) is not None)


def runs(mode: str, work: Path) -> dict:
    """The pruning run, the cut, the continued run; final losses and the cut model's size."""
    sizes = SIZES[mode]
    vocab = load_config(sizes["source"]).vocab_size
    script("bench_train").write_data(work / "data", vocab, 256 if mode == "gpu" else 32)
    seq = [f"data.seq_len={256 if mode == 'gpu' else 32}", "train.global_batch_size=4", "train.micro_batch_size=4",
           "train.eval_batch_size=4"]
    train(mode, str(ROOT / "yaml" / "demo" / "prune.yaml"), run_overrides(mode, work, "prune", sizes["source"]) + seq)
    cut = last_json(script("export_hf").main, ["--checkpoint", str(work / "prune" / LATEST_CHECKPOINT),
                                           "--out", str(work / "pruned")])
    train(mode, str(ROOT / "yaml" / "demo" / "continue.yaml"),
          run_overrides(mode, work, "continue", str(work / "pruned")) + seq)
    losses = {stage: final_loss(work / stage) for stage in ("prune", "continue")}
    return {"ok": all(v == v for v in losses.values()), "final_loss": losses, "cut": cut}


def memory(mode: str, work: Path) -> dict:
    preset, batch, seq_len = SIZES[mode]["memory"]
    measure = script("measure_step_memory")
    report = measure.measure(load_config(preset), batch, seq_len, True, mode)
    return {"ok": 0.5 < report["ratio"] < 2.0, **report}


STAGES = {"equivalence": equivalence, "bench_model": bench_model, "bench_train": bench_train, "runs": runs,
          "memory": memory}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="tiny sizes, fp32, on the CPU")
    parser.add_argument("--stages", nargs="*", choices=list(STAGES), default=list(STAGES))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    mode = "cpu" if args.cpu else "gpu"
    if mode == "gpu" and not torch.cuda.is_available():
        parser.error("no GPU is visible; --cpu runs the same stages on the CPU")
    result, start = {"mode": mode}, time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for name in args.stages:
            began = time.perf_counter()
            (Path(tmp) / name).mkdir()
            try:
                with contextlib.redirect_stdout(sys.stderr):
                    result[name] = STAGES[name](mode, Path(tmp) / name)
            except Exception as err:  # a failed stage is reported, the others still run
                traceback.print_exc()
                result[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"}
            result[name]["stage_s"] = round(time.perf_counter() - began, 1)
    result["ok"] = all(result[name]["ok"] for name in args.stages)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
