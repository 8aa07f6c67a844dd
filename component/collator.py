"""Batch collation for SFT: dynamic right padding to the longest example.

Input ids are padded with the tokenizer's pad id, labels with IGNORE_INDEX,
and `attention_mask` marks the real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from component.template import IGNORE_INDEX


@dataclass
class PaddingCollator:
    """Pads a list of {input_ids, labels} to the longest one in the batch."""

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[row, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
