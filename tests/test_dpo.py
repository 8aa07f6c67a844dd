"""The DPO task: pair checks, SFT-identical rendering, truncation, training in full/LoRA/QLoRA."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from component.data.preference import Tokens, build_preference_dataset, check_pair, tokenize_pair, truncate_pair
from component.data.template import Message, encode_messages, generation_prompt
from component.data.template_registry import get_template
from component.errors import ConfigError, DataError
from component.runner import run
from component.tasks.dpo import dpo_arguments
from tests.conftest import ROOT, dpo_config, write_config
from tests.runs import load_config, trainer_losses
from tests.tiny import tiny_tokenizer

SAMPLE = ROOT / "data" / "dpo_sample.jsonl"
LN2 = math.log(2)


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def write_lines(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def train_pairs(tmp_path) -> Path:
    """The first 8 pairs of the shipped sample (both line forms)."""
    lines = SAMPLE.read_text().splitlines()[:8]
    return write_lines(tmp_path / "pairs.jsonl", lines)


# ---------------------------------------------------------------- checking


def test_malformed_lines_are_reported_as_file_and_line(tmp_path):
    good = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go."}
    rows = [
        good,
        "{not json",
        {"chosen": msgs(("user", "a"), ("assistant", "b"))},
        {"chosen": msgs(("user", "a"), ("assistant", "b")), "rejected": msgs(("user", "A"), ("assistant", "c"))},
        {"chosen": msgs(("user", "a"), ("assistant", "b")), "rejected": msgs(("user", "a"), ("user", "c"))},
        {"chosen": msgs(("user", "a"), ("assistant", "b")), "rejected": msgs(("user", "a"), ("assistant", "b"))},
        {"chosen": msgs(("user", "a"), ("bot", "b")), "rejected": msgs(("user", "a"), ("assistant", "c"))},
        {
            "chosen": msgs(("user", "a"), ("assistant", "x"), ("assistant", "b")),
            "rejected": msgs(("user", "a"), ("assistant", "x"), ("assistant", "c")),
        },
        {"prompt": "q", "chosen": "", "rejected": "r"},
        {"prompt": "q", "chosen": "c", "rejected": "r", "messages": [{"role": "user", "content": "q"}]},
        {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "c"}], "rejected": "r"},
        {"prompt": "q", "chosen": "c", "rejected": "r", "score": 1, "id": 7},  # ignored keys: a good line
    ]
    path = write_lines(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as err:
        build_preference_dataset(str(path), get_template("chatml"), tiny_tokenizer(), 64, 16)
    message = str(err.value)
    expected = {
        2: "invalid JSON",
        3: "missing key(s) rejected",
        4: "message 0 (user) differs between 'chosen' and 'rejected'",
        5: "'rejected' must end with an assistant message",
        6: "the chosen and rejected replies are identical",
        7: "chosen[1].role: 'bot' is not one of",
        8: "'chosen': message 2 is 'assistant' where 'user' was expected",
        9: "'chosen' must be non-empty text",
        10: "key(s) messages not read by a preference pair",
        11: "'chosen' must be a string or a list of exactly one assistant message",
    }
    for line, what in expected.items():
        assert f"{path}:{line}: {what}" in message, (line, message)
    assert f"{path}:1:" not in message and f"{path}:12:" not in message
    assert "10 invalid lines" in message


# ---------------------------------------------------------------- tokens


def test_pair_tokens_are_exactly_the_sft_rendering():
    tok = tiny_tokenizer()
    template = get_template("chatml")
    history = [
        Message("system", "Be brief."),
        Message("user", "What is two plus two?"),
        Message("assistant", "Four."),
        Message("user", "And two plus three?"),
    ]
    row = {
        "chosen": [m.chat_template_dict() for m in history] + [{"role": "assistant", "content": "Five."}],
        "rejected": [m.chat_template_dict() for m in history] + [{"role": "assistant", "content": "Six."}],
    }
    tokens = tokenize_pair(check_pair(row), template, tok)
    # TRL's forms of the same pair: a message-list prompt, replies as strings or one assistant message.
    prompt = [m.chat_template_dict() for m in history]
    for chosen, rejected in (
        ("Five.", "Six."),
        (
            [{"role": "assistant", "content": "Five."}],
            [{"role": "assistant", "content": [{"type": "text", "text": "Six."}]}],
        ),
    ):
        assert (
            tokenize_pair(check_pair({"prompt": prompt, "chosen": chosen, "rejected": rejected}), template, tok)
            == tokens
        )
    assert tokens.prompt == tok(generation_prompt(template, tok, history), add_special_tokens=False)["input_ids"]
    assert tok.decode(tokens.chosen) == "Five.<|im_end|>"
    assert tok.decode(tokens.rejected) == "Six.<|im_end|>"
    # The SFT encoding of the same conversation: the prompt is its unlabeled head, the reply its labels.
    sft = encode_messages(template, tok, [*history, Message("assistant", "Five.")])
    assert sft.input_ids[: len(tokens.prompt) + len(tokens.chosen)] == tokens.prompt + tokens.chosen
    assert [x for x in sft.labels[len(tokens.prompt) :] if x != -100][: len(tokens.chosen)] == tokens.chosen


def test_string_form_equals_message_form():
    tok = tiny_tokenizer()
    template = get_template("smollm")  # injects its default system prompt in both forms
    a = check_pair({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go."})
    b = check_pair(
        {
            "chosen": msgs(("user", "Hi?"), ("assistant", "Hello.")),
            "rejected": msgs(("user", "Hi?"), ("assistant", "Go.")),
        }
    )
    assert tokenize_pair(a, template, tok) == tokenize_pair(b, template, tok)
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(tokenize_pair(a, template, tok).prompt)


def test_truncation_cuts_the_prompt_from_the_left_then_the_replies_from_the_right():
    prompt, chosen, rejected = list(range(100, 120)), [1, 2, 3, 4, 5, 6], [1, 2, 3, 9]
    assert truncate_pair(Tokens(prompt, chosen, rejected), 30, 8) == (Tokens(prompt, chosen, rejected), False)
    # 20 + 6 > 16: the prompt keeps its last 10 tokens (16 - 6 > max_prompt_length 8); replies fit.
    assert truncate_pair(Tokens(prompt, chosen, rejected), 16, 8) == (Tokens(prompt[-10:], chosen, rejected), True)
    # 12: the prompt stops at max_prompt_length 8, then the replies are cut to the 4 tokens left.
    assert truncate_pair(Tokens(prompt, chosen, rejected), 12, 8) == (Tokens(prompt[-8:], chosen[:4], rejected), True)
    # 11: 3 tokens left and the replies no longer differ: dropped.
    assert truncate_pair(Tokens(prompt, chosen, rejected), 11, 8) == (None, True)


def test_dataset_counts_truncated_and_dropped_pairs(tmp_path):
    same_start = "word " * 30
    path = write_lines(
        tmp_path / "p.jsonl",
        [
            {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go."},
            {"prompt": "Long " * 40, "chosen": "Yes.", "rejected": "No."},
            {"prompt": "Hi?", "chosen": same_start + "good", "rejected": same_start + "bad"},
        ],
    )
    data = build_preference_dataset(str(path), get_template("chatml"), tiny_tokenizer(), 40, 16)
    assert data.summary.pairs == 2 and data.summary.truncated == 2 and data.summary.dropped_after_truncation == 1
    lengths = [
        len(p) + max(len(c), len(r))
        for p, c, r in zip(
            data.dataset["prompt_ids"], data.dataset["chosen_ids"], data.dataset["rejected_ids"], strict=True
        )
    ]
    assert max(lengths) <= 40


# ---------------------------------------------------------------- config


def test_dpo_options_are_checked_and_trl_defaults_follow_our_config(tiny_llama_dir, tmp_path):
    bad = write_config(
        tmp_path / "bad.json",
        **dpo_config(tiny_llama_dir, tmp_path / "o", SAMPLE, dpo_beta=0, dpo_loss_type=["sigmoid", "nope"]),
    )
    with pytest.raises(ConfigError) as err:
        load_config(["--train_args_file", str(bad)])
    assert "key 'dpo_beta': must be positive" in str(err.value)
    assert "key 'dpo_loss_type': unknown ['nope']" in str(err.value)
    cfg = write_config(tmp_path / "c.json", **dpo_config(tiny_llama_dir, tmp_path / "o", SAMPLE, learning_rate=2e-4))
    args = dpo_arguments(load_config(["--train_args_file", str(cfg)]))
    # trl would default to bf16, gradient checkpointing and lr 1e-6.
    assert (args.bf16, args.gradient_checkpointing, args.learning_rate) == (False, False, 2e-4)
    assert (args.beta, args.loss_type, args.max_length, args.logging_steps) == (0.1, ["sigmoid"], 96, 1)


# ---------------------------------------------------------------- training


def _train_and_score(config: dict, tmp_path: Path):
    cfg = write_config(tmp_path / "c.json", **config)
    trainer = run(load_config(["--train_args_file", str(cfg)]))
    logs = [h for h in trainer.state.log_history if "loss" in h]
    scored = trainer.evaluate(trainer.train_dataset)  # the training pairs, after training
    return trainer, logs, scored


def _assert_learned(logs, scored):
    losses = [h["loss"] for h in logs]
    assert abs(losses[0] - LN2) < 0.01, losses  # policy == reference at the first step
    assert sum(losses[-4:]) / 4 < losses[0] - 0.03, losses  # per-batch losses are noisy: a late average
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert key in logs[-1], logs[-1]
    assert scored["eval_rewards/accuracies"] > 0.5, scored
    assert scored["eval_loss"] < LN2 - 0.05 and scored["eval_rewards/margins"] > 0, scored


def test_dpo_full_learns_against_a_frozen_copy(tiny_llama_dir, tmp_path, train_pairs):
    out = tmp_path / "out"
    config = dpo_config(tiny_llama_dir, out, train_pairs, train_mode="full", learning_rate=1e-3)
    trainer, logs, scored = _train_and_score(config, tmp_path)
    _assert_learned(logs, scored)
    ref = trainer.ref_model
    assert ref is not None and ref is not trainer.model and not any(p.requires_grad for p in ref.parameters())
    moved = [(n, (p - dict(ref.named_parameters())[n]).abs().max().item()) for n, p in trainer.model.named_parameters()]
    assert max(d for _, d in moved) > 0  # the policy moved away from the frozen reference
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / "training_meta.json").read_text())["task_type"] == "dpo"


def test_dpo_lora_uses_the_base_as_reference(tiny_llama_dir, tmp_path, train_pairs):
    out = tmp_path / "out"
    config = dpo_config(tiny_llama_dir, out, train_pairs, train_mode="lora", learning_rate=1e-2)
    trainer, logs, scored = _train_and_score(config, tmp_path)
    _assert_learned(logs, scored)
    assert trainer.ref_model is None and list(trainer.model.peft_config) == ["default"]  # no second copy
    assert (out / "adapter_model.safetensors").is_file()
    # report.json counts DPO tokens too: each pair is two sequences, its completions are what is supervised.
    report = json.loads((out / "report.json").read_text())
    steps, batch = trainer.state.global_step, config["per_device_train_batch_size"]
    assert report["examples_seen"] == 2 * batch * steps
    assert 0 < report["supervised_tokens_seen"] < report["real_tokens_seen"]
    assert report["real_tokens_per_second"] > 0


def test_dpo_qlora_runs_on_the_cpu(tiny_llama_dir, tmp_path, train_pairs):
    out = tmp_path / "out"
    config = dpo_config(tiny_llama_dir, out, train_pairs, train_mode="qlora", learning_rate=1e-2, max_steps=3)
    cfg = write_config(tmp_path / "c.json", **config)
    trainer = run(load_config(["--train_args_file", str(cfg)]))
    losses = trainer_losses(trainer)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert abs(losses[0] - LN2) < 0.01
    assert trainer.ref_model is None and list(trainer.model.peft_config) == ["default"]
    assert any("Linear4bit" in type(m).__name__ for m in trainer.model.modules())
    assert (out / "adapter_model.safetensors").is_file()
