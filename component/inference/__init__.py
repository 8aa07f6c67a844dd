"""Inference: generation, adapter merging (and the scripts' services built on them)."""
