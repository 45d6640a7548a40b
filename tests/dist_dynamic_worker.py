"""Worker for the ``composer -n 2`` test: train a tiny model with dynamic loading, dump what this rank saw.

    composer -n 2 tests/dist_dynamic_worker.py DATA_DIR OUT_DIR

Writes ``OUT_DIR/rank<r>.json``: the sample ids of every batch this rank trained on, the dataset's final
proportions and state, and the callback's history.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from composer import Trainer
from composer.core import Callback
from composer.utils import dist
from data_fixtures import TinyLM

from llmshear.callbacks.dynamic_loading import DynamicLoadingCallback
from llmshear.datasets.dynamic import build_eval_dataloader, build_train_dataloader

DOMAINS = ["a", "b", "c"]


class SampleRecorder(Callback):
    """Keeps the sample ids of every training batch."""

    def __init__(self):
        self.ids: list[list[int]] = []

    def after_dataloader(self, state, logger):
        self.ids.append(state.batch["sample_id"].tolist())


def main(data: Path, out: Path) -> None:
    dist.initialize_dist("cpu")
    train = build_train_dataloader([data / "train" / d for d in DOMAINS], DOMAINS, [0.6, 0.3, 0.1], batch_size=4,
                                   seq_len=16, seed=5)
    evaluation = build_eval_dataloader([data / "eval" / d for d in DOMAINS], DOMAINS, batch_size=3, seq_len=16)
    callback = DynamicLoadingCallback(DOMAINS, rule="doremi", reference_losses=[3.0, 2.0, 1.0])
    recorder = SampleRecorder()
    trainer = Trainer(model=TinyLM.build(DOMAINS), train_dataloader=train, eval_dataloader=evaluation,
                      eval_interval="2ba", max_duration="4ba", callbacks=[callback, recorder], device="cpu",
                      progress_bar=False, log_to_console=False, seed=5)
    trainer.fit()
    rank = dist.get_global_rank()
    dataset = train.dataset
    result = {"ids": recorder.ids, "proportions": dataset.proportions, "state": dataset.state_dict(),
              "history": callback.history}
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
