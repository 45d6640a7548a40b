"""The dynamic-loading callback inside Composer: updates, logs, absent domains, exact resume, two ranks."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from composer import Trainer
from composer.core import Callback
from composer.loggers import InMemoryLogger
from data_fixtures import REPO, TinyLM, random_shards
from torch.utils.data import DataLoader

from llmshear.callbacks.dynamic_loading import DynamicLoadingCallback
from llmshear.datasets.dynamic import DomainEvalDataset, build_eval_dataloader, build_train_dataloader
from llmshear.datasets.mds import open_domains
from llmshear.datasets.proportions import PROPORTIONS_FILE, read_domain_values, update_proportions

DOMAINS = ["a", "b", "c"]
REFERENCE = [3.0, 2.0, 1.0]
START = [0.5, 0.3, 0.2]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    random_shards(root, {"a": 40, "b": 25, "c": 6}, split="train")
    random_shards(root, {"a": 5, "b": 4, "c": 3}, split="eval", seed=1)
    return root


class SampleRecorder(Callback):
    def __init__(self):
        self.ids = []

    def after_dataloader(self, state, logger):
        self.ids.append(state.batch["sample_id"].tolist())


def _trainer(data, max_batches, eval_loader=None, callbacks=(), folder=None, **kwargs):
    train = build_train_dataloader([data / "train" / d for d in DOMAINS], DOMAINS, START, batch_size=4, seq_len=16,
                                   seed=7, rank=0, world_size=1)
    evaluation = eval_loader or build_eval_dataloader([data / "eval" / d for d in DOMAINS], DOMAINS, batch_size=4,
                                                      rank=0, world_size=1)
    callback = DynamicLoadingCallback(DOMAINS, rule="doremi", reference_losses=REFERENCE, eta=1.0, smoothing=1e-4,
                                      folder=folder)
    trainer = Trainer(model=TinyLM.build(DOMAINS), train_dataloader=train, eval_dataloader=evaluation,
                      eval_interval="3ba", max_duration=f"{max_batches}ba", callbacks=[callback, *callbacks],
                      device="cpu", progress_bar=False, log_to_console=False, seed=7, **kwargs)
    return trainer, callback, train.dataset


def test_update_after_each_eval_sets_and_logs_proportions(data):
    memory = InMemoryLogger()
    trainer, callback, dataset = _trainer(data, 6, loggers=[memory])
    trainer.fit()
    assert [h["batch"] for h in callback.history] == [3, 6]
    previous = START
    for entry in callback.history:
        expected = update_proportions("doremi", previous, entry["losses"], REFERENCE, eta=1.0, smoothing=1e-4)
        assert entry["proportions"] == pytest.approx(expected.tolist(), abs=1e-12)
        previous = entry["proportions"]
    assert dataset.proportions == callback.history[-1]["proportions"]
    last = callback.history[-1]
    for i, d in enumerate(DOMAINS):
        assert memory.data[f"dynamic_loading/weight/{d}"][-1][1] == pytest.approx(last["proportions"][i])
        assert memory.data[f"dynamic_loading/loss/{d}"][-1][1] == pytest.approx(last["losses"][i])
        assert memory.data[f"dynamic_loading/gap/{d}"][-1][1] == pytest.approx(last["losses"][i] - REFERENCE[i])
        assert float(memory.data[f"metrics/eval/DomainCrossEntropy/{d}"][-1][1]) == pytest.approx(last["losses"][i])


def test_proportions_file_holds_the_last_update_and_reads_back(data, tmp_path):
    # 7 batches, evaluations at 3 and 6, and once more after FIT_END (3 does not divide 7): that one is final too
    trainer, callback, dataset = _trainer(data, 7, folder=tmp_path)
    trainer.fit()
    assert [h["batch"] for h in callback.history] == [3, 6, 7]
    assert read_domain_values(tmp_path / PROPORTIONS_FILE, DOMAINS, "proportions") == dataset.proportions
    assert dataset.proportions == callback.history[-1]["proportions"]
    reordered = read_domain_values(tmp_path / PROPORTIONS_FILE, DOMAINS[::-1], "proportions")
    assert reordered == dataset.proportions[::-1]
    with pytest.raises(ValueError, match="has domains"):
        read_domain_values(tmp_path / PROPORTIONS_FILE, ["a", "b"], "proportions")


def test_domain_absent_from_eval_keeps_its_weight_and_nothing_is_nan(data):
    sources = open_domains([data / "eval" / d for d in DOMAINS[:2]]) + [[]]
    evaluation = DataLoader(DomainEvalDataset(sources, DOMAINS, rank=0, world_size=1), batch_size=4)
    memory = InMemoryLogger()
    trainer, callback, dataset = _trainer(data, 3, eval_loader=evaluation, loggers=[memory])
    trainer.fit()
    (entry,) = callback.history
    assert entry["losses"][2] is None and dataset.proportions[2] == pytest.approx(START[2], abs=1e-15)
    assert "dynamic_loading/loss/c" not in memory.data and "dynamic_loading/gap/c" not in memory.data
    values = [float(v) for series in memory.data.values() for _, v in series if isinstance(v, int | float)]
    assert all(not math.isnan(v) for v in values)
    assert memory.data["metrics/eval/DomainCrossEntropy/c"][-1][1] is None


def test_resume_from_checkpoint_draws_exactly_the_uninterrupted_batches(data, tmp_path):
    full = SampleRecorder()
    trainer, callback, dataset = _trainer(data, 10, callbacks=[full])
    trainer.fit()
    head = SampleRecorder()
    first, _, _ = _trainer(data, 5, callbacks=[head], save_folder=str(tmp_path), save_interval="5ba")
    first.fit()
    first.close()
    tail = SampleRecorder()
    resumed, resumed_callback, resumed_dataset = _trainer(data, 10, callbacks=[tail],
                                                          load_path=str(tmp_path / "ep0-ba5-rank0.pt"))
    resumed.fit()
    assert callback.history[0]["batch"] == 3 and callback.history[0]["proportions"] != START
    assert head.ids + tail.ids == full.ids
    assert resumed_callback.history == callback.history
    assert resumed_dataset.state_dict() == dataset.state_dict()


def test_callback_state_dict_round_trip():
    callback = DynamicLoadingCallback(DOMAINS, rule="constant")
    callback.history.append({"batch": 3, "losses": [1.0, None, 2.0], "proportions": START})
    other = DynamicLoadingCallback(DOMAINS, rule="constant")
    other.load_state_dict(callback.state_dict())
    assert other.history == callback.history
    with pytest.raises(ValueError, match="domains"):
        DynamicLoadingCallback(["x"], rule="constant").load_state_dict(callback.state_dict())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rule": "softmax"}, r"data.update='softmax': unknown rule; known rules: \['constant', 'doremi'\]"),
    ({"rule": "doremi"}, "data.reference_losses: required by data.update=doremi"),
    ({"rule": "doremi", "reference_losses": [1.0]}, "data.reference_losses: 1 values for 3 domains"),
    ({"rule": "constant", "cap": 0.2}, "data.cap=0.2: 3 domains x cap is below 1"),
])
def test_callback_configuration_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DynamicLoadingCallback(DOMAINS, **kwargs)


def test_two_ranks_are_disjoint_and_agree_on_proportions(data, tmp_path):
    launcher = shutil.which("composer", path=str(Path(sys.executable).parent)) or shutil.which("composer")
    if launcher is None:
        pytest.skip("the composer launcher is not installed")
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    done = subprocess.run([launcher, "-n", "2", "--stderr", str(tmp_path / "err{rank}.txt"),
                           str(REPO / "tests" / "dist_dynamic_worker.py"), str(data), str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    errors = "".join(p.read_text()[-3000:] for p in tmp_path.glob("err*.txt"))
    assert done.returncode == 0, done.stdout[-3000:] + errors
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]["ids"]) == len(ranks[1]["ids"]) == 4
    for batch0, batch1 in zip(ranks[0]["ids"], ranks[1]["ids"], strict=True):
        assert not set(batch0) & set(batch1)
    assert [h["batch"] for h in ranks[0]["history"]] == [2, 4]
    assert ranks[0]["proportions"] == ranks[1]["proportions"] != [0.6, 0.3, 0.1]
    assert ranks[0]["history"] == ranks[1]["history"] and ranks[0]["state"] == ranks[1]["state"]


def test_evaluation_outside_training_changes_nothing(data):
    evaluation = build_eval_dataloader([data / "eval" / d for d in DOMAINS], DOMAINS, batch_size=4, rank=0,
                                       world_size=1)
    callback = DynamicLoadingCallback(DOMAINS, rule="doremi", reference_losses=REFERENCE)
    trainer = Trainer(model=TinyLM.build(DOMAINS), eval_dataloader=evaluation, callbacks=[callback], device="cpu",
                      progress_bar=False, log_to_console=False)
    trainer.eval()
    assert callback.history == []


def test_wrong_train_dataloader_is_a_clear_error(data):
    train = DataLoader([{"input_ids": torch.zeros(16, dtype=torch.long), "labels": torch.zeros(16, dtype=torch.long),
                         "domain": 0, "sample_id": 0}] * 8, batch_size=4)
    callback = DynamicLoadingCallback(DOMAINS, rule="constant")
    trainer = Trainer(model=TinyLM.build(DOMAINS), train_dataloader=train, max_duration="1ba", callbacks=[callback],
                      device="cpu", progress_bar=False, log_to_console=False)
    with pytest.raises(TypeError, match="needs the train dataloader of llmshear.datasets.dynamic"):
        trainer.fit()
