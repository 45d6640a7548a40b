"""Per-domain cross-entropy (llmshear.metrics): exact means, absent domains, ignored tokens."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llmshear.metrics import DomainCrossEntropy, DomainMetric, build_domain_metrics, domain_losses, metric_name


def _batch(seed=0, b=4, t=6, v=11):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, v, generator=g), torch.randint(0, v, (b, t), generator=g)


def test_metric_equals_token_mean_of_its_domain_across_batches():
    metric = DomainCrossEntropy(1, "b")
    tokens_loss, count = 0.0, 0
    for seed, domain in enumerate([torch.tensor([0, 1, 1, 2]), torch.tensor([1, 0, 0, 0])]):
        logits, labels = _batch(seed)
        labels[0, :2] = -100
        metric.update(logits, labels, domain)
        rows = domain == 1
        keep = labels[rows] != -100
        tokens_loss += F.cross_entropy(logits[rows][keep], labels[rows][keep], reduction="sum").item()
        count += int(keep.sum())
    assert math.isclose(float(metric.compute()), tokens_loss / count, rel_tol=1e-6)
    assert int(metric.tokens) == count


def test_absent_from_a_batch_changes_nothing():
    metric = DomainCrossEntropy(2, "c")
    logits, labels = _batch()
    metric.update(logits, labels, torch.tensor([2, 2, 0, 0]))
    before = float(metric.compute())
    metric.update(*_batch(1), torch.tensor([0, 0, 1, 1]))
    assert float(metric.compute()) == before


def test_absent_from_the_whole_evaluation_is_none_never_nan():
    metrics = build_domain_metrics(["a", "b", "c"])
    logits, labels = _batch()
    for metric in metrics.values():
        metric.update(logits, labels, torch.tensor([0, 0, 2, -1]))
    values = {name: metric.compute() for name, metric in metrics.items()}
    assert values[metric_name("b")] is None
    assert all(torch.isfinite(values[metric_name(d)]) for d in ("a", "c"))


def test_only_ignored_tokens_count_as_absent():
    metric = DomainCrossEntropy(0, "a")
    logits, labels = _batch()
    metric.update(logits, torch.full_like(labels, -100), torch.zeros(4, dtype=torch.long))
    assert metric.compute() is None


def test_build_domain_metrics_names_and_indices():
    metrics = build_domain_metrics(["cc", "wiki"])
    assert list(metrics) == ["DomainCrossEntropy/cc", "DomainCrossEntropy/wiki"]
    assert [(m.domain_index, m.domain_name) for m in metrics.values()] == [(0, "cc"), (1, "wiki")]
    assert all(isinstance(m, DomainMetric) for m in metrics.values())


def test_domain_losses_of_a_model_callable():
    vocab = 7
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0))

    def model(input_ids):
        return table[input_ids]

    ids = torch.randint(0, vocab, (3, 5), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": ids, "labels": ids, "domain": torch.tensor([0, 0, 2])}]
    out = domain_losses(model, batches, ["x", "y", "z"])
    expected = F.cross_entropy(table[ids[:2, :-1]].flatten(0, 1), ids[:2, 1:].flatten()).item()
    assert math.isclose(out["losses"][0], expected, rel_tol=1e-6)
    assert out["losses"][1] is None and out["tokens"] == [8, 0, 4]
