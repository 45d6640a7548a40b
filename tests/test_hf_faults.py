"""Broken Hugging Face sources: a missing shard, a truncated or corrupt safetensors file, an unreadable index,
weights whose shapes contradict config.json. Each is a clear error naming the file (and tensor) at config time,
from the loader, and from train.py (exit 2, no traceback); nothing in the source directory is changed."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from recipe_fixtures import DOMAINS, tiny_recipe, write_mds
from safetensors.torch import load_file
from script_modules import script

from llmshear import run as train
from llmshear.config import ConfigError, load
from llmshear.models.build import PRESETS, build_model
from llmshear.models.hf import check_weights, load_model, save_pretrained
from llmshear.models.weights import CheckpointMismatchError, WeightFileError


def _sharded(path: Path) -> Path:
    """tiny-gqa saved in shards (several safetensors files and an index)."""
    out = save_pretrained(build_model(PRESETS["tiny-gqa"](), seed=0), path, max_shard_size="100KB")
    assert len(list(out.glob("model-*.safetensors"))) > 2
    return out


def _missing_shard(model: Path) -> tuple[str, str]:
    shard = sorted(model.glob("model-*.safetensors"))[1]
    shard.unlink()
    return "model.safetensors.index.json names shard(s) missing", shard.name


def _truncated(model: Path) -> tuple[str, str]:
    shard = sorted(model.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    return f"{shard.name}: not a readable safetensors file", "incomplete metadata"


def _corrupt_header(model: Path) -> tuple[str, str]:
    shard = sorted(model.glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[8:16] = b"\x00garbage"
    shard.write_bytes(bytes(data))
    return f"{shard.name}: not a readable safetensors file", "deserializing header"


def _bad_index(model: Path) -> tuple[str, str]:
    (model / "model.safetensors.index.json").write_text('{"weight_map": ')
    return "model.safetensors.index.json: not a readable weight index", "JSONDecodeError"


def _index_lies(model: Path) -> tuple[str, str]:
    index = json.loads((model / "model.safetensors.index.json").read_text())
    first, second = sorted(set(index["weight_map"].values()))[:2]
    key = next(k for k, v in index["weight_map"].items() if v == first)
    index["weight_map"][key] = second
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    return "lists tensors its shards do not hold", f"{key} (in {second})"


def _shape_contradicts_config(model: Path) -> tuple[str, str]:
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] * 2}))
    return ".safetensors: shape mismatch for model.layers.0.mlp.down_proj.weight", "(from the config of"


FAULTS = {"missing shard": (_missing_shard, WeightFileError), "truncated shard": (_truncated, WeightFileError),
          "corrupt header": (_corrupt_header, WeightFileError), "unreadable index": (_bad_index, WeightFileError),
          "index names the wrong shard": (_index_lies, WeightFileError),
          "shape contradicts config.json": (_shape_contradicts_config, CheckpointMismatchError)}


def _hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_mds(tmp_path_factory.mktemp("data"), DOMAINS, 32, n_train=2, n_eval=1)


@pytest.mark.parametrize("fault", list(FAULTS))
def test_broken_source_is_named_at_config_time_and_by_the_loader(tmp_path, data, fault):
    model = _sharded(tmp_path / "model")
    damage, error = FAULTS[fault]
    needles = damage(model)
    before = _hashes(model)
    for call in (check_weights, load_model):
        with pytest.raises(error) as caught:
            call(model)
        assert all(n in str(caught.value) for n in needles), caught.value
    with pytest.raises(ConfigError) as caught:
        load(tiny_recipe(tmp_path, data, prune=False, model={"pretrained": str(model)}))
    (problem,) = caught.value.problems
    assert "model.pretrained=" in problem and all(n in problem for n in needles), problem
    with pytest.raises(ConfigError) as caught:  # the same source as a distillation teacher
        load(tiny_recipe(tmp_path, data, prune=False, distill={"teacher": str(model)}))
    (problem,) = caught.value.problems
    assert "distill.teacher=" in problem and all(n in problem for n in needles), problem
    assert _hashes(model) == before


def test_a_directory_with_only_config_json_is_checked_and_planned_but_does_not_run(tmp_path, data, caplog):
    """A config-only shape passes the config check (the shipped recipes are tested with them) and the planner; a
    run, or generation, names what is missing before any work."""
    model = _sharded(tmp_path / "model")
    for path in model.glob("model*"):
        path.unlink()
    check_weights(model)
    with pytest.raises(FileNotFoundError, match="has no weights"):
        load_model(model)
    recipe = tiny_recipe(tmp_path, data, prune=False, model={"pretrained": str(model)})
    load(recipe)
    assert train.main([str(recipe)]) == 2
    assert (f"model.pretrained='{model}': {model} has a config.json but no weights (none of "
            "model.safetensors.index.json, pytorch_model.bin.index.json, model.safetensors, pytorch_model.bin): a "
            "run needs them; a config-only directory serves scripts/plan.py") in caplog.text
    assert train.main([str(tiny_recipe(tmp_path, data, prune=False, model={"pretrained": "llama2-7b"}))]) == 2
    assert "'llama2-7b' is a preset of a public shape without weights" in caplog.text
    assert script("generate").main(["--model", str(model), "--prompt", "hi"]) == 2
    assert not (tmp_path / "run").exists()


def test_train_py_with_a_truncated_source_exits_2_without_traceback(repo_root, tmp_path, data):
    model = _sharded(tmp_path / "model")
    needles = _truncated(model)
    before = _hashes(model)
    recipe = tiny_recipe(tmp_path, data, prune=False, model={"pretrained": str(model)})
    result = subprocess.run([sys.executable, str(repo_root / "train.py"), str(recipe)], capture_output=True,
                            text=True, timeout=120, cwd=repo_root)
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout, result.stderr
    assert "model.pretrained=" in result.stderr and all(n in result.stderr for n in needles), result.stderr
    assert _hashes(model) == before and not (tmp_path / "run").exists()


def test_a_truncated_pytorch_bin_file_is_named_by_the_loader(tmp_path):
    """``pytorch_model*.bin`` files are read only when loading (unpickling is not a config-time check)."""
    model = save_pretrained(build_model(PRESETS["tiny-gqa"](), seed=0), tmp_path / "model")
    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    assert load_model(model).cfg == PRESETS["tiny-gqa"]()
    path = model / "pytorch_model.bin"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    before = _hashes(model)
    check_weights(model)
    with pytest.raises(WeightFileError, match=r"pytorch_model\.bin: not a readable PyTorch weight file"):
        load_model(model)
    assert _hashes(model) == before


@pytest.mark.parametrize(("key", "value"), [("num_attention_heads", 0), ("num_hidden_layers", 0),
                                            ("intermediate_size", -1)])
def test_a_source_with_a_size_of_zero_is_named_by_the_planner_and_the_run(repo_root, tmp_path, data, caplog, key,
                                                                          value):
    model = _sharded(tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, key: value}))
    ours = {"num_attention_heads": "n_heads", "num_hidden_layers": "n_layers"}.get(key, key)
    recipe = str(repo_root / "yaml" / "demo" / "prune.yaml")
    assert script("plan").main([recipe, "--source", str(model), "--gpus", "1"]) == 2
    assert f"{ours}={value}: every size of a model must be a positive integer" in caplog.text
    with pytest.raises(ConfigError, match=f"{ours}={value}: every size of a model must be a positive integer"):
        load(tiny_recipe(tmp_path, data, model={"pretrained": str(model)}))
