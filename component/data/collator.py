"""Batch collation for SFT: right padding, or one padding-free row.

`PaddingCollator` pads input ids with the tokenizer's pad id and labels with
IGNORE_INDEX; `attention_mask` marks the real tokens.

`PaddingFreeCollator` concatenates the examples into one row: no padding
token is computed. `position_ids` restart at 0 for every example, and the
first label of every example is IGNORE_INDEX so that no example learns to
predict the next one's first token (exactly the targets a padded batch has).
`cu_seq_lens_*` / `max_length_*` carry the boundaries in the form
flash-attention's varlen path takes; transformers forwards them to the
attention function (component/model/attention.py). `label_rows` lists the
positions that predict a label, for the lean loss (component/training/loss.py).
All three are made here, on the host, so that a GPU step never reads a length or
a count back from the device (tests/test_sync_free.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from component.data.template import IGNORE_INDEX

LABEL_ROWS = "label_rows"
"""A padding-free batch's key, not a model input: the positions t of the row whose label t + 1 is trained. The lean
loss gathers their hidden states with it instead of a boolean mask, whose size the GPU would have to report back."""


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


# Ours stays over transformers' DataCollatorWithFlattening(return_flash_attn_kwargs=True): the batches are
# identical (tests/test_library_parity.py), but it collates ~15% slower (0.47 vs 0.41 s per 1000 batches of 8).
@dataclass
class PaddingFreeCollator:
    """Concatenates a batch of {input_ids, labels} into one row without padding.

    The batch keeps `per_device_train_batch_size` examples, so gradient
    accumulation and `num_items_in_batch` mean the same as with padding.
    """

    def __call__(self, features: list[dict]) -> dict:
        ids, labels, positions, lengths = [], [], [], []
        for f in features:
            n = len(f["input_ids"])
            ids.extend(f["input_ids"])
            example_labels = list(f["labels"])
            example_labels[0] = IGNORE_INDEX  # never a target: it would be predicted from the previous example
            labels.extend(example_labels)
            positions.extend(range(n))
            lengths.append(n)
        cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        label_rows = [t for t, label in enumerate(labels[1:]) if label != IGNORE_INDEX]
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": max(lengths),
            "max_length_k": max(lengths),
            LABEL_ROWS: torch.tensor(label_rows, dtype=torch.long),
        }
