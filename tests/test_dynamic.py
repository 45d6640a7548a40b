"""Dynamic per-domain loading: proportions, passes, rank slices, exact resume, eval walk (llmshear.datasets.dynamic)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from data_fixtures import numbered_shards
from torch.utils.data import DataLoader

from llmshear.datasets.dynamic import (
    DomainEvalDataset,
    DynamicDomainDataset,
    build_eval_dataloader,
    build_train_dataloader,
)

DOMAINS = ["a", "b", "c"]


def sources(sizes, seq_len=4):
    """In-memory domains: sample j of domain d is ``d * 1000 + j`` repeated ``seq_len`` times."""
    return [[np.full(seq_len, d * 1000 + j, dtype=np.uint16) for j in range(n)] for d, n in enumerate(sizes)]


def dataset(sizes=(50, 30, 20), proportions=(0.5, 0.3, 0.2), batch=8, rank=0, world=1, seed=3):
    return DynamicDomainDataset(sources(sizes), DOMAINS[:len(sizes)], list(proportions), global_batch_size=batch,
                                seed=seed, rank=rank, world_size=world)


def batches(ds, n, batch_size=None):
    loader = DataLoader(ds, batch_size=batch_size or ds.batch_size)
    return list(itertools.islice(iter(loader), n))


def test_batch_layout_matches_the_training_contract():
    (batch,) = batches(dataset(), 1)
    assert set(batch) == {"input_ids", "labels", "domain", "sample_id"}
    assert batch["input_ids"].shape == (8, 4) and batch["input_ids"].dtype == torch.int64
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert batch["domain"].shape == (8,) and batch["domain"].dtype == torch.int64
    assert batch["sample_id"].dtype == torch.int64
    offsets = torch.tensor([0, 50, 80])
    # the token value encodes (domain, index): the sample id is the domain offset + index
    index = batch["input_ids"][:, 0] - 1000 * batch["domain"]
    assert torch.equal(batch["sample_id"], offsets[batch["domain"]] + index)


def test_realised_shares_match_proportions_over_2000_batches():
    proportions = [0.6, 0.3, 0.1]
    ds = dataset(sizes=(40, 25, 7), proportions=proportions, batch=32)
    counts = np.zeros(3)
    for _ in range(2000):
        domains, _ = ds.next_global_batch()
        counts += np.bincount(domains, minlength=3)
    np.testing.assert_allclose(counts / counts.sum(), proportions, atol=0.02)


def test_no_sample_repeats_within_a_pass_and_passes_reshuffle():
    ds = dataset(sizes=(12, 5, 9), proportions=(0.4, 0.3, 0.3), batch=4)
    walks = {d: [] for d in range(3)}
    while ds.state_dict()["passes"][1] < 3:
        for d, i in zip(*ds.next_global_batch(), strict=True):
            walks[int(d)].append(int(i))
    for d, size in enumerate((12, 5, 9)):
        full_passes = len(walks[d]) // size
        passes = [walks[d][p * size:(p + 1) * size] for p in range(full_passes)]
        assert all(sorted(p) == list(range(size)) for p in passes), f"domain {d} repeats within a pass"
    small = [tuple(walks[1][p * 5:(p + 1) * 5]) for p in range(3)]
    assert len(set(small)) > 1, "a new pass must be reshuffled"


def test_tiny_domain_runs_through_three_passes_through_the_dataloader():
    ds = dataset(sizes=(30, 5), proportions=(0.5, 0.5), batch=4)
    seen = [int(s) for batch in batches(ds, 10) for s, d in zip(batch["sample_id"], batch["domain"], strict=True)
            if d == 1]
    assert len(seen) >= 15 and ds.state_dict()["passes"][1] >= 3
    for p in range(3):
        assert sorted(seen[p * 5:(p + 1) * 5]) == list(range(30, 35))


def test_set_proportions_takes_effect_from_the_next_batch():
    ds = dataset()
    loader = iter(DataLoader(ds, batch_size=8))
    next(loader)
    ds.set_proportions([0.0, 1.0, 0.0])
    assert ds.proportions == [0.0, 1.0, 0.0]
    assert next(loader)["domain"].tolist() == [1] * 8
    with pytest.raises(ValueError, match="must sum to 1"):
        ds.set_proportions([0.5, 0.1, 0.1])
    with pytest.raises(ValueError, match="2 values for 3 domains"):
        ds.set_proportions([0.5, 0.5])


def _run(ds, n, change_at=3, new=(0.1, 0.1, 0.8)):
    """``n`` batches of ``ds`` through a DataLoader, switching proportions before batch ``change_at``."""
    loader, out = iter(DataLoader(ds, batch_size=ds.batch_size)), []
    for _ in range(n):
        if ds.batch_index == change_at:
            ds.set_proportions(list(new))
        out.append(next(loader))
    return out


def test_resume_after_5_batches_reproduces_10_uninterrupted_batches():
    sizes, proportions = (9, 6, 4), (0.5, 0.3, 0.2)  # small domains: passes wrap during the run
    reference = _run(dataset(sizes, proportions), 10)
    first = dataset(sizes, proportions)
    head = _run(first, 5)
    state = first.state_dict(num_samples=5 * 8)
    resumed = dataset(sizes, proportions)  # a fresh process: initial proportions from the config
    resumed.load_state_dict(state)
    tail = _run(resumed, 5)
    for expected, got in zip(reference, head + tail, strict=True):
        for key in expected:
            assert torch.equal(expected[key], got[key]), key
    assert resumed.proportions == pytest.approx([0.1, 0.1, 0.8])


def test_state_dict_holds_proportions_batch_positions_and_passes():
    ds = dataset(sizes=(3, 3, 3), batch=6)
    ds.next_global_batch()
    ds.set_proportions([0.2, 0.2, 0.6])
    state = ds.state_dict()
    assert state["batch"] == 1 and state["proportions"] == pytest.approx([0.2, 0.2, 0.6])
    assert sum(state["positions"]) + 3 * sum(state["passes"]) == 6


def test_load_state_dict_rejects_another_run():
    state = dataset().state_dict()
    with pytest.raises(ValueError, match="global_batch_size: checkpoint has 8, this run 16"):
        dataset(batch=16).load_state_dict(state)
    with pytest.raises(ValueError, match="sizes"):
        dataset(sizes=(50, 30, 21)).load_state_dict(state)


def test_ranks_take_disjoint_slices_of_the_same_global_batch():
    whole = batches(dataset(batch=8, world=1), 6)
    parts = [batches(dataset(batch=8, rank=r, world=2), 6) for r in range(2)]
    for b in range(6):
        ids = [set(p[b]["sample_id"].tolist()) for p in parts]
        assert not ids[0] & ids[1]
        assert torch.equal(torch.cat([p[b]["sample_id"] for p in parts]), whole[b]["sample_id"])
    states = [dataset(batch=8, rank=r, world=2) for r in range(2)]
    for ds in states:
        batches(ds, 6)
    assert states[0].state_dict() == states[1].state_dict()


def test_bad_constructions_are_clear_errors():
    with pytest.raises(ValueError, match="multiple of the world size 2"):
        dataset(batch=7, world=2)
    with pytest.raises(ValueError, match="domain 'b' has no samples"):
        dataset(sizes=(3, 0, 3))
    with pytest.raises(ValueError, match="must sum to 1"):
        dataset(proportions=(0.5, 0.5, 0.5))


def test_eval_walks_every_sample_once_tagged_with_its_domain():
    ds = DomainEvalDataset(sources((3, 1, 2)), DOMAINS, rank=0, world_size=1)
    samples = list(ds)
    assert len(samples) == len(ds) == 6
    assert [(s["domain"], s["sample_id"]) for s in samples] == [(0, 0), (1, 3), (2, 4), (0, 1), (2, 5), (0, 2)]
    for s in samples:
        assert int(s["input_ids"][0]) == 1000 * s["domain"] + s["sample_id"] - [0, 3, 4][s["domain"]]
    assert [(s["domain"], s["sample_id"]) for s in samples] == [(s["domain"], s["sample_id"]) for s in ds]


def test_eval_ranks_split_the_samples_and_pad_to_equal_length():
    parts = [list(DomainEvalDataset(sources((0, 5, 2)), DOMAINS, rank=r, world_size=2)) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 4
    real = [s["sample_id"] for p in parts for s in p if s["domain"] >= 0]
    assert sorted(real) == list(range(7))
    (pad,) = [s for p in parts for s in p if s["domain"] < 0]
    assert pad["sample_id"] == -1 and torch.all(pad["labels"] == -100)


def test_dataloaders_from_mds_directories(tmp_path):
    train = numbered_shards(tmp_path, {"a": 40, "b": 7}, seq_len=8)
    loader = build_train_dataloader(train, ["a", "b"], [0.5, 0.5], batch_size=4, seq_len=8, seed=1, rank=1,
                                    world_size=2)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (4, 8)
    assert torch.equal(batch["input_ids"][:, 0], batch["domain"] * 1000 + batch["sample_id"] - batch["domain"] * 40)
    assert loader.dataset.global_batch_size == 8 and loader.dataset.domains == ["a", "b"]
    evaluation = build_eval_dataloader(train, ["a", "b"], batch_size=16, seq_len=8, rank=0, world_size=1)
    assert sum(len(b["domain"]) for b in evaluation) == 47


def test_dataloader_errors_name_the_key(tmp_path):
    train = numbered_shards(tmp_path, {"a": 4}, seq_len=8)
    with pytest.raises(ValueError, match=r"data\.num_workers=2: must be 0"):
        build_train_dataloader(train, ["a"], [1.0], batch_size=2, num_workers=2, rank=0, world_size=1)
    with pytest.raises(ValueError, match=r"data\.seq_len=16 but .* holds sequences of 8 tokens"):
        build_train_dataloader(train, ["a"], [1.0], batch_size=2, seq_len=16, rank=0, world_size=1)
    with pytest.raises(FileNotFoundError, match="index.json is missing"):
        build_train_dataloader([tmp_path / "nowhere"], ["a"], [1.0], batch_size=2, rank=0, world_size=1)
