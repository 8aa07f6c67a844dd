"""Components of the fine-tuning toolkit: config, data, templates, models, training."""
