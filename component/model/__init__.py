"""Models: loading, model-type data, quantization, attention (imports data, config and below)."""
