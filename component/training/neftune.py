"""NEFTune with each example's own length, in padded and padding-free batches alike.

NEFTune (Jain et al., 2023) adds uniform noise in [-s, s] to the input embeddings while training,
s = alpha / sqrt(L * d), L the sequence length and d the embedding width. transformers' hook takes
L from the batch tensor: the padded length, or, in a padding-free batch, the length of the whole
concatenated row, which shrinks every example's noise by the number of examples packed with it.
Here L is each example's own length: the non-padding tokens of its row (attention_mask), or its
segment of a padding-free row (position_ids restart at 0). Padding gets no noise, and evaluation
(the module not in training mode) none at all.

The config key is transformers' own, `neftune_noise_alpha`; training/setup.py keeps it out of
TrainingArguments, so that transformers' hook is never attached next to this one.
"""

from __future__ import annotations

from typing import Optional

import torch

NEFTUNE_KEY = "neftune_noise_alpha"


def example_lengths(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per token, the length of the example it belongs to (0 on padding)."""
    position_ids = inputs.get("position_ids")
    if position_ids is not None and inputs.get("attention_mask") is None:  # padding-free: segments
        starts = position_ids == 0
        segment = starts.cumsum(-1)
        lengths = torch.zeros_like(position_ids)
        for row in range(position_ids.shape[0]):
            # Counts in a tensor of fixed size (not bincount's, whose size a GPU would report back to the host).
            counts = torch.zeros(segment.shape[-1] + 1, dtype=lengths.dtype, device=lengths.device)
            counts.index_add_(0, segment[row], torch.ones_like(segment[row]))
            lengths[row] = counts[segment[row]]
        return lengths
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(inputs["input_ids"])
    return mask * mask.sum(-1, keepdim=True)


class PerExampleNEFTune:
    """A forward hook on the input embedding; `observe(inputs)` before each training forward."""

    def __init__(self, alpha: float):
        self.alpha = alpha
        self.lengths: Optional[torch.Tensor] = None
        self.handle = None

    def attach(self, embedding: torch.nn.Module) -> None:
        self.handle = embedding.register_forward_hook(self.hook)

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def observe(self, inputs: dict[str, torch.Tensor]) -> None:
        self.lengths = example_lengths(inputs)

    def scale(self, width: int) -> torch.Tensor:
        """Per token: alpha / sqrt(L * d), 0 on padding."""
        lengths = self.lengths.float()
        return torch.where(lengths > 0, self.alpha / torch.sqrt(lengths.clamp(min=1) * width), 0.0)

    def hook(self, module: torch.nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        if not module.training or self.lengths is None or self.lengths.shape != output.shape[:2]:
            return output
        scale = self.scale(output.shape[-1]).to(output.device, output.dtype)
        return output + torch.empty_like(output).uniform_(-1, 1) * scale.unsqueeze(-1)
