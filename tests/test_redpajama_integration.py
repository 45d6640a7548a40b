"""RedPajama sample end to end: prepare with the SmolLM2 tokenizer, load dynamically, one proportion update.

Skipped when ``../shared/data/redpajama_sample`` is absent (the ``redpajama_dir`` fixture of conftest.py).
"""

from __future__ import annotations

import math

import pytest
from composer import Trainer
from data_fixtures import TinyLM

from llmshear.callbacks.dynamic_loading import DynamicLoadingCallback
from llmshear.datasets.dynamic import build_eval_dataloader, build_train_dataloader
from llmshear.datasets.mds import prepare

DOMAINS = ["arxiv", "book", "c4-rp", "cc", "github", "stackexchange", "wiki"]
# Sheared-LLaMA's initial RedPajama proportions, in this order
PROPORTIONS = [0.025, 0.045, 0.15, 0.67, 0.045, 0.02, 0.045]
VOCAB = 49152


@pytest.mark.slow
def test_prepare_load_and_update_on_redpajama(redpajama_dir, tmp_path):
    summary = prepare(redpajama_dir, "smollm2", tmp_path / "mds", seq_len=128, eval_seqs=2, workers=2, progress=False)
    assert summary["vocab_size"] == VOCAB and summary["dtype"] == "uint16"
    assert sorted(summary["domains"]) == DOMAINS
    assert summary["bad_lines"] == 0 and not summary["skipped_files"]
    assert all(info["train"]["sequences"] > 10 and info["max_token_id"] < VOCAB for info in summary["domains"].values())

    train = build_train_dataloader([tmp_path / "mds" / "train" / d for d in DOMAINS], DOMAINS, PROPORTIONS,
                                   batch_size=4, seq_len=128, seed=1, rank=0, world_size=1)
    evaluation = build_eval_dataloader([tmp_path / "mds" / "eval" / d for d in DOMAINS], DOMAINS, batch_size=7,
                                       seq_len=128, rank=0, world_size=1)
    batch = next(iter(train))
    assert batch["input_ids"].shape == (4, 128) and int(batch["input_ids"].max()) < VOCAB
    reference = [2.0] * len(DOMAINS)
    callback = DynamicLoadingCallback(DOMAINS, rule="doremi", reference_losses=reference, floor=0.01, cap=0.8)
    trainer = Trainer(model=TinyLM.build(DOMAINS, vocab=VOCAB), train_dataloader=train, eval_dataloader=evaluation,
                      eval_interval="2ba", max_duration="2ba", callbacks=[callback], device="cpu", progress_bar=False,
                      log_to_console=False)
    trainer.fit()
    (update,) = callback.history
    assert all(loss is not None and math.isfinite(loss) for loss in update["losses"])
    assert train.dataset.proportions == update["proportions"] != PROPORTIONS
    assert min(update["proportions"]) >= 0.01 - 1e-12 and max(update["proportions"]) <= 0.8 + 1e-12
