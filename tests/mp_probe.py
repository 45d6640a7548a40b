"""Test helper launched by ``composer -n 2``: run train.py's pipeline, then dump this rank's pruning and data state.

    composer -n 2 tests/mp_probe.py RECIPE.yaml [RECIPE.yaml ...]

Runs the recipes one after the other in the same processes (one launch: start-up is the slow part) and
writes, for each, ``<save_folder>/probe-rank<r>.pt`` with the full (unsharded) gate logits, Lagrange multipliers, the
dataset's proportions and what wrapped the model, for the test to compare across ranks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from composer.utils import dist

from llmshear.builders import build_trainer
from llmshear.callbacks.pruning import full_parameters
from llmshear.config import load


def probe(recipe: str) -> None:
    """Fit ``recipe``, then save this rank's view of the gates, multipliers and proportions."""
    cfg = load(recipe)
    trainer = build_trainer(cfg)
    trainer.fit()
    model = trainer.state.model
    wrapper = type(model).__name__
    model = getattr(model, "module", model)
    l0 = {}
    if model.l0 is not None:  # a pruning run
        with full_parameters(model.l0):
            l0 = {name: p.detach().clone() for name, p in [*model.l0.named_parameters(), *model.l0.named_buffers()]}
    dataset = trainer.state.train_dataloader.dataset
    layer = model.model.model.layers[0]
    inner = getattr(layer, "_checkpoint_wrapped_module", layer)
    probe = {"l0": l0, "proportions": dataset.proportions, "wrapper": wrapper, "world_size": dist.get_world_size(),
             "layer_types": [type(layer).__name__, type(inner).__name__]}
    torch.save(probe, Path(cfg.checkpoint.save_folder) / f"probe-rank{dist.get_global_rank()}.pt")
    trainer.close()


if __name__ == "__main__":
    for path in sys.argv[1:]:
        probe(path)
