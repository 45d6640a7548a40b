"""Build the ``demo_continuation`` task: pick a passage's true continuation among four, from held-out demo text.

Every item is a passage of a document the demo never trains on, and four continuations: the passage's own
next characters and the continuations of three other items of the same domain. A model that reads the
passage should prefer its own continuation; a model that ignores it is right a quarter of the time.

Held out means: the demo corpus (:func:`llmshear.tools.demo.make_demo_corpus` with ``scripts/demo.sh``'s
``--max-chars``) takes each domain's documents in order until ``max_chars`` characters; items are drawn only
from documents that start after ``skip_chars`` characters (a multiple of the demo's cut, so that a change in
the set of installed packages, which moves the ``readme`` domain's cut, cannot bring an item's document into
the training text). The ``docs`` domain (the reference manual, 0.47M characters) is read whole by the demo,
so it has no held-out documents and no items.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

PASSAGE_CHARS = 200  # at most, ending at a line end and starting at a line start
CONTINUATION_CHARS = 64  # at most, ending before a whitespace character
MIN_PASSAGE_ALNUM = 60
MIN_CONTINUATION_ALNUM = 24
CHOICES = 4


@dataclass(frozen=True)
class Window:
    """One candidate item: a passage and the text that follows it in its document."""

    domain: str
    source: str
    passage: str
    continuation: str


def held_out(documents: Iterable[tuple[str, str]], skip_chars: int) -> Iterator[tuple[str, str]]:
    """The ``(source, text)`` documents that start after the first ``skip_chars`` characters of the stream.

    ``make_demo_corpus`` keeps a document while the characters before it are fewer than its ``max_chars``, so
    with ``skip_chars >= max_chars`` none of these documents is in the demo corpus.
    """
    chars = 0
    for source, text in documents:
        if chars >= skip_chars:
            yield source, text
        chars += len(text)


def _alnum(text: str) -> int:
    return sum(ch.isalnum() for ch in text)


def windows(text: str) -> Iterator[tuple[str, str]]:
    """Non-overlapping ``(passage, continuation)`` pairs of one document, in order.

    A passage is whole lines (at most :data:`PASSAGE_CHARS`, ending with its newline); its continuation is
    the next :data:`CONTINUATION_CHARS` characters cut back to the last whitespace, so no option ends inside
    a word. Pairs with too little text (blank lines, rules, tables of symbols) are skipped.
    """
    start = 0
    while start + PASSAGE_CHARS + CONTINUATION_CHARS <= len(text):
        cut = text.rfind("\n", start, start + PASSAGE_CHARS) + 1
        if cut <= start:  # one line longer than a passage: move on to the next line
            start = text.find("\n", start + PASSAGE_CHARS) + 1 or len(text)
            continue
        raw = text[cut:cut + CONTINUATION_CHARS + 1]
        end = max(raw.rfind(" "), raw.rfind("\n"), raw.rfind("\t"))
        passage, continuation = text[start:cut], raw[:end] if end > 0 else ""
        if _alnum(passage) >= MIN_PASSAGE_ALNUM and _alnum(continuation) >= MIN_CONTINUATION_ALNUM:
            yield passage, continuation
        start = cut + len(continuation)
        start = text.find("\n", start) + 1 or len(text)  # the next passage starts at a line start


def _pick_windows(domain: str, documents: list[tuple[str, str]], count: int, rng: random.Random) -> list[Window]:
    """``count`` windows of distinct continuations, one per document per round over the shuffled documents."""
    pools = []
    for source, text in documents:
        candidates = list(windows(text))
        rng.shuffle(candidates)
        if candidates:
            pools.append((source, candidates))
    rng.shuffle(pools)
    picked, seen = [], set()
    while len(picked) < count and any(candidates for _, candidates in pools):
        for source, candidates in pools:
            while candidates:
                passage, continuation = candidates.pop()
                key = " ".join(continuation.split())
                if key not in seen:
                    seen.add(key)
                    picked.append(Window(domain, source, passage, continuation))
                    break
            if len(picked) == count:
                break
    if len(picked) < count:
        raise ValueError(f"domain {domain!r}: only {len(picked)} distinct passages in its held-out documents, "
                         f"{count} asked for")
    return picked


def _items(picked: list[Window], rng: random.Random) -> list[dict]:
    """Multiple-choice items: each window's continuation among three others of the same domain."""
    items = []
    for index, window in enumerate(picked):
        others = [w.continuation for j, w in enumerate(picked) if j != index]
        choices = rng.sample(others, CHOICES - 1)
        gold = rng.randrange(CHOICES)
        choices.insert(gold, window.continuation)
        items.append({"domain": window.domain, "source": window.source, "passage": window.passage,
                      "choices": choices, "gold": gold})
    return items


def build_items(domains: dict[str, Callable[[], Iterable[tuple[str, str]]]], per_domain: int, skip_chars: int,
                seed: int = 0) -> list[dict]:
    """The task's items, domains interleaved (so the first ``n`` items of ``--limit n`` cover every domain).

    Args:
        domains: ``{domain: callable yielding (source, text)}``, e.g. :data:`llmshear.tools.demo.DOMAINS`.
        per_domain: items per domain (domains with no held-out document are left out).
        skip_chars: characters of each domain's stream that the items never come from.
        seed: the only source of randomness (passages, distractors, position of the answer).

    Returns:
        ``[{"id", "domain", "source", "passage", "choices", "gold"}]``.

    Raises:
        ValueError: ``per_domain`` below ``CHOICES``, or a domain with too few distinct passages.
    """
    if per_domain < CHOICES:
        raise ValueError(f"--per-domain {per_domain}: must be at least {CHOICES}")
    rng = random.Random(seed)
    per = []
    for domain, documents in domains.items():
        kept = list(held_out(documents(), skip_chars))
        if kept:
            per.append(_items(_pick_windows(domain, kept, per_domain, rng), rng))
    items = [item for group in zip(*per, strict=True) for item in group]
    return [{"id": i, **item} for i, item in enumerate(items)]


def write_items(items: list[dict], path: str | Path) -> None:
    """One JSON object a line (UTF-8), in order."""
    Path(path).write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
