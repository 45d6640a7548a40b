"""Tiny inputs for recipe tests: MDS domains of random tokens, fake model directories, tiny recipe YAMLs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from streaming import MDSWriter

from llmshear.models.hf import config_to_hf, load_config
from llmshear.models.l0 import TargetShape

DOMAINS = ["alpha", "beta", "gamma"]


def write_mds(root: Path, domains: list[str], seq_len: int, n_train: int = 64, n_eval: int = 8,
              vocab: int = 256, seed: int = 0) -> Path:
    """``root/{train,eval}/<domain>`` MDS dirs; domain ``i`` repeats a short random pattern (learnable, distinct)."""
    rng = np.random.default_rng(seed)
    for i, domain in enumerate(domains):
        pattern = rng.integers(0, vocab, size=3 + i)
        for split, count in (("train", n_train), ("eval", n_eval)):
            out = root / split / domain
            with MDSWriter(out=str(out), columns={"tokens": f"ndarray:uint16:{seq_len}"}, compression=None) as w:
                for _ in range(count):
                    tokens = np.resize(np.roll(pattern, int(rng.integers(len(pattern)))), seq_len)
                    noise = rng.random(seq_len) < 0.1
                    tokens[noise] = rng.integers(0, vocab, size=int(noise.sum()))
                    w.write({"tokens": tokens.astype(np.uint16)})
    return root


def write_config_dir(directory: Path, preset: str, target: dict | None = None) -> Path:
    """An HF directory with only ``config.json``: the preset's shape, or its cut to ``target``."""
    cfg = load_config(preset)
    if target is not None:
        cfg = TargetShape.from_dict(target, cfg).to_config(cfg)
    config_to_hf(cfg).save_pretrained(directory)
    return directory


def write_proportions(path: Path, domains: list[str], proportions: list[float] | None = None) -> Path:
    """A ``proportions.json`` as a run writes it (uniform unless ``proportions`` are given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    proportions = proportions or [1 / len(domains)] * len(domains)
    path.write_text(json.dumps({"domains": domains, "proportions": proportions}))
    return path


def tiny_recipe(tmp: Path, data_dir: Path, run: str = "run", prune: bool = True, **sections) -> Path:
    """A tiny pruning (or plain) recipe on ``tiny-gqa``; ``sections`` update the defaults, section by section."""
    recipe = {
        "run_name": run,
        "seed": 3,
        "model": {"pretrained": "tiny-gqa"},
        "data": {"path": str(data_dir), "domains": DOMAINS, "proportions": [0.5, 0.3, 0.2],
                 "reference_losses": [4.0, 4.5, 5.0], "update": "doremi", "seq_len": 32},
        "optimizer": {"lr": 1e-3, "lag_lr": 0.5},
        "scheduler": {"warmup": 2},
        "train": {"max_batches": 6, "global_batch_size": 4, "micro_batch_size": 2, "eval_interval": 3,
                  "eval_batch_size": 4},
        "checkpoint": {"save_folder": str(tmp / run), "save_interval": 3},
    }
    if prune:
        recipe["pruning"] = {"target": {"d_model": 64, "n_layers": 3, "n_heads": 4, "n_kv_heads": 1,
                                        "intermediate_size": 96}, "sparsity_warmup": 0.3}
    for name, values in sections.items():
        if isinstance(values, dict):
            recipe.setdefault(name, {}).update(values)
        else:
            recipe[name] = values
    path = tmp / f"{run}.yaml"
    OmegaConf.save(OmegaConf.create(recipe), path)
    return path


def final_state(folder: Path, batch: int = 6) -> dict:
    """The model, optimizer, data and torch RNG state of the run's checkpoint at ``batch``."""
    checkpoint = torch.load(folder / f"ep0-ba{batch}-rank0.pt", map_location="cpu", weights_only=False)
    state = checkpoint["state"]
    return {"model": state["model"], "optimizer": state["optimizers"], "data": state["dataset_state"],
            "rng": checkpoint["rng"][0]["torch"]}


def assert_same_state(a: dict, b: dict) -> None:
    """Two :func:`final_state` results are bit-identical."""
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b["model"][key]), key
    assert a["data"] == b["data"]
    for x, y in zip(torch.utils._pytree.tree_leaves(a["optimizer"]), torch.utils._pytree.tree_leaves(b["optimizer"]),
                    strict=True):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    assert torch.equal(a["rng"], b["rng"])


def bucket_names(client, prefix: str) -> dict[str, bytes]:
    """The objects of bucket ``bucket`` under ``prefix`` (names relative to it) and their bytes."""
    listed = client.list_objects_v2(Bucket="bucket", Prefix=prefix).get("Contents", [])
    return {o["Key"].removeprefix(prefix): client.get_object(Bucket="bucket", Key=o["Key"])["Body"].read()
            for o in listed}
