"""Tasks: one record per task type (sft, pretrain, dpo) and the registry the runner reads."""
