"""llmshear: targeted structured pruning and continued pre-training of LLaMA-family models."""
