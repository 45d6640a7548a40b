"""The pruning callback: schedule from Composer's clock, logged sparsities and λ, masks saved at evaluation."""

import json

import pytest
import torch
import torch.distributed as torch_dist
from composer.core import State, Time
from composer.devices import DeviceCPU
from composer.loggers import Logger, LoggerDestination

from llmshear.callbacks.pruning import PruningCallback, save_masks, unwrap_l0
from llmshear.models.composer_llama import ComposerLlama, model_flops
from llmshear.models.hf import build_model, load_config
from llmshear.models.l0 import STRUCTURES, L0Module, TargetShape

TARGET = {"d_model": 64, "n_layers": 3, "n_heads": 2, "n_kv_heads": 1, "intermediate_size": 96}


class Recorder(LoggerDestination):
    def __init__(self):
        self.metrics = {}

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)


def make_state(warmup: int = 10, harden_batch: int | None = None) -> State:
    source = load_config("tiny-gqa")
    l0 = L0Module(source, TargetShape.from_dict(TARGET, source), lagrangian_warmup=warmup, harden_batch=harden_batch,
                  constraint="row")
    model = ComposerLlama(build_model(source, seed=0), l0=l0)
    return State(model=model, rank_zero_seed=0, run_name="t", device=DeviceCPU(), max_duration="20ba")


def at_batch(state: State, batch: int) -> None:
    state.timestamp = state.timestamp.copy(batch=Time(batch, "ba"))


def test_batch_start_feeds_the_schedule():
    state = make_state(warmup=10)
    callback, logger = PruningCallback(None), Logger(state, [])
    at_batch(state, 5)
    callback.batch_start(state, logger)
    assert state.model.l0.step.item() == 5
    final = {s.name: s.final_sparsity for s in state.model.l0.specs}
    assert state.model.l0.target_sparsity() == pytest.approx({n: 0.5 * f for n, f in final.items()})


def test_batch_end_logs_every_structure():
    state = make_state()
    recorder = Recorder()
    callback, logger = PruningCallback(None), Logger(state, [recorder])
    at_batch(state, 4)
    state.batch = {"input_ids": torch.zeros(2, 8, dtype=torch.long)}
    callback.batch_start(state, logger)
    with torch.no_grad():
        state.model.l0.lagrangian.lambda1["layer"].fill_(-0.25)
    callback.batch_end(state, logger)
    m = recorder.metrics
    assert m["l0/batch_flops"] == model_flops(state.model.model.cfg, 2, 8)  # dense: the source's shape
    assert set(STRUCTURES) == {s.name for s in state.model.l0.specs}
    for name in STRUCTURES:
        for kind in ("expected_sparsity", "target_sparsity", "max_row_gap", "lambda1", "lambda2", "undecided"):
            assert f"l0/{name}/{kind}" in m
    assert m["l0/layer/lambda1"] == -0.25
    assert m["l0/layer/target_sparsity"] == pytest.approx(0.4 * 0.25)  # 1 of 4 layers, 4/10 of the ramp
    assert 0 < m["l0/expected_params"] <= state.model.model.num_params()


def test_eval_end_saves_masks_and_shape_without_overwriting(tmp_path):
    state = make_state()
    callback, logger = PruningCallback(tmp_path), Logger(state, [])
    at_batch(state, 7)
    callback.eval_end(state, logger)
    masks = torch.load(tmp_path / "masks" / "ba7.pt")
    summary = json.loads((tmp_path / "masks" / "ba7.json").read_text())
    assert summary["shape"] == summary["target"] == TARGET
    assert summary["batch"] == 7 and summary["hardened"] is False
    assert set(summary["cut_report"]) == set(STRUCTURES)
    assert masks["layer"].count_nonzero() == 3 and masks["head"].shape == (4, 2, 4)
    first = (tmp_path / "masks" / "ba7.pt").read_bytes()
    with torch.no_grad():
        state.model.l0.log_alpha["layer"].copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    callback.eval_end(state, logger)  # the same batch evaluated again (a resumed run)
    assert (tmp_path / "masks" / "ba7.pt").read_bytes() == first
    again = torch.load(tmp_path / "masks" / "ba7-1.pt")
    assert again["layer"].nonzero().flatten().tolist() == [1, 2, 3]
    assert (tmp_path / "masks" / "ba7-1.json").is_file()


def test_batch_start_hardens_at_its_batch_and_logs_the_gates_there():
    state, recorder = make_state(warmup=2, harden_batch=3), Recorder()
    callback, logger = PruningCallback(None), Logger(state, [recorder])
    for batch in range(3):
        at_batch(state, batch)
        callback.batch_start(state, logger)
        assert not state.model.l0.is_hardened()
    assert state.model.l0.usage_batches.item() == 1  # batch 2: the ramp reached the target, not yet frozen
    assert not any(key.startswith("l0/freeze/") for key in recorder.metrics)
    with torch.no_grad():  # layers 0 and 1 decided open, 2 and 3 undecided
        state.model.l0.log_alpha["layer"].copy_(torch.tensor([8.0, 8.0, 0.1, 0.0]))
    at_batch(state, 3)
    callback.batch_start(state, logger)
    assert state.model.l0.is_hardened() and state.model.l0.usage_batches.item() == 1
    report = state.model.l0.cut_report()
    assert {key: value for key, value in recorder.metrics.items() if key.startswith("l0/freeze/")} == {
        f"l0/freeze/{name}/{key}": report[name][key] for name in report for key in ("decided", "undecided")}
    assert recorder.metrics["l0/freeze/layer/undecided"] == 0.5  # two of the four gates
    masks = state.model.l0.train()()
    assert all(((m == 0) | (m == 1)).all() for m in masks.values())


def test_the_freeze_keeps_the_undecided_layers_under_which_the_batch_has_the_lowest_loss():
    state, recorder = make_state(warmup=2, harden_batch=3), Recorder()
    callback, logger = PruningCallback(None, layer_candidates=8), Logger(state, [recorder])
    l0, model = state.model.l0, state.model
    ids = torch.randint(0, model.model.cfg.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    state.batch = {"input_ids": ids, "labels": ids.clone()}
    state.device_train_microbatch_size = 2
    with torch.no_grad():  # layer 0 decided open, 1-3 undecided for the two places left: three cuts
        l0.log_alpha["layer"].copy_(torch.tensor([8.0, 0.5, 0.4, 0.3]))
    at_batch(state, 3)
    callback.batch_start(state, logger)
    callback.batch_end(state, logger)
    cfg = model.model.cfg  # three forwards of the four sequences join the step's FLOPs
    assert recorder.metrics["l0/batch_flops"] == model_flops(cfg, 4, 16) + 3 * model_flops(cfg, 4, 16, backward=False)
    chosen = l0.hard_masks()["layer"].clone()
    l0.harden()  # the ranking's cut again, to list the candidates
    candidates = l0.layer_candidates(8)
    assert len(candidates) == 3
    losses = []
    for mask in candidates:
        l0.freeze_layers(mask)
        total, tokens = model.forward_loss(state.batch, 4)
        losses.append(total / tokens)
    assert len(set(losses)) == 3  # the comparison has something to tell
    best = min(range(3), key=losses.__getitem__)
    assert torch.equal(chosen, candidates[best])
    assert recorder.metrics["l0/layer_choice/candidates"] == 3 and recorder.metrics["l0/layer_choice/rank"] == best
    assert recorder.metrics["l0/layer_choice/gain"] == pytest.approx(losses[0] - losses[best], abs=1e-6)
    l0.freeze_layers(chosen)
    at_batch(state, 4)
    callback.batch_start(state, logger)  # frozen: nothing is compared again, and this batch counts no forwards
    assert torch.equal(l0.hard_masks()["layer"], chosen)
    callback.batch_end(state, logger)
    assert recorder.metrics["l0/batch_flops"] == model_flops(cfg, 4, 16)


def test_evaluators_measure_the_current_model_or_the_target_cut(tmp_path):
    state = make_state()
    l0 = state.model.l0.eval()
    with torch.no_grad():
        l0.log_alpha["layer"].copy_(torch.tensor([4.0, 1.0, 0.5, -4.0]))
    callback, logger = PruningCallback(tmp_path, target_label="eval_target"), Logger(state, [])
    state.set_dataloader([], "eval")
    callback.eval_start(state, logger)
    assert l0()["layer"].count_nonzero() == 3 and l0()["layer"][1] < 1  # the current model: soft gates
    at_batch(state, 5)
    callback.eval_end(state, logger)
    state.set_dataloader([], "eval_target")
    callback.eval_start(state, logger)
    assert l0()["layer"].count_nonzero() == 3 and torch.equal(l0()["layer"], l0.deterministic_masks()["layer"])
    callback.eval_end(state, logger)
    assert l0.eval_kind == "current"  # back to the run's setting after the target evaluation
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["ba5.json", "ba5.pt"]  # saved once


def test_save_masks_never_replaces_a_file(tmp_path):
    (tmp_path / "ba1.json").write_text("mine")
    path = save_masks(tmp_path, "ba1", {"layer": torch.ones(2)}, {"batch": 1})
    assert path.name == "ba1-1.pt"
    assert (tmp_path / "ba1.json").read_text() == "mine"


def test_unwraps_ddp_and_refuses_a_model_without_l0(tmp_path):
    state = make_state()
    mine = not torch_dist.is_initialized()  # an in-process run earlier in the session may have set one up
    if mine:
        torch_dist.init_process_group("gloo", store=torch_dist.HashStore(), rank=0, world_size=1)
    try:
        l0 = state.model.l0
        state.model = torch.nn.parallel.DistributedDataParallel(state.model)
        assert unwrap_l0(state) is l0
    finally:
        if mine:
            torch_dist.destroy_process_group()
    state.model = ComposerLlama(build_model(load_config("tiny-gqa"), seed=0))
    with pytest.raises(ValueError, match="pruning.target"):
        unwrap_l0(state)
