"""Shared data fixtures: a tiny byte-level tokenizer (built offline), a tiny jsonl corpus, tiny MDS shards.

Import them into a test module with ``from data_fixtures import ...`` (pytest puts tests/ on ``sys.path``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
REDPAJAMA = REPO.parent / "shared" / "data" / "redpajama_sample"
EOS = "<eos>"

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega def return import class self while for if else print value").split()


def make_text(rng: np.random.Generator, words: int) -> str:
    """A pseudo-sentence of ``words`` words, with some punctuation and non-ASCII characters."""
    picked = rng.choice(WORDS, size=words)
    return " ".join(picked) + rng.choice([".", "!", " — é ü 漢字.", "\n"])


def build_tokenizer(directory: Path) -> Path:
    """Train a 300-token byte-level BPE on generated text and save it as an HF tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = np.random.default_rng(0)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((make_text(rng, 12) for _ in range(500)), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, clean_up_tokenization_spaces=False) \
        .save_pretrained(directory)
    return directory


def write_corpus(root: Path, domains: dict[str, int], docs_per_file: int = 20, seed: int = 0) -> dict[str, list[str]]:
    """Write ``root/<domain>/part-N.jsonl`` with ``domains[name]`` documents each; return the texts in order."""
    rng = np.random.default_rng(seed)
    texts = {}
    for name, count in domains.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        texts[name] = [make_text(rng, int(rng.integers(3, 40))) for _ in range(count)]
        for part, start in enumerate(range(0, count, docs_per_file)):
            lines = [json.dumps({"text": t, "meta": {"i": start + i}})
                     for i, t in enumerate(texts[name][start:start + docs_per_file])]
            (root / name / f"part-{part:02d}.jsonl").write_text("\n".join(lines) + "\n")
    return texts


def write_shards(directory: Path, sequences: np.ndarray, dtype: str = "uint16", size_limit: int | None = None) -> None:
    """Write ``sequences`` ``(n, seq_len)`` as an MDS directory with one ``tokens`` column."""
    from streaming import MDSWriter

    columns = {"tokens": f"ndarray:{dtype}:{sequences.shape[1]}"}
    kwargs = {"size_limit": size_limit} if size_limit else {}
    with MDSWriter(out=str(directory), columns=columns, compression=None, **kwargs) as writer:
        for row in sequences:
            writer.write({"tokens": row.astype(dtype)})


def numbered_shards(root: Path, sizes: dict[str, int], seq_len: int = 8, split: str = "train") -> list[Path]:
    """Per-domain MDS dirs whose sample j of domain d holds ``d * 1000 + j`` everywhere (easy to identify)."""
    dirs = []
    for d, (name, n) in enumerate(sizes.items()):
        rows = np.repeat((d * 1000 + np.arange(n))[:, None], seq_len, axis=1)
        write_shards(root / split / name, rows, size_limit=1 << 10)
        dirs.append(root / split / name)
    return dirs


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """An HF tokenizer directory (byte-level BPE, 300 tokens, EOS ``<eos>``), built once per session."""
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def random_shards(root: Path, sizes: dict[str, int], seq_len: int = 16, vocab: int = 64, split: str = "train",
                  seed: int = 0) -> list[Path]:
    """Per-domain MDS dirs of random tokens below ``vocab``; domain d's tokens are biased to differ in loss."""
    rng = np.random.default_rng(seed)
    dirs = []
    for d, (name, n) in enumerate(sizes.items()):
        high = max(2, vocab >> d)  # domain 0 uses the whole vocabulary, later ones fewer tokens: lower loss
        write_shards(root / split / name, rng.integers(0, high, size=(n, seq_len)), size_limit=1 << 12)
        dirs.append(root / split / name)
    return dirs


class TinyLM:
    """Factory of a minimal Composer language model honouring the batch and metric contract of the project."""

    @staticmethod
    def build(domains: list[str], vocab: int = 64, seed: int = 0):
        import torch
        from composer.metrics.nlp import LanguageCrossEntropy
        from composer.models import ComposerModel

        from llmshear.metrics import DomainMetric, build_domain_metrics

        class _Model(ComposerModel):
            def __init__(self):
                super().__init__()
                torch.manual_seed(seed)
                self.net = torch.nn.Sequential(torch.nn.Embedding(vocab, 16), torch.nn.Linear(16, vocab))
                self.train_metrics = {"LanguageCrossEntropy": LanguageCrossEntropy()}
                self.eval_metrics = {"LanguageCrossEntropy": LanguageCrossEntropy(), **build_domain_metrics(domains)}

            def forward(self, batch):
                return self.net(batch["input_ids"])

            def loss(self, outputs, batch):
                logits, labels = outputs[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten()
                return torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)

            def eval_forward(self, batch, outputs=None):
                return outputs if outputs is not None else self.forward(batch)

            def get_metrics(self, is_train=False):
                return self.train_metrics if is_train else self.eval_metrics

            def update_metric(self, batch, outputs, metric):
                logits, labels = outputs[:, :-1].contiguous(), batch["labels"][:, 1:].contiguous()
                if isinstance(metric, DomainMetric):
                    metric.update(logits, labels, batch["domain"])
                else:
                    metric.update(logits, labels)

        return _Model()
