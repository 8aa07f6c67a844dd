"""NEFTune scaled by each example's own length (component/training/neftune.py), in padded and
padding-free batches alike; no noise in evaluation; transformers' own hook never attached."""

from __future__ import annotations

import pytest
import torch

from component.data.collator import PaddingCollator, PaddingFreeCollator
from component.errors import ConfigError
from component.training.neftune import PerExampleNEFTune, example_lengths
from tests.conftest import base_config
from tests.runs import config_of, trainer_losses
from tests.runs import train as train_values

ALPHA, WIDTH = 5.0, 512
EXAMPLES = [
    {"input_ids": list(range(1, 8)), "labels": list(range(1, 8))},
    {"input_ids": [3, 4, 5], "labels": [3, 4, 5]},
]


def noise_of(batch: dict, training: bool = True) -> torch.Tensor:
    """What the hook adds to a zero embedding output of width WIDTH."""
    neftune = PerExampleNEFTune(ALPHA)
    embedding = torch.nn.Embedding(16, WIDTH)
    torch.nn.init.zeros_(embedding.weight)
    embedding.train(training)
    neftune.attach(embedding)
    neftune.observe(batch)
    return embedding(batch["input_ids"]).detach()


def per_example_max(noise: torch.Tensor, batch: dict, padded: bool) -> list[float]:
    if padded:
        return [float(noise[i, : len(e["input_ids"])].abs().max()) for i, e in enumerate(EXAMPLES)]
    starts = [0, len(EXAMPLES[0]["input_ids"])]
    return [float(noise[0, s : s + len(e["input_ids"])].abs().max()) for s, e in zip(starts, EXAMPLES, strict=True)]


def test_padded_and_padding_free_batches_give_each_example_its_own_noise_scale():
    torch.manual_seed(0)
    padded = PaddingCollator(pad_token_id=0)(EXAMPLES)
    free = PaddingFreeCollator()(EXAMPLES)
    assert example_lengths(padded)[1].tolist() == [3, 3, 3, 0, 0, 0, 0]  # padding gets none
    expected = [ALPHA / (len(e["input_ids"]) * WIDTH) ** 0.5 for e in EXAMPLES]
    for batch, is_padded in ((padded, True), (free, False)):
        got = per_example_max(noise_of(batch), batch, is_padded)
        for g, e in zip(got, expected, strict=True):
            assert 0.98 * e < g <= e, (is_padded, got, expected)  # uniform in [-s, s]: the max nears s
    # transformers' hook would scale the packed row by its whole length (10 tokens) for both examples
    assert expected[1] > ALPHA / (10 * WIDTH) ** 0.5 * 1.5
    assert noise_of(padded)[1, 3:].abs().sum() == 0  # the short example's padding


def test_no_noise_in_evaluation():
    batch = PaddingCollator(pad_token_id=0)(EXAMPLES)
    assert noise_of(batch, training=False).abs().sum() == 0


def test_training_with_neftune_uses_ours_not_transformers(tmp_path, tiny_llama_dir):
    plain = trainer_losses(train_values(base_config(tiny_llama_dir, tmp_path / "a", max_steps=3)))
    trainer = train_values(base_config(tiny_llama_dir, tmp_path / "b", max_steps=3, neftune_noise_alpha=ALPHA))
    assert trainer.args.neftune_noise_alpha is None and trainer.neftune is not None
    assert trainer_losses(trainer) != plain  # the noise reached the forward pass
    embedding = trainer.model.get_input_embeddings().train()  # after training: the hook is gone
    ids = torch.tensor([[3, 4, 5]])
    assert torch.equal(embedding(ids), embedding.weight[ids])


def test_neftune_is_checked(tmp_path, tiny_llama_dir):
    with pytest.raises(ConfigError, match="key 'neftune_noise_alpha': must be a positive number"):
        config_of(base_config(tiny_llama_dir, tmp_path / "o", neftune_noise_alpha=-1))
