"""Whether prepared data fits a model: its token ids within the model's vocabulary, and (when both are known)
the same tokenizer vocabulary. Reads only ``summary.json`` (written by :func:`llmshear.datasets.mds.prepare`)
and a model directory's ``tokenizer.json``; never a sample or a weight.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

SUMMARY = "summary.json"


def vocab_fingerprint(tokenizer_json: str) -> str | None:
    """SHA-256 of the token → id table of a ``tokenizers`` JSON (None when it has none).

    Only the base vocabulary counts, so the same tokenizer saved by another library version (merges written
    differently, special tokens re-declared) keeps its fingerprint.
    """
    vocab = json.loads(tokenizer_json).get("model", {}).get("vocab")
    if isinstance(vocab, dict):
        items = sorted((int(i), str(t)) for t, i in vocab.items())
    elif isinstance(vocab, list):  # Unigram: [piece, score] in id order
        items = [(i, str(entry[0])) for i, entry in enumerate(vocab)]
    else:
        return None
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


def source_fingerprint(source: str | Path) -> str | None:
    """The vocabulary fingerprint of a model directory's ``tokenizer.json``; None where there is none."""
    path = Path(source) / "tokenizer.json"
    try:
        return vocab_fingerprint(path.read_text()) if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None


def read_summary(root: str | Path) -> tuple[Path, dict] | None:
    """``(path, content)`` of ``root/summary.json``; None when absent or unreadable (data not from prepare_data)."""
    path = Path(root) / SUMMARY
    try:
        content = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None
    return (path, content) if isinstance(content, dict) else None


def vocab_problems(root: str | Path, domains: list[str], model_vocab: int, source: str) -> list[str]:
    """Why the data under ``root`` (``summary.json`` there) does not fit model ``source`` of ``model_vocab`` ids.

    A domain whose largest token id is not below ``model_vocab`` is named (summaries written before token ids
    were recorded are judged by their ``vocab_size``); a tokenizer vocabulary other than the one in the model
    directory's ``tokenizer.json`` is reported when both are known.
    """
    found = read_summary(root)
    if found is None:
        return []
    path, summary = found
    tokenizer, data_vocab = summary.get("tokenizer"), summary.get("vocab_size")
    origin = f"{path}: tokenized with {tokenizer!r} (vocabulary {data_vocab})"
    fix = "prepare the data with the model's tokenizer (scripts/prepare_data.py --tokenizer)"
    problems = []
    for domain in domains:
        info = summary.get("domains", {}).get(domain, {})
        top = info.get("max_token_id") if isinstance(info, dict) else None
        if isinstance(top, int) and top >= model_vocab:
            problems.append(f"domain {domain!r} holds token ids up to {top}, model {source!r} has a vocabulary of "
                            f"{model_vocab} ({origin}); {fix}")
    recorded = any(isinstance(i, dict) and "max_token_id" in i for i in summary.get("domains", {}).values())
    if not recorded and isinstance(data_vocab, int) and data_vocab > model_vocab:
        problems.append(f"{origin}, larger than model {source!r}'s vocabulary of {model_vocab}; {fix}")
    ours, theirs = summary.get("tokenizer_fingerprint"), source_fingerprint(source)
    if ours and theirs and ours != theirs and str(tokenizer) != str(source):
        problems.append(f"{origin}, whose token table differs from the tokenizer.json of model {source!r}; {fix}")
    return problems


def check_vocab(split_dir: str | Path, domains: list[str], model_vocab: int, source: str, flag: str) -> None:
    """:func:`vocab_problems` for a split directory (``OUT/eval``) as the scripts take it; ``flag`` names the
    script's model option in the message.

    Raises:
        ValueError: every problem, one a line.
    """
    problems = vocab_problems(Path(split_dir).parent, domains, model_vocab, source)
    if problems:
        raise ValueError(f"--data {split_dir} does not fit {flag} {source}:\n  " + "\n  ".join(problems))
