"""Training: the trainer and its hooks, loss, safety, checkpoints, report, distributed set-up, logs."""
