"""Global gradient-norm clipping (llmshear.callbacks.clipping)."""

import pytest
import torch
from composer.core import State
from composer.devices import DeviceCPU
from composer.loggers import Logger

from llmshear.callbacks.clipping import ClipGradNorm, global_grad_norm


def _state_with_grads(scale: float) -> State:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    generator = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator) * scale
    model[1].bias.grad = None  # a parameter without a gradient is left alone
    return State(model=model, rank_zero_seed=0, run_name="t", device=DeviceCPU(), max_duration="1ba")


@pytest.mark.parametrize("scale", [0.01, 10.0])
def test_clips_like_torch_and_only_above_the_threshold(scale):
    state, reference = _state_with_grads(scale), _state_with_grads(scale)
    grads = [p.grad for p in state.model.parameters() if p.grad is not None]
    norm = global_grad_norm(grads)
    assert norm == pytest.approx(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item())
    ClipGradNorm(1.0).after_train_batch(state, Logger(state, []))
    torch.nn.utils.clip_grad_norm_([p for p in reference.model.parameters() if p.grad is not None], max_norm=1.0)
    for ours, theirs in zip(state.model.parameters(), reference.model.parameters(), strict=True):
        if ours.grad is None:
            assert theirs.grad is None
        else:
            torch.testing.assert_close(ours.grad, theirs.grad)
    after = global_grad_norm(p.grad for p in state.model.parameters() if p.grad is not None)
    assert after == pytest.approx(min(norm, 1.0), rel=1e-4)


def test_non_positive_threshold_is_refused():
    with pytest.raises(ValueError, match="optimizer.clip_norm"):
        ClipGradNorm(0.0)
