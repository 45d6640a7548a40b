"""Composer's loggers, callbacks and algorithms from the recipe; durations as strings; remote paths refused."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from recipe_fixtures import DOMAINS, tiny_recipe, write_mds

from llmshear import composer_parts
from llmshear import run as train
from llmshear.builders import build_callbacks
from llmshear.callbacks.clipping import ClipGradNorm
from llmshear.config import ConfigError, load
from llmshear.loggers import read_metrics
from llmshear.models.build import PRESETS
from llmshear.models.composer_llama import model_flops

THRESHOLD = 0.05  # far below the tiny model's gradient norm (~5), so every step is clipped
PEAK = 1.0e12  # a stand-in for the GPU's peak FLOP/s, so that the CPU run reports an MFU


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """4 batches (``max_duration: 4ba``) with every installed logger, the five Composer monitors and clipping."""
    tmp = tmp_path_factory.mktemp("parts")
    data = write_mds(tmp / "data", DOMAINS, 32, n_train=16, n_eval=2)
    recipe = tiny_recipe(
        tmp, data, prune=False, train={"max_batches": None, "max_duration": "4ba", "eval_interval": "2ba"},
        checkpoint={"save_interval": "256tok"},  # 2 batches of 4 x 32 tokens
        loggers={"tensorboard": {}, "wandb": {"init_kwargs": {"mode": "offline"}}, "mlflow": {}, "file": None},
        callbacks={"speed_monitor": {"window_size": 2, "gpu_flops_available": PEAK}, "lr_monitor": {},
                   "memory_monitor": {}, "runtime_estimator": {}, "optimizer_monitor": {"batch_log_interval": 1},
                   "user_parts.MarkFitEnd": {"path": str(tmp / "fit_end.txt")},  # classes by import path
                   "composer.callbacks.EarlyStopper": {"monitor": "LanguageCrossEntropy", "dataloader_label": "eval",
                                                       "patience": "100ba"}},
        algorithms={"gradient_clipping": {"clipping_type": "norm", "clipping_threshold": THRESHOLD}})
    assert train.main([str(recipe)]) == 0
    folder = tmp / "run"
    return {"folder": folder, "rows": read_metrics(folder / "metrics.jsonl"), "tmp": tmp}


def test_duration_strings_set_the_length_and_the_intervals(run):
    folder = run["folder"]
    assert {p.name for p in folder.glob("*.pt")} == {"ep0-ba2-rank0.pt", "ep0-ba4-rank0.pt", "latest-rank0.pt"}
    assert max(r["batch"] for r in run["rows"]) == 4
    assert {r["batch"] for r in run["rows"] if "metrics/eval/LanguageCrossEntropy" in r} == {2, 4}


def test_every_installed_logger_writes_its_output(run):
    folder = run["folder"]
    assert any(p.stat().st_size > 0 for p in (folder / "tensorboard").rglob("events.out.tfevents.*"))
    (wandb_run,) = (folder / "wandb").glob("offline-run-*")
    assert any(p.stat().st_size > 0 for p in wandb_run.glob("run-*.wandb"))
    mlflow_metric = list((folder / "mlruns").glob("*/*/metrics/throughput/tokens_per_sec"))
    assert mlflow_metric and mlflow_metric[0].read_text().strip()
    (text_log,) = folder.glob("logs-*-rank0.txt")
    assert "[metric][batch=4]: throughput/tokens_per_sec:" in text_log.read_text()


def test_speed_monitor_reports_tokens_flops_and_mfu_from_the_model_flops(run):
    rows = run["rows"]
    speed = {}
    for r in rows:
        if any(k.startswith("throughput/") for k in r):
            speed.setdefault(r["batch"], {}).update(r)
    assert speed, "the speed monitor logged nothing"
    flops_per_batch = model_flops(PRESETS["tiny-gqa"](), 4, 32)
    for values in speed.values():
        rate = values["throughput/batches_per_sec"]
        assert values["throughput/tokens_per_sec"] == pytest.approx(rate * 4 * 32, rel=1e-6)
        assert values["throughput/flops_per_sec"] == pytest.approx(rate * flops_per_batch, rel=1e-6)
        assert values["throughput/device/mfu"] == pytest.approx(values["throughput/device/flops_per_sec"] / PEAK)


def test_lr_runtime_and_memory_monitors_run_on_cpu(run):
    keys = {k for r in run["rows"] for k in r}
    assert "lr-DecoupledAdamW/group0" in keys and "time/remaining_estimate" in keys
    assert not any(k.startswith("memory/") for k in keys)  # the memory monitor stays silent off CUDA


def test_gradient_clipping_algorithm_clips_the_norm_the_optimizer_sees(run):
    rows = run["rows"]
    before = {r["batch"] + 1: r["train/grad_norm"] for r in rows if "train/grad_norm" in r}  # logged before the step
    after = {r["batch"]: r["l2_norm/grad/global"] for r in rows if "l2_norm/grad/global" in r}
    assert set(after) == {1, 2, 3, 4}
    for batch, norm in after.items():
        assert before[batch] > THRESHOLD and norm == pytest.approx(THRESHOLD, rel=1e-4)


@pytest.fixture
def data(tmp_path) -> Path:
    return write_mds(tmp_path / "data", DOMAINS, 32, n_train=4, n_eval=2)


def problems_of(path, overrides=(), **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(path, list(overrides), **kwargs)
    return [re.sub(rf"^{re.escape(str(path))}:\d+: ", "", p) for p in caught.value.problems]


@pytest.mark.parametrize(("sections", "expected"), [
    ({"loggers": {"tensorboard": {"logdir": "x"}}},
     "loggers.tensorboard.logdir: unknown argument of TensorboardLogger (known: log_dir,"),
    ({"loggers": {"comet": {}}}, "loggers.comet: unknown (known: tensorboard, wandb, mlflow, file; or a class by "
                                 "import path, my_pkg.my_module.MyClass)"),
    ({"callbacks": {"user_parts.MarkFitEnd": {"file": "x"}}},
     "callbacks.user_parts.MarkFitEnd.file: unknown argument of MarkFitEnd (known: path)"),
    ({"callbacks": {"user_parts.MarkFitEnd": {}}}, "callbacks.user_parts.MarkFitEnd.path: missing (required by"),
    ({"callbacks": {"user_parts.Nope": {}}}, "callbacks.user_parts.Nope: user_parts has no class Nope"),
    ({"callbacks": {"no_such_package.Thing": {}}}, "callbacks.no_such_package.Thing: cannot import no_such_package"),
    ({"callbacks": {"user_parts.NotAPart": {}}},
     "callbacks.user_parts.NotAPart: not a subclass of Composer's Callback"),
    ({"loggers": {"user_parts.MarkFitEnd": {"path": "x"}}}, "not a subclass of Composer's LoggerDestination"),
    ({"callbacks": {"speed_monitor": {"window": 5}}}, "callbacks.speed_monitor.window: unknown argument"),
    ({"callbacks": {"speed_monitor": 5}}, "callbacks.speed_monitor: expected a mapping of keyword arguments"),
    ({"callbacks": {"nan_monitor": {}}}, "callbacks.nan_monitor: unknown (known: speed_monitor"),
    ({"algorithms": {"low_precision_layernorm": {}}},
     "algorithms.low_precision_layernorm: unknown (known: gradient_clipping; or a class by import path"),
    ({"algorithms": {"gradient_clipping": {"clipping_type": "adaptive", "clipping_threshold": 0.1}}},
     "algorithms.gradient_clipping.clipping_type='adaptive': only 'norm' is supported"),
    ({"algorithms": {"gradient_clipping": {"clipping_type": "norm"}}},
     "algorithms.gradient_clipping.clipping_threshold=None: must be a positive number"),
    ({"algorithms": {"gradient_clipping": {"clipping_threshold": 0.5}}, "optimizer": {"clip_norm": 1.0}},
     "algorithms.gradient_clipping.clipping_threshold=0.5 / optimizer.clip_norm=1.0: both set"),
    ({"train": {"max_duration": "2ep"}}, "train.max_duration='2ep': 'ep' is not supported"),
    ({"train": {"max_batches": None, "max_duration": "100tok"}},
     "train.max_duration='100tok' is not a whole number of batches of 128 tok"),
    ({"train": {"max_batches": None, "max_duration": 6}}, "train.max_duration=6: write the unit (6ba)"),
    ({"train": {"max_batches": None, "max_duration": "six"}}, "train.max_duration='six' is not a duration"),
    ({"train": {"max_duration": "6ba"}}, "train.max_batches / train.max_duration: set exactly one of them"),
    ({"train": {"eval_interval": "0.5dur"}}, "train.eval_interval='0.5dur': 'dur' is not supported"),
    ({"train": {"micro_batch_size": "auto"}}, "train.micro_batch_size='auto' needs a GPU"),
    ({"train": {"micro_batch_size": "max"}}, "train.micro_batch_size='max' must be positive or 'auto'"),
    ({"train": {"micro_batch_size": "auto", "device": "cpu"}},
     "train.micro_batch_size='auto' needs train.device='gpu'"),
])
def test_bad_parts_and_durations_name_their_key(tmp_path, data, sections, expected):
    problems = problems_of(tiny_recipe(tmp_path, data, **sections), cuda=False)
    assert any(expected in p for p in problems), problems


def test_optimizer_monitor_on_several_cpu_processes_is_refused(tmp_path, data):
    path = tiny_recipe(tmp_path, data, train={"global_batch_size": 4, "micro_batch_size": 2},
                       callbacks={"optimizer_monitor": {}})
    assert problems_of(path, world_size=2, cuda=False) == [
        "callbacks.optimizer_monitor: needs a GPU when several processes run (Composer 0.32.1's DecoupledAdamW "
        "reduces the norms across ranks on the CUDA device); one process on CPU works"]
    assert load(path, world_size=2, cuda=True).callbacks == {"optimizer_monitor": {}}


def test_problems_in_the_file_carry_its_line(tmp_path, data):
    path = tiny_recipe(tmp_path, data, loggers={"tensorboard": {"logdir": "x"}})
    with pytest.raises(ConfigError) as caught:
        load(path)
    (problem,) = caught.value.problems
    line = int(problem.removeprefix(f"{path}:").split(":")[0])
    assert "logdir:" in path.read_text().splitlines()[line - 1]


def test_a_logger_whose_package_is_missing_names_the_extra(tmp_path, data, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(composer_parts.importlib.util, "find_spec",
                        lambda name, *args: None if name == "mlflow" else find_spec(name, *args))
    problems = problems_of(tiny_recipe(tmp_path, data, loggers={"mlflow": {}}))
    assert problems == ["loggers.mlflow: the 'mlflow' package is not installed (pip install -e '.[mlflow]', or "
                        "`make setup`, which installs every logger)"]


def test_micro_batch_auto_is_accepted_with_a_gpu(tmp_path, data):
    cfg = load(tiny_recipe(tmp_path, data, train={"micro_batch_size": "auto"}), cuda=True)
    assert cfg.train.micro_batch_size == "auto"
    problems = problems_of(tiny_recipe(tmp_path, data, train={"micro_batch_size": "auto", "eval_batch_size": None}),
                           cuda=True)
    assert problems == ["train.micro_batch_size='auto' needs train.eval_batch_size (evaluation and the importance "
                        "init use it)"]


@pytest.mark.parametrize(("duration", "batches"), [("6ba", 6), ("768tok", 6), ("24sp", 6)])
def test_durations_convert_to_batches(tmp_path, data, duration, batches):
    cfg = load(tiny_recipe(tmp_path, data, train={"max_batches": None, "max_duration": duration,
                                                   "eval_interval": "384tok"}, scheduler={"warmup": "8sp"}))
    assert (cfg.train.max_batches, cfg.train.eval_interval, cfg.scheduler.warmup) == (batches, 3, 2)


@pytest.mark.parametrize("key", ["save_folder", "load_path"])
def test_remote_locations_are_refused_before_anything_is_written(tmp_path, data, key, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tiny_recipe(tmp_path, data, checkpoint={key: "s3://bucket/runs/prune"})
    assert train.main([str(path)]) == 2
    problems = problems_of(path)
    assert any(p.startswith(f"checkpoint.{key}='s3://bucket/runs/prune': must be a local") and "checkpoint.remote" in p
               for p in problems), problems
    assert not (tmp_path / "s3:").exists()


@pytest.mark.parametrize(("sections", "threshold"), [
    ({}, 1.0),  # the paper's default
    ({"optimizer": {"clip_norm": 0.5}}, 0.5),
    ({"algorithms": {"gradient_clipping": {"clipping_type": "norm", "clipping_threshold": 0.25}}}, 0.25),
    ({"algorithms": {"gradient_clipping": {"clipping_threshold": 0.25}}, "optimizer": {"clip_norm": 0.25}}, 0.25),
    ({"optimizer": {"clip_norm": 0.0}}, None),
])
def test_both_clipping_forms_build_one_clipper(tmp_path, data, sections, threshold):
    callbacks = build_callbacks(load(tiny_recipe(tmp_path, data, **sections)))
    clippers = [c for c in callbacks if isinstance(c, ClipGradNorm)]
    assert [c.max_norm for c in clippers] == ([] if threshold is None else [threshold])


SHAPE = {"vocab_size": 100, "d_model": 16, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 8,
         "intermediate_size": 24}
CUT = {"d_model": 12, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "intermediate_size": 10}


def hand_count(vocab_size, d_model, n_layers, n_heads, n_kv_heads, head_dim, intermediate_size, batch, seq_len):
    """Training FLOPs written out: q, k, v, o, gate/up/down and two norms per layer, the final norm, the head."""
    per_layer = (d_model * n_heads * head_dim + 2 * d_model * n_kv_heads * head_dim + n_heads * head_dim * d_model
                 + 3 * d_model * intermediate_size + 2 * d_model)
    n = n_layers * per_layer + d_model + vocab_size * d_model
    attention = 2 * (2 * seq_len * head_dim) * n_heads * n_layers  # QKᵀ and AV per token, forward
    return 3 * (2 * n + attention) * batch * seq_len


def test_flops_per_batch_is_the_hand_count_for_the_masked_and_the_cut_model():
    import torch

    from llmshear.models.composer_llama import ComposerLlama, Distillation
    from llmshear.models.l0 import L0Module, TargetShape
    from llmshear.models.llama import LlamaConfig, LlamaLM

    source = LlamaConfig(**SHAPE)
    batch = {"input_ids": torch.zeros(3, 10, dtype=torch.long)}
    masked = ComposerLlama(LlamaLM(source), l0=L0Module(source, TargetShape.from_dict(CUT, source)))
    expected = hand_count(**SHAPE, batch=3, seq_len=10)
    assert expected == 6 * 7056 * 30 + 12 * 2 * 4 * 8 * 10**2 * 3  # 6·N·B·T + 12·L·H·d_head·T²·B, N = 7056
    assert masked.flops_per_batch(batch) == expected
    cut = TargetShape.from_dict(CUT, source).to_config(source)
    assert ComposerLlama(LlamaLM(cut)).flops_per_batch(batch) == hand_count(**{**SHAPE, **CUT}, batch=3, seq_len=10)
    tied = LlamaConfig(**SHAPE, tie_word_embeddings=True)  # the head still multiplies: same FLOPs
    assert ComposerLlama(LlamaLM(tied)).flops_per_batch(batch) == masked.flops_per_batch(batch)
    distilled = ComposerLlama(LlamaLM(cut), distill=Distillation(LlamaLM(source)))
    assert distilled.flops_per_batch(batch) == (hand_count(**{**SHAPE, **CUT}, batch=3, seq_len=10)
                                                + hand_count(**SHAPE, batch=3, seq_len=10) // 3)  # teacher: forward


@pytest.mark.parametrize("name", ["prune_1.3b", "prune_2.7b", "continue_1.3b", "continue_2.7b", "demo/prune",
                                  "demo/continue"])
def test_shipped_recipes_monitor_speed_lr_and_memory_and_clip_at_one(repo_root, name):
    from omegaconf import OmegaConf

    recipe = OmegaConf.to_container(OmegaConf.load(repo_root / "yaml" / f"{name}.yaml"))
    assert {"speed_monitor", "lr_monitor", "memory_monitor"} <= set(recipe["callbacks"])
    assert recipe["algorithms"]["gradient_clipping"] == {"clipping_type": "norm", "clipping_threshold": 1.0}
    assert "clip_norm" not in recipe["optimizer"]  # one place for the threshold


def test_online_wandb_without_an_api_key_is_a_config_error(tmp_path, data, monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_MODE", "NETRC", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    problems = problems_of(tiny_recipe(tmp_path, data, loggers={"wandb": {"project": "p"}}))
    assert problems == ["loggers.wandb: mode 'online' needs a W&B API key (WANDB_API_KEY, or `wandb login`), none "
                        "found; without network use loggers.wandb.init_kwargs.mode=offline (or WANDB_MODE=offline) "
                        "and `wandb sync` the run folder's wandb/ later"]
    load(tiny_recipe(tmp_path, data, loggers={"wandb": {"project": "p", "init_kwargs": {"mode": "offline"}}}))
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    (tmp_path / ".netrc").chmod(0o600)
    load(tiny_recipe(tmp_path, data, loggers={"wandb": {"project": "p"}}))


@pytest.mark.gpu
def test_auto_micro_batches_memory_and_mfu_on_a_gpu(tmp_path):
    import torch

    data = write_mds(tmp_path / "data", DOMAINS, 32, n_train=16, n_eval=2)
    recipe = tiny_recipe(tmp_path, data, prune=False, train={"micro_batch_size": "auto", "device": "gpu",
                                                             "precision": "amp_bf16", "max_batches": 4},
                         callbacks={"speed_monitor": {"window_size": 2}, "memory_monitor": {}})
    assert train.main([str(recipe)]) == 0
    keys = {k for r in read_metrics(tmp_path / "run" / "metrics.jsonl") for k in r}
    assert "memory/peak_allocated_mem" in keys and "trainer/device_train_microbatch_size" in keys
    if any(name in torch.cuda.get_device_name().lower() for name in ("a100", "h100", "h200")):
        assert "throughput/device/mfu" in keys


def test_parts_by_import_path_run_and_come_from_the_command_line(run, tmp_path, data):
    assert (run["tmp"] / "fit_end.txt").read_text() == "4"  # our user's callback ran, beside Composer's EarlyStopper
    cfg = load(tiny_recipe(tmp_path, data), ["callbacks={user_parts.MarkFitEnd: {path: out.txt}}",
                                             "algorithms={composer.algorithms.EMA: {half_life: 10ba}}"])
    assert cfg.callbacks == {"user_parts.MarkFitEnd": {"path": "out.txt"}}
    assert cfg.algorithms == {"composer.algorithms.EMA": {"half_life": "10ba"}}
