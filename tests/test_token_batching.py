"""Token-budget batches (component/data/batching.py): whole examples up to a budget, each once per
epoch, a batch count that splits evenly over ranks x accumulation, exact resume."""

from __future__ import annotations

import random
import signal

import pytest

from component.data.batching import TokenBudgetSampler, best_fit_decreasing, split_to_count
from component.errors import ConfigError
from component.training.checkpoints import newest_complete
from tests.conftest import base_config
from tests.runs import (
    SAVE_STEPS,
    assert_same_run,
    config_of,
    run_config,
    run_with_fault,
    train_in_process,
    trainer_losses,
)
from tests.runs import train as train_values

TOKENS = {"batching": "tokens", "max_tokens_per_batch": 160}


def test_each_example_once_every_bin_within_budget_and_a_splittable_count():
    rng = random.Random(0)
    lengths = [rng.randint(5, 120) for _ in range(300)]
    sampler = TokenBudgetSampler(lengths, 256, seed=3, multiple_of=4, window=64)
    for epoch in (0, 1):
        batches = sampler.batches(epoch)
        assert sorted(i for b in batches for i in b) == list(range(300))  # each example exactly once
        assert all(sum(lengths[i] for i in b) <= 256 for b in batches)
        assert len(batches) % 4 == 0
        fill = sum(lengths) / (len(batches) * 256)
        assert fill > 0.85, fill  # best-fit-decreasing fills the budget
    assert sampler.batches(0) == TokenBudgetSampler(lengths, 256, seed=3, multiple_of=4, window=64).batches(0)
    # The Trainer sizes every epoch from the first: the same number of batches in each.
    many = TokenBudgetSampler([rng.randint(1, 60) for _ in range(3000)], 64, seed=1, multiple_of=4)
    assert len({len(many.batches(epoch)) for epoch in range(6)}) == 1
    assert sampler.batches(0) != sampler.batches(1)  # a new order each epoch


def test_best_fit_and_splitting():
    assert best_fit_decreasing([0, 1, 2, 3], [6, 5, 4, 1], 10) == [[0, 2], [1, 3]]
    assert split_to_count([[0, 1, 2], [3]], 4) == [[0], [3], [1], [2]]
    with pytest.raises(ValueError, match="exceeds max_tokens_per_batch=10"):
        TokenBudgetSampler([11], 10)


def test_training_with_token_batches_fills_each_row_and_learns(tmp_path, tiny_llama_dir):
    seen = []
    values = base_config(tiny_llama_dir, tmp_path / "out", max_steps=8, **TOKENS)
    trainer = train_values(values)
    curve = trainer_losses(trainer)
    assert sum(curve[-2:]) / 2 < sum(curve[:2]) / 2, curve
    loader = trainer.get_train_dataloader()
    for batch in loader:
        assert batch["input_ids"].shape[0] == 1 and batch["input_ids"].shape[1] <= TOKENS["max_tokens_per_batch"]
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
        assert all(batch["labels"][0, s] == -100 for s in starts)  # no label crosses an example boundary
        seen.append(len(starts))
    assert max(seen) > 2  # several whole examples per row
    assert sum(seen) == len(trainer.train_dataset)  # each example once per epoch


def test_kill9_then_resume_mid_epoch_matches_the_uninterrupted_run(tmp_path, tiny_llama_dir):
    reference = tmp_path / "reference"
    train_in_process(run_config(tmp_path, tiny_llama_dir, reference, name="ref.json", **TOKENS))
    out = tmp_path / "out"
    config = run_config(tmp_path, tiny_llama_dir, out, **TOKENS)
    killed = run_with_fault("kill", SAVE_STEPS + 2, config)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert newest_complete(out).path.name == f"checkpoint-{SAVE_STEPS}"
    train_in_process(config, "--resume_from_checkpoint", "true")
    assert_same_run(reference, out, resumed_from=SAVE_STEPS)


def test_token_batching_keys_are_checked(tmp_path, tiny_llama_dir):
    with pytest.raises(ConfigError, match="needs a budget of at least max_seq_length"):
        config_of(base_config(tiny_llama_dir, tmp_path / "o", batching="tokens", max_tokens_per_batch=16))
    with pytest.raises(ConfigError, match="'tokenz' is not one of examples, tokens"):
        config_of(base_config(tiny_llama_dir, tmp_path / "o", batching="tokenz"))
    with pytest.raises(ConfigError, match="does not take here"):
        train_values(base_config(tiny_llama_dir, tmp_path / "o", padding_free=False, max_steps=1, **TOKENS))


@pytest.mark.parametrize("task_type", ["dpo", "orpo", "simpo", "kto", "rm", "grpo", "pretrain"])
def test_token_batching_refused_for_tasks_that_would_ignore_it(tmp_path, tiny_llama_dir, task_type):
    values = base_config(tiny_llama_dir, tmp_path / "o", task_type=task_type, **TOKENS)
    with pytest.raises(ConfigError) as caught:
        config_of(values)
    message = str(caught.value)
    assert f"key 'batching': token-budget batches are built for task_type 'sft' only, not '{task_type}'" in message
    assert "key 'max_tokens_per_batch'" in message
    assert not (tmp_path / "o").exists()


def test_the_sampler_epoch_follows_the_trainer_even_when_resumed():
    """transformers cannot reach the sampler through a resume's skip wrapper: a callback sets the epoch."""
    from types import SimpleNamespace

    from component.training.trainer import SamplerEpoch

    sampler = TokenBudgetSampler([5] * 20, 16, multiple_of=2)
    callback = SamplerEpoch(sampler)
    # mid-epoch on resume (1.5), and an epoch start that float sums left a hair below 2
    for state_epoch, expected in ((0.0, 0), (1.5, 1), (2.0 - 1e-9, 2)):
        callback.on_epoch_begin(None, SimpleNamespace(epoch=state_epoch), None)
        assert sampler.epoch == expected, state_epoch


def test_too_few_examples_for_the_ranks_and_accumulation_are_refused(tmp_path, tiny_llama_dir):
    values = base_config(tiny_llama_dir, tmp_path / "o", max_steps=1, gradient_accumulation_steps=64, **TOKENS)
    with pytest.raises(ConfigError, match="needs at least ranks x gradient_accumulation_steps"):
        train_values(values)


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lean", [True, False])
def test_token_budget_batches_equal_the_examples_one_by_one_summed_by_token(lean):
    """The sampler's micro-batches (one padding-free row each), their losses normalised by the step's supervised
    tokens and their gradients accumulated, give the loss and gradients of the same examples one at a time,
    summed by token, and of one large batch of them all: nothing leaks across an example boundary, and every
    token weighs the same whatever micro-batch it is in."""
    import torch

    from component.data.collator import PaddingFreeCollator
    from component.model.attention import SEGMENT_SDPA, register_attention
    from component.training.loss import find_head_parts, lean_causal_lm_loss
    from tests.test_padding_free import examples
    from tests.tiny import tiny_model, tiny_tokenizer

    register_attention()
    tok = tiny_tokenizer()
    model = tiny_model("llama", tokenizer=tok)
    model.config.use_cache = False
    model.config._attn_implementation = SEGMENT_SDPA
    parts = find_head_parts(model)
    data = examples(len(tok), lengths=(7, 12, 5, 9, 30, 3, 17, 11, 8, 21))
    bins = list(TokenBudgetSampler([len(e["input_ids"]) for e in data], max_tokens=40, seed=3, multiple_of=2))
    assert len(bins) >= 3 and sorted(i for b in bins for i in b) == list(range(len(data)))
    assert all(sum(len(data[i]["input_ids"]) for i in b) <= 40 for b in bins)
    supervised = sum(sum(label != -100 for label in e["labels"][1:]) for e in data)
    collate = PaddingFreeCollator()

    def loss_of(batch):
        if lean:
            return lean_causal_lm_loss(model, parts, batch, num_items_in_batch=supervised)
        inputs = {k: v for k, v in batch.items() if k != "label_rows"}
        logits = model(**inputs).logits[0, :-1]
        return torch.nn.functional.cross_entropy(logits, inputs["labels"][0, 1:], reduction="sum") / supervised

    model.zero_grad()
    packed = 0.0
    for b in bins:  # the accumulated micro-batches of one optimizer step
        loss = loss_of(collate([data[i] for i in b]))
        loss.backward()
        packed += loss.item()
    packed_grads = _grads(model)
    model.zero_grad()
    alone = 0.0
    for example in data:
        loss = loss_of(collate([example]))
        loss.backward()
        alone += loss.item()
    alone_grads = _grads(model)
    model.zero_grad()
    large = loss_of(collate(data))  # one large batch of the same examples: no accumulation
    large.backward()
    large_grads = _grads(model)
    assert packed == pytest.approx(alone, rel=1e-5) and large.item() == pytest.approx(alone, rel=1e-5)
    assert packed_grads.keys() == alone_grads.keys() == large_grads.keys() and packed_grads
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, alone_grads[name], atol=1e-6, rtol=1e-4, msg=name)
        torch.testing.assert_close(grad, large_grads[name], atol=1e-6, rtol=1e-4, msg=name)
