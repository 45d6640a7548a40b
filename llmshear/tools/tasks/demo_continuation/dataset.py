"""The items of ``demo_continuation``, read from the JSON-lines file next to this module (no network)."""

from pathlib import Path

ITEMS = Path(__file__).resolve().parent / "items.jsonl"


def load(**_lm_eval_metadata):
    """``DatasetDict`` with one ``test`` split; lm-eval passes its task metadata as keyword arguments (unused)."""
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(ITEMS)})
