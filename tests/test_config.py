"""Recipes validate and build on the meta device; every kind of bad input is reported at once, naming its key."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from data_fixtures import REPO
from omegaconf import OmegaConf
from recipe_fixtures import DOMAINS, tiny_recipe, write_config_dir, write_mds, write_proportions

from llmshear.builders import build_composer_model
from llmshear.config import ConfigError, RunConfig, load
from llmshear.config.foreign import FOREIGN_KEYS
from llmshear.config.loading import resolve_files
from llmshear.config.preflight import check_proportions
from llmshear.config.schema import parse
from llmshear.config.types import load_raw
from llmshear.datasets.reference import split_fingerprints

REDPAJAMA = ["cc", "github", "book", "stackexchange", "wiki", "arxiv", "c4-rp"]
PAPER_TARGETS = {
    "1.3b": {"d_model": 2048, "n_layers": 24, "n_heads": 16, "n_kv_heads": 16, "intermediate_size": 5504},
    "2.7b": {"d_model": 2560, "n_layers": 32, "n_heads": 20, "n_kv_heads": 20, "intermediate_size": 6912},
}


@pytest.fixture(scope="module")
def paper_env(tmp_path_factory) -> dict[str, str]:
    """LLAMA2_7B (config only), DATA_DIR (one 4096-token sequence per domain and split), RUN_DIR with pruned dirs."""
    root = tmp_path_factory.mktemp("paper")
    runs = root / "runs"
    for size, target in PAPER_TARGETS.items():
        write_config_dir(runs / f"pruned_{size}", "llama2-7b", target)
        write_proportions(runs / f"prune_{size}" / "proportions.json", REDPAJAMA)
    return {"LLAMA2_7B": str(write_config_dir(root / "llama2-7b", "llama2-7b")),
            "DATA_DIR": str(write_mds(root / "data", REDPAJAMA, 4096, n_train=50, n_eval=1)),  # 1 in train_range 0.02
            "RUN_DIR": str(runs)}


@pytest.fixture
def data(tmp_path) -> Path:
    return write_mds(tmp_path / "data", DOMAINS, 32, n_train=4, n_eval=2)


@pytest.mark.parametrize("name", ["prune_1.3b", "prune_2.7b", "continue_1.3b", "continue_2.7b"])
def test_paper_recipes_validate_and_build_on_meta(repo_root, paper_env, monkeypatch, name):
    for key, value in paper_env.items():
        monkeypatch.setenv(key, value)
    path = repo_root / "yaml" / f"{name}.yaml"
    assert path.read_text().startswith("# "), "a recipe opens with its purpose and command"
    cfg = load(path, world_size=8, cuda=True)
    model = build_composer_model(cfg, device="meta")
    assert model.model.lm_head.weight.is_meta
    size = name.split("_")[1]
    if name.startswith("prune"):
        # the bench's measured schedule (ramp to 0.4, freeze at 0.7), not the paper's 640-batch ramp
        assert cfg.pruning.sparsity_warmup * cfg.train.max_batches == 1280 and cfg.train.max_batches == 3200
        assert model.l0.options["lagrangian_warmup"] == 1280 and model.l0.options["harden_batch"] == 2240
        assert model.l0.target.d_model == PAPER_TARGETS[size]["d_model"]
    else:
        assert model.l0 is None and cfg.train.max_batches == 48000
        assert model.model.cfg.d_model == PAPER_TARGETS[size]["d_model"]
        assert cfg.data.proportions == pytest.approx([1 / 7] * 7)  # read from the pruning run's file


DEMO_DOMAINS = ["code", "docs", "readme"]
DEMO_TARGET = {"d_model": 384, "n_layers": 20, "n_heads": 6, "n_kv_heads": 2, "intermediate_size": 1024}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """What scripts/demo.sh has written before each training stage (tiny stand-ins)."""
    root = tmp_path_factory.mktemp("demo")
    write_mds(root / "data", DEMO_DOMAINS, 256, n_train=4, n_eval=1)  # each stage's train_range holds one
    (root / "reference_losses.json").write_text(
        json.dumps({"domains": DEMO_DOMAINS, "reference_losses": [1.0, 2.0, 3.0], "tokens": [1, 1, 1]}))
    write_proportions(root / "runs" / "demo_prune" / "proportions.json", DEMO_DOMAINS)
    write_config_dir(root / "pruned", "smollm2-135m", DEMO_TARGET)
    return root


@pytest.mark.parametrize("name", ["prune", "continue"])
def test_demo_recipes_validate_and_build_on_meta(repo_root, demo_dir, monkeypatch, name):
    monkeypatch.setenv("DEMO_DIR", str(demo_dir))
    path = repo_root / "yaml" / "demo" / f"{name}.yaml"
    assert path.read_text().startswith("# ")
    cfg = load(path, world_size=1, cuda=False)
    model = build_composer_model(cfg, device="meta")
    assert cfg.train.precision == "fp32" and cfg.data.reference_losses == [1.0, 2.0, 3.0]
    if name == "prune":
        assert model.l0.target.d_model == 384 and model.model.cfg.n_layers == 30
    else:
        assert model.l0 is None and model.model.cfg.d_model == 384 and model.model.cfg.n_kv_heads == 2


def problems_of(path, overrides=(), **kwargs) -> list[str]:
    """The problems reported, without the ``file:line:`` / ``command line:`` prefix saying where a key was set."""
    with pytest.raises(ConfigError) as caught:
        load(path, list(overrides), **kwargs)
    return [re.sub(rf"^({re.escape(str(path))}:\d+|command line): ", "", p) for p in caught.value.problems]


def test_tiny_recipe_is_valid(tmp_path, data):
    cfg = load(tiny_recipe(tmp_path, data))
    assert cfg.pruning.target["n_layers"] == 3 and cfg.optimizer.lag_lr == 0.5 and cfg.fsdp.enabled is False


@pytest.mark.parametrize(("override", "key"), [
    ("train.max_batchs=3", "train.max_batchs: unknown key"),
    ("colour=red", "colour: unknown key"),
    ("train.max_batches=many", "train.max_batches: expected int"),
    ("optimizer.lr=[1]", "optimizer.lr: expected float"),
    ("fsdp.version=3", "fsdp.version: 3 is not one of"),
    ("pruning.target.d_model=4096", "pruning.target.d_model=4096 is larger than the source's 96"),
    ("pruning.target.n_layer=2", "pruning.target.n_layer: unknown key"),
    ("data.proportions=[0.5,0.3,0.3]", "data.proportions=[0.5, 0.3, 0.3]: must sum to 1"),
    ("data.proportions=[1.2,-0.2,0.0]", "data.proportions=[1.2, -0.2, 0.0]: every value must be a finite number >= 0"),
    ("data.proportions=[0.5,0.5]", "data.proportions: 2 values for 3 domains"),
    ("data.reference_losses=[1.0]", "data.reference_losses: 1 values for 3 domains"),
    ("data.reference_losses=null", "data.reference_losses: required by data.update=doremi"),
    ("train.micro_batch_size=3", "train.global_batch_size=4 is not divisible by train.micro_batch_size=3"),
    ("data.domains=[alpha,beta,delta]", "data.domains: 'delta' has no MDS data"),
    ("data.seq_len=64", "data.seq_len=64 but"),
    ("data.path=/nonexistent/data", "data.path='/nonexistent/data': no such directory"),
    ("model.pretrained=/nonexistent/model", "model.pretrained='/nonexistent/model'"),
    ("model.pretrained=${oc.env:LLMSHEAR_UNSET_VARIABLE}", "model.pretrained: cannot resolve"),
    ("train.precision=amp_bf16", "train.precision='amp_bf16' needs a GPU"),
    ("data.floor=0.5", "data.floor=0.5: 3 domains x floor exceeds 1"),
    ("data.update=exponential", "data.update: 'exponential' is not one of"),
    ("data.num_workers=2", "data.num_workers=2 must be 0"),
    ("fsdp.activation_checkpointing=true", "fsdp.activation_checkpointing needs fsdp.enabled=true"),
    ("scheduler.warmup=100", "scheduler.warmup=100 must lie in [0, train.max_batches]"),
    ("pruning.lagrangian_warmup=640", "pruning.lagrangian_warmup: unknown key (LLM-Shearing's key; ours: "
                                      "pruning.sparsity_warmup (a fraction of the run))"),
    ("global_train_batch_size=8", "global_train_batch_size: unknown key (llm-foundry's key; ours: "
                                  "train.global_batch_size)"),
    ("model.l0_module.target_model.n_layers=2", "model.l0_module: unknown key (LLM-Shearing's key; ours: pruning"),
    ("pruning.constraint=foo", "pruning.constraint: 'foo' is not one of ['exact', 'row', 'paper', 'overall']"),
    ("pruning.eval_masks=cut", "pruning.eval_masks: 'cut' is not one of"),
    ("pruning.sparsity_warmup=1.5", "pruning.sparsity_warmup=1.5 must lie in [0, 1]"),
    ("pruning.harden_from=0.1", "pruning.harden_from=0.1 must lie in [pruning.sparsity_warmup=0.3, 1]"),
    ("pruning.final_temperature=0.5", "pruning.final_temperature=0.5 must lie in (0, pruning.temperature=0.1]"),
    ("pruning.layer_final_temperature=0",
     "pruning.layer_final_temperature=0.0 must lie in (0, pruning.temperature=0.1]"),
    ("pruning.layer_choice=best", "pruning.layer_choice: 'best' is not one of ['ranking', 'loss']"),
    ("pruning.layer_candidates=1", "pruning.layer_candidates=1 must be at least 2"),
    ("pruning.layer_choice=loss pruning.harden_from=1.0",
     "pruning.layer_choice='loss' compares layer cuts where the masks freeze, and pruning.harden_from=1.0 never"),
    ("optimizer.gate_schedule=decay", "optimizer.gate_schedule: 'decay' is not one of"),
    ("optimizer.clip_norm=-1", "optimizer.clip_norm=-1.0 must not be negative"),
    ("optimizer.lr=.inf", "optimizer.lr: must be a finite number, got inf"),
    ("optimizer.lr=.nan", "optimizer.lr: must be a finite number, got nan"),
    ("optimizer.lag_lr=-.inf", "optimizer.lag_lr: must be a finite number, got -inf"),
    ("optimizer.betas=[0.9,.nan]", "optimizer.betas: must be a finite number, got [0.9, nan]"),
    ("pruning.temperature=.inf", "pruning.temperature: must be a finite number"),
    ("data.reference_losses=[1.0,.nan,2.0]", "data.reference_losses: must be a finite number"),
    ("train.eval_batches=0", "train.eval_batches=0 must be positive, or -1"),
    ("train.eval_batches=-2", "train.eval_batches=-2 must be positive, or -1"),
    ("train.max_nonfinite=0", "train.max_nonfinite=0 must be positive"),
    ("seed=-1", "seed=-1 must lie in [0, 2**32)"),
    ("seed=4294967296", "seed=4294967296 must lie in [0, 2**32)"),
])
def test_bad_value_names_its_key(tmp_path, data, override, key):
    problems = problems_of(tiny_recipe(tmp_path, data), override.split(), cuda=False)
    assert any(key in p for p in problems), problems


def test_world_size_enters_the_batch_check(tmp_path, data):
    problems = problems_of(tiny_recipe(tmp_path, data), world_size=3)
    assert problems == [p for p in problems if "x world size 3" in p] and len(problems) == 1


def test_all_problems_at_once_with_file_and_line(tmp_path, data):
    path = tiny_recipe(tmp_path, data)
    problems = problems_of(path, ["train.max_batchs=3", "data.proportions=[0.9,0.3,0.2]", "train.micro_batch_size=3",
                                  "pruning.target.n_layers=9"])
    assert len(problems) == 4, problems
    path = tiny_recipe(tmp_path, data, data={"proportions": [0.9, 0.3, 0.2]})
    with pytest.raises(ConfigError) as caught:
        load(path)
    (problem,) = caught.value.problems
    line = int(problem.removeprefix(f"{path}:").split(":")[0])
    assert "proportions:" in path.read_text().splitlines()[line - 1]


def test_a_bad_override_is_blamed_on_the_command_line_not_the_yaml_line(tmp_path, data):
    path = tiny_recipe(tmp_path, data)
    with pytest.raises(ConfigError) as caught:
        load(path, ["data.proportions=[0.9,0.3,0.2]", "train.max_batches", "optimizer.lr=.inf"])
    problems = caught.value.problems
    assert len(problems) == 3, problems
    assert all(p.startswith("command line: ") for p in problems), problems
    assert any("'train.max_batches' is not key=value" in p for p in problems), problems


def test_missing_model_pretrained_and_missing_section(tmp_path, data):
    path = tiny_recipe(tmp_path, data)
    recipe = OmegaConf.to_container(OmegaConf.load(path))
    del recipe["model"]["pretrained"]
    del recipe["train"]
    OmegaConf.save(OmegaConf.create(recipe), path)
    problems = problems_of(path)
    assert "model.pretrained: missing (required)" in problems and "train: missing (required)" in problems


def test_missing_shard_is_named(tmp_path, data):
    shard = next((data / "train" / "beta").glob("shard.*.mds"))
    shard.unlink()
    problems = problems_of(tiny_recipe(tmp_path, data))
    assert any(p.startswith("data.path:") and shard.name in p for p in problems), problems


def test_truncated_or_foreign_checkpoint_is_refused(tmp_path, data):
    good, foreign = tmp_path / "good.pt", tmp_path / "foreign.pt"
    torch.save({"state": {"model": {"l0.log_alpha.layer": torch.zeros(4)}}}, good)
    torch.save({"state": {}}, foreign)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:-40])
    for path, why in ((truncated, "truncated or corrupt"), (tmp_path / "absent.pt", "does not exist"),
                      (foreign, "not a Composer checkpoint")):
        problems = problems_of(tiny_recipe(tmp_path, data), [f"checkpoint.load_path={path}"])
        assert any(p.startswith("checkpoint.load_path:") and why in p for p in problems), problems
    assert zipfile.is_zipfile(good)
    load(tiny_recipe(tmp_path, data), [f"checkpoint.load_path={good}"])


def test_existing_checkpoints_are_not_overwritten_without_autoresume(tmp_path, data):
    path = tiny_recipe(tmp_path, data)
    folder = tmp_path / "run"
    folder.mkdir()
    torch.save({}, folder / "ep0-ba3-rank0.pt")
    problems = problems_of(path)
    assert any(p.startswith("checkpoint.save_folder=") and "autoresume" in p for p in problems), problems
    load(path, ["checkpoint.autoresume=true"])


def test_corrupt_latest_checkpoint_is_left_to_the_run_to_set_aside(tmp_path, data):
    """The checks never mutate: the run's start (llmshear.run_folder.recover) sets a corrupt checkpoint aside."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "ep0-ba3-rank0.pt").write_bytes(b"PK\x03\x04 not really a zip")
    (folder / "latest-rank0.pt").symlink_to("ep0-ba3-rank0.pt")
    load(tiny_recipe(tmp_path, data), ["checkpoint.autoresume=true"])
    assert sorted(p.name for p in folder.iterdir()) == ["ep0-ba3-rank0.pt", "latest-rank0.pt"]


def test_proportions_from_a_previous_run(tmp_path, data):
    source = write_proportions(tmp_path / "prev" / "proportions.json", list(reversed(DOMAINS)))
    cfg = load(tiny_recipe(tmp_path, data), ["data.proportions=null", f"data.proportions_from={source}"])
    assert cfg.data.proportions == pytest.approx([1 / 3] * 3)
    problems = problems_of(tiny_recipe(tmp_path, data), [f"data.proportions_from={source}"])
    assert any("set one of them, not both" in p for p in problems)


def test_files_are_resolved_in_their_own_step_and_the_checks_read_nothing(tmp_path, data):
    source = write_proportions(tmp_path / "prev" / "proportions.json", DOMAINS, [0.5, 0.25, 0.25])
    recipe = tiny_recipe(tmp_path, data)
    raw, _ = load_raw(recipe, ["data.proportions=null", f"data.proportions_from={source}"])
    cfg, problems = parse(raw)
    assert not problems and cfg.data.proportions is None
    assert resolve_files(cfg) == (frozenset({"proportions"}), [])
    assert cfg.data.proportions == [0.5, 0.25, 0.25]
    unread, _ = parse(raw)  # not resolved: the file's value is not checked, and nothing is reported of it
    assert not any("proportions" in p for p in check_proportions(unread))
    source.write_text("{")
    cfg, _ = parse(raw)
    resolved, problems = resolve_files(cfg)
    assert resolved == frozenset() and cfg.data.proportions is None
    assert problems and problems[0].startswith("data.proportions_from: cannot read proportions from")


def test_reference_losses_from_the_reference_loss_script(tmp_path, data):
    path = tmp_path / "reference.json"
    path.write_text('{"domains": ["gamma", "alpha", "beta"], "reference_losses": [3.0, 1.0, 2.0], "tokens": [1, 1, 1]}')
    cfg = load(tiny_recipe(tmp_path, data), ["data.reference_losses=null", f"data.reference_losses_from={path}"])
    assert cfg.data.reference_losses == [1.0, 2.0, 3.0]
    path.write_text('{"domains": ["alpha"], "reference_losses": [1.0]}')
    problems = problems_of(tiny_recipe(tmp_path, data), ["data.reference_losses=null",
                                                          f"data.reference_losses_from={path}"])
    assert any(p.startswith("data.reference_losses_from:") and "has domains ['alpha']" in p for p in problems)


def test_reference_losses_measured_on_other_data_are_refused_wherever_the_split_was_copied(tmp_path, data):
    path = tmp_path / "reference.json"
    recorded = {"domains": DOMAINS, "reference_losses": [1.0, 2.0, 3.0],
                "eval_fingerprints": split_fingerprints(data / "eval", DOMAINS)}
    path.write_text(json.dumps(recorded))
    copied = tmp_path / "scratch" / "data"  # the same data staged elsewhere (a job's local scratch): accepted
    shutil.copytree(data, copied)
    overrides = ["data.reference_losses=null", f"data.reference_losses_from={path}"]
    assert load(tiny_recipe(tmp_path, copied), overrides).data.reference_losses == [1.0, 2.0, 3.0]
    other = write_mds(tmp_path / "other", DOMAINS, 32, n_train=4, n_eval=2, seed=1)  # another preparation
    problems = problems_of(tiny_recipe(tmp_path, other), overrides)
    assert problems == [f"data.reference_losses_from={str(path)!r}: measured on another eval split than "
                        f"{other / 'eval'} (domains {DOMAINS} hold other sequences: another preparation, tokenizer "
                        f"or sequence length); measure the reference on this data (scripts/reference_loss.py "
                        f"--source MODEL --data {other / 'eval'})"]
    del recorded["eval_fingerprints"]  # a scaling-law fit records none: not checked
    path.write_text(json.dumps(recorded))
    assert load(tiny_recipe(tmp_path, other), overrides).data.reference_losses == [1.0, 2.0, 3.0]


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  pretrained: [unclosed\n")
    with pytest.raises(ConfigError, match=r"line 3|line 2"):
        load(path)


def test_non_finite_value_in_the_yaml_names_file_and_line(tmp_path, data):
    path = tiny_recipe(tmp_path, data, optimizer={"lr": float("inf")})
    assert "lr: .inf" in path.read_text()
    with pytest.raises(ConfigError) as caught:
        load(path)
    (problem,) = caught.value.problems
    line = int(problem.removeprefix(f"{path}:").split(":")[0])
    assert "lr: .inf" in path.read_text().splitlines()[line - 1] and "optimizer.lr: must be a finite" in problem


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_save_folder_at_or_under_a_regular_file(tmp_path, data, depth):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("not a folder")
    folder = blocker.joinpath(*["sub"] * depth)
    problems = problems_of(tiny_recipe(tmp_path, data), [f"checkpoint.save_folder={folder}"])
    assert problems == [f"checkpoint.save_folder={str(folder)!r}: {blocker} is a file, not a directory"]
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("inside", [".", "eval", "train/alpha"])
def test_a_run_folder_inside_the_data_root_is_refused(tmp_path, data, inside):
    folder = (data / inside).resolve()
    problems = problems_of(tiny_recipe(tmp_path, data), [f"checkpoint.save_folder={data / inside}"])
    assert problems == [f"checkpoint.save_folder={str(data / inside)!r} lies inside data.path={str(data)!r}: the run "
                        "would write its checkpoints, masks/ and metrics among the data (and lose them to a "
                        "re-prepared data root); give the run a folder of its own"]
    assert not (folder / "masks").exists()
    load(tiny_recipe(tmp_path, data), [f"checkpoint.save_folder={data.parent / (data.name + '-run')}"])  # a sibling


def test_bad_input_on_the_command_line_exits_2_without_traceback(repo_root, tmp_path, data):
    """train.py as a user runs it: every problem at once, exit 2, no traceback, the run folder untouched."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text('{"batch": 0, "loss/train/total": 5.0}\n')
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    overrides = ["optimizer.lr=.inf", "train.eval_batches=0", "seed=-1", "train.max_batches"]
    result = subprocess.run([sys.executable, str(repo_root / "train.py"), str(tiny_recipe(tmp_path, data)),
                             *overrides], capture_output=True, text=True, timeout=120, cwd=repo_root)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for key in ("optimizer.lr", "train.eval_batches", "seed=-1", "'train.max_batches' is not key=value"):
        assert f"command line: {key}" in result.stderr, result.stderr
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()} == before


def test_every_foreign_key_is_in_the_docs_table_and_points_to_a_section_of_ours():
    docs = (Path(__file__).resolve().parents[1] / "docs" / "recipes.md").read_text()
    sections = {f.name for f in dataclasses.fields(RunConfig)}
    for key, (whose, ours) in FOREIGN_KEYS.items():
        assert f"| `{key}` | {whose} |" in docs, key
        assert ours.startswith("nothing") or ours.split(" ")[0].split(".")[0] in sections, key


def _loaded_by(code: str, modules: str, **env: str) -> list[str]:
    """The modules matching the Python expression ``modules`` (over ``m``, a module name) that a fresh interpreter
    has imported after running ``code``."""
    program = f"import sys\n{code}\nprint(sorted(m for m in sys.modules if {modules}))"
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, **env, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().replace("'", '"'))


def test_reading_a_recipe_loads_no_runtime(tmp_path):
    """``llmshear.config`` is a leaf: parsing a recipe (its types and choices) imports neither torch, Composer,
    transformers, botocore nor streaming; only :func:`load`'s checks of models, data and checkpoints do."""
    code = ("import llmshear.config\nfrom llmshear.config.schema import parse\n"
            "from llmshear.config.types import load_raw\n"
            f"raw, problems = load_raw({str(REPO / 'yaml/prune_1.3b.yaml')!r}, ['train.max_batches=10'])\n"
            "cfg, more = parse(raw)\nassert cfg is not None and not problems + more, problems + more")
    heavy = "m in ('torch', 'composer', 'transformers', 'botocore', 'streaming')"
    assert _loaded_by(code, heavy, DATA_DIR=str(tmp_path), RUN_DIR=str(tmp_path), LLAMA2_7B="x") == []


def test_the_training_path_imports_no_offline_tool():
    """``train.py``'s modules never import ``llmshear.tools`` (planner, export, evaluation, demo)."""
    assert _loaded_by("import llmshear.run, llmshear.builders", "m.startswith('llmshear.tools')") == []
