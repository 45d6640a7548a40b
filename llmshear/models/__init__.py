"""LLaMA-family model, L0 masks, cutting and Hugging Face conversion."""
