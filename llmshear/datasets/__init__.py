"""Domain data: jsonl → MDS shards (``mds``), dynamic per-domain loading (``dynamic``), proportion rules."""
