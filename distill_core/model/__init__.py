"""Llama-family decoder in Flax NNX, with Hugging Face checkpoint import/export."""
