"""Data: JSONL files, chat templates, tokenized examples, collators (imports only config and below)."""
