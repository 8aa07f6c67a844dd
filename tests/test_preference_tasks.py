"""ORPO, KTO and reward models (task_type orpo, kto, rm): data checks, SFT-identical tokens, learning.

Each training test runs the real runner on a tiny random model for 5 steps, evaluating the training
file before the first step (eval_on_start) and after the last, and asserts the task's own metric moved
the right way: ORPO's log-odds of the chosen reply and its reward margin, KTO's rewards and KL, the
reward model's loss, margin and accuracy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from component.cli import main_train
from component.data.preference import check_pair, tokenize_pair
from component.data.template import IGNORE_INDEX, Message, encode_messages
from component.data.template_registry import get_template
from component.data.unpaired import (
    ExampleTokens,
    build_unpaired_dataset,
    check_example,
    tokenize_example,
    truncate_example,
)
from component.errors import ConfigError, DataError
from component.inference.generation import ModelSource
from component.inference.reward_scoring import load_reward_model, rewards
from component.tasks.kto import KTO_LOSS_TYPES, kto_arguments
from component.tasks.orpo import orpo_arguments
from component.tasks.reward import rm_arguments
from script import evaluate
from tests.conftest import ROOT, base_config, write_config
from tests.runs import config_of, load_config, train
from tests.tiny import tiny_tokenizer

PAIRS = ROOT / "data" / "dpo_sample.jsonl"
UNPAIRED = ROOT / "data" / "kto_sample.jsonl"
LEARNING_RATE = {"lora": 1e-2, "full": 1e-3, "qlora": 1e-2}
STEPS = 5
BATCH = 4


def write_lines(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def head(source: Path, n: int, tmp_path: Path) -> Path:
    return write_lines(tmp_path / source.name, source.read_text().splitlines()[:n])


def task_config(model_dir: Path, out: Path, task: str, data: Path, mode: str = "lora", **overrides) -> dict:
    """5 steps on `data`, evaluated on the same file before the first step and after the last."""
    values = base_config(
        model_dir,
        out,
        task_type=task,
        train_mode=mode,
        train_file=str(data),
        eval_file=str(data),
        eval_on_start=True,
        eval_steps=STEPS,
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        learning_rate=LEARNING_RATE[mode],
        max_seq_length=96,
        max_prompt_length=32,
    )
    values.update(overrides)
    return values


def before_and_after(trainer) -> tuple[dict, dict]:
    """The eval records at step 0 and at the last step."""
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [0, STEPS], evals
    return evals[0], evals[-1]


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def assert_saved(out: Path, mode: str, task: str) -> None:
    weights = "model.safetensors" if mode == "full" else "adapter_model.safetensors"
    assert (out / weights).is_file(), sorted(p.name for p in out.iterdir())
    assert json.loads((out / "training_meta.json").read_text())["task_type"] == task
    # The run's train_args.json (every key, trl's resolved values too) is a config that passes the checks.
    again = load_config(["--train_args_file", str(out / "train_args.json"), "--output_dir", str(out.parent / "again")])
    assert again.method.task_type == task


# ---------------------------------------------------------------- KTO data


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def test_unpaired_lines_are_reported_as_file_and_line(tmp_path):
    good = {"prompt": "Hi?", "completion": "Hello.", "label": True}
    rows = [
        good,
        "{not json",
        {"prompt": "q", "completion": "c"},
        {"prompt": "q", "completion": "c", "label": "yes"},
        {"prompt": "q", "chosen": "c", "rejected": "r"},
        {"prompt": "", "completion": "c", "label": True},
        {"prompt": msgs(("user", "q"), ("assistant", "a")), "completion": "c", "label": True},
        {"prompt": "q", "completion": msgs(("user", "c")), "label": False},
        {"prompt": "q", "completion": "c", "label": True, "messages": msgs(("user", "q"))},
        {"prompt": "q", "completion": "c", "label": 1},
        {"prompt": "q", "completion": "", "label": True},
        {"prompt": "q", "system": 3, "completion": "c", "label": True},
        {"prompt": "q", "completion": "c", "label": False, "id": 7, "score": 0.3},  # ignored keys: a good line
    ]
    path = write_lines(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as err:
        build_unpaired_dataset(str(path), get_template("chatml"), tiny_tokenizer(), 64, 16)
    message = str(err.value)
    expected = {
        2: "invalid JSON",
        3: "missing key(s) label",
        4: "'label' must be true or false, got 'yes'",
        5: "a preference pair ('chosen'/'rejected'); KTO reads unpaired lines",
        6: "'prompt' must be non-empty text or a list of messages",
        7: "'prompt': message 2 is 'assistant' where 'user' was expected",
        8: "'completion' must be a string or a list of exactly one assistant message",
        9: "key(s) messages not read by an unpaired example",
        10: "'label' must be true or false, got 1",
        11: "'completion' must be non-empty text",
        12: "'system' must be a string, got int",
    }
    for line, what in expected.items():
        assert f"{path}:{line}: {what}" in message, (line, message)
    assert f"{path}:1:" not in message and f"{path}:13:" not in message
    assert "11 invalid lines" in message


def test_unpaired_tokens_are_exactly_the_sft_rendering():
    tok = tiny_tokenizer()
    template = get_template("chatml")
    history = [Message("system", "Be brief."), Message("user", "What is two plus two?")]
    forms = [
        {"prompt": [m.chat_template_dict() for m in history], "completion": "Four.", "label": True},
        {"prompt": "What is two plus two?", "system": "Be brief.", "completion": "Four.", "label": True},
        {"prompt": "What is two plus two?", "system": "Be brief.", "completion": msgs(("assistant", "Four."))},
    ]
    forms[2]["label"] = False
    tokens = [tokenize_example(check_example(f), template, tok) for f in forms]
    assert tokens[0] == tokens[1] == tokens[2]
    sft = encode_messages(template, tok, [*history, Message("assistant", "Four.")])
    prompt, completion = tokens[0]
    assert sft.input_ids[: len(prompt) + len(completion)] == prompt + completion
    assert all(x == IGNORE_INDEX for x in sft.labels[: len(prompt)])
    assert sft.labels[len(prompt) : len(prompt) + len(completion)] == completion
    assert tok.decode(completion) == "Four.<|im_end|>"
    # The same conversation as a pair's chosen side: the same prompt and reply tokens.
    pair = tokenize_pair(
        check_pair({"prompt": forms[0]["prompt"], "chosen": "Four.", "rejected": "Five."}), template, tok
    )
    assert (pair.prompt, pair.chosen) == (prompt, completion)


def test_unpaired_truncation_cuts_the_prompt_from_the_left_then_the_completion():
    prompt, completion = list(range(100, 120)), [1, 2, 3, 4, 5, 6]
    assert truncate_example(ExampleTokens(prompt, completion), 30, 8) == (ExampleTokens(prompt, completion), False)
    assert truncate_example(ExampleTokens(prompt, completion), 16, 8) == (ExampleTokens(prompt[-10:], completion), True)
    assert truncate_example(ExampleTokens(prompt, completion), 12, 8) == (
        ExampleTokens(prompt[-8:], completion[:4]),
        True,
    )
    assert truncate_example(ExampleTokens(prompt, completion), 8, 8) == (None, True)  # no completion left


def test_the_shipped_kto_sample_reads_and_mixes_labels():
    data = build_unpaired_dataset(str(UNPAIRED), get_template("smollm"), tiny_tokenizer(), 512, 256)
    assert data.summary.examples == 84 and data.summary.desirable == data.summary.undesirable == 42
    labels = data.dataset["label"]
    assert all(labels[i] != labels[i + 1] for i in range(0, len(labels), 2))  # every batch sees both kinds


# ---------------------------------------------------------------- config


def test_task_options_are_checked(tiny_llama_dir, tmp_path):
    def problems(**values) -> str:
        with pytest.raises(ConfigError) as err:
            config_of(base_config(tiny_llama_dir, tmp_path / "o", **values))
        return str(err.value)

    assert "key 'orpo_beta': must be positive" in problems(task_type="orpo", orpo_beta=0.0)
    text = problems(task_type="kto", kto_loss_type="kt", per_device_train_batch_size=1, kto_beta=-1.0)
    assert "key 'kto_loss_type': 'kt' is not one of kto, apo_zero_unpaired (did you mean 'kto'?)" in text
    assert "key 'kto_beta': must be positive" in text
    assert "key 'per_device_train_batch_size': KTO's KL estimate" in problems(
        task_type="kto", per_device_train_batch_size=1
    )
    assert "key 'train_sampling_strategy'" in problems(task_type="kto", train_sampling_strategy="random")
    assert "key 'lora_init': 'pissa' rewrites the base weights" in problems(task_type="rm", lora_init="pissa")
    assert "key 'kto_beta': read by task_type 'kto' only" in problems(task_type="dpo", kto_beta=0.2)
    assert "key 'max_prompt_length': must be between 1 and" in problems(task_type="orpo", max_prompt_length=128)
    # Without the KL term KTO needs no neighbours: batch 1 and any order are fine.
    config_of(
        base_config(
            tiny_llama_dir,
            tmp_path / "o",
            task_type="kto",
            kto_loss_type="apo_zero_unpaired",
            per_device_train_batch_size=1,
            train_sampling_strategy="random",
            max_prompt_length=64,
        )
    )


def test_kto_loss_types_are_trls():
    from trl import KTOConfig

    assert KTO_LOSS_TYPES == tuple(KTOConfig.__dataclass_fields__["loss_type"].metadata["choices"])


def test_trl_defaults_follow_our_config(tiny_llama_dir, tmp_path):
    """trl's configs would default to bf16, gradient checkpointing and their own learning rates."""
    common = dict(max_prompt_length=64, learning_rate=2e-4)
    orpo = orpo_arguments(
        config_of(base_config(tiny_llama_dir, tmp_path / "o", task_type="orpo", orpo_beta=0.3, **common))
    )
    kto = kto_arguments(config_of(base_config(tiny_llama_dir, tmp_path / "o", task_type="kto", kto_beta=0.2, **common)))
    rm = rm_arguments(
        config_of(
            base_config(tiny_llama_dir, tmp_path / "o", task_type="rm", rm_center_rewards_coefficient=0.01, **common)
        )
    )
    for args in (orpo, kto, rm):
        assert (args.bf16, args.gradient_checkpointing, args.learning_rate, args.max_length) == (
            False,
            False,
            2e-4,
            128,
        )
    assert orpo.beta == 0.3
    assert (kto.beta, kto.loss_type, kto.train_sampling_strategy) == (0.2, "kto", "sequential")
    assert rm.center_rewards_coefficient == 0.01


# ---------------------------------------------------------------- bad records: file:line, exit 2, nothing written


@pytest.mark.parametrize("task", ["orpo", "kto", "rm"])
def test_bad_records_stop_the_run_before_output_dir(tiny_llama_dir, tmp_path, task, capsys):
    good = (
        {"prompt": "Hi?", "completion": "Hello.", "label": True}
        if task == "kto"
        else {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go."}
    )
    data = write_lines(tmp_path / "bad.jsonl", [good, good, {"prompt": "Hi?"}])
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.json", **task_config(tiny_llama_dir, out, task, data))
    assert main_train(["--train_args_file", str(cfg)]) == 2
    assert f"{data}:3: missing key(s)" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_orpo_raises_the_log_odds_of_the_chosen_reply(tiny_llama_dir, tmp_path, mode, capsys):
    out, pairs = tmp_path / "out", head(PAIRS, 8, tmp_path)
    trainer = train(task_config(tiny_llama_dir, out, "orpo", pairs, mode, orpo_beta=1.0))
    before, after = before_and_after(trainer)
    # Measured: lora -0.0115 -> 0.0222, full -0.0115 -> 0.0608 (log-odds of length-normalised probabilities).
    assert after["eval_log_odds_chosen"] > before["eval_log_odds_chosen"] + 0.02, (before, after)
    assert after["eval_rewards/margins"] > before["eval_rewards/margins"] + 0.02, (before, after)
    assert after["eval_loss"] < before["eval_loss"], (before, after)
    # report.json counts each pair as two sequences and the replies as what is learned, as for DPO.
    counts = report(out)
    assert counts["examples_seen"] == 2 * BATCH * STEPS
    assert 0 < counts["supervised_tokens_seen"] < counts["real_tokens_seen"]
    assert_saved(out, mode, "orpo")
    # Not a reward model: script/evaluate.py --pairs_file refuses it (exit 2) rather than score with a random head.
    capsys.readouterr()
    assert evaluate.main(["--model", str(out), "--pairs_file", str(pairs)]) == 2
    assert "trained with task_type 'orpo', not a reward model" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_kto_rewards_desirable_completions_and_penalises_the_others(tiny_llama_dir, tmp_path, mode):
    out = tmp_path / "out"
    trainer = train(task_config(tiny_llama_dir, out, "kto", head(UNPAIRED, 16, tmp_path), mode))
    before, after = before_and_after(trainer)
    # The policy starts as the reference: every reward, the KL and 1 - sigmoid(0) are exact.
    assert (before["eval_rewards/chosen"], before["eval_rewards/rejected"], before["eval_kl"]) == (0, 0, 0)
    assert before["eval_loss"] == pytest.approx(0.5)
    # Measured: rewards/chosen 0 -> 0.100 (lora), 0.059 (full); margins 0 -> 0.107, 0.155; KL 0 -> 0.49, 0.08.
    assert after["eval_rewards/chosen"] > 0.02 and after["eval_rewards/margins"] > 0.05, after
    assert after["eval_kl"] > 0 and after["eval_loss"] < 0.5 - 0.005, after
    if mode == "full":
        ref = trainer.ref_model
        assert ref is not None and not any(p.requires_grad for p in ref.parameters())
    else:
        assert trainer.ref_model is None and list(trainer.model.peft_config) == ["default"]  # the base is the reference
    counts = report(out)
    assert counts["examples_seen"] == BATCH * STEPS
    assert 0 < counts["supervised_tokens_seen"] < counts["real_tokens_seen"]
    assert_saved(out, mode, "kto")


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_reward_model_learns_to_rank_the_pairs_and_reloads(tiny_llama_dir, tmp_path, mode):
    out, pairs = tmp_path / "out", head(PAIRS, 8, tmp_path)
    trainer = train(task_config(tiny_llama_dir, out, "rm", pairs, mode))
    before, after = before_and_after(trainer)
    # Measured: loss 0.626 -> 0.383 (lora), 0.701 -> 0.630 (full); accuracy 0.875 -> 1.0, 0.375 -> 0.875.
    assert after["eval_loss"] < before["eval_loss"] - 0.05, (before, after)
    assert after["eval_margin"] > before["eval_margin"] + 0.1, (before, after)
    assert after["eval_accuracy"] >= max(before["eval_accuracy"], 0.75), (before, after)
    model = trainer.model
    classifier = model.get_base_model() if mode == "lora" else model
    assert model.config.num_labels == 1 and type(classifier).__name__ == "LlamaForSequenceClassification"
    counts = report(out)
    assert counts["examples_seen"] == 2 * BATCH * STEPS and counts["supervised_tokens_seen"] == 0
    assert counts["reward_model"] == {
        "step": STEPS,
        **{k: after[k] for k in ("eval_accuracy", "eval_margin", "eval_loss")},
    }
    assert_saved(out, mode, "rm")
    # The saved run, loaded as script/evaluate.py --pairs_file loads it, scores as the trained model does.
    loaded = load_reward_model(ModelSource(str(out)))
    sequences = trainer.train_dataset["chosen_ids"][:3] + trainer.train_dataset["rejected_ids"][:3]
    pad = loaded.tokenizer.pad_token_id
    torch.testing.assert_close(rewards(loaded.model, sequences, pad, 4), rewards(model.eval(), sequences, pad, 4))
    # script/evaluate.py --pairs_file: the run's lengths and template, batches of 3 (padding is read past).
    scored = tmp_path / "scores.json"
    argv = ["--model", str(out), "--pairs_file", str(pairs), "--batch_size", "3", "--output_json", str(scored)]
    assert evaluate.main(argv) == 0
    scores = json.loads(scored.read_text())
    assert scores["pairs"] == 8 and scores["accuracy"] == after["eval_accuracy"]
    assert scores["mean_margin"] == pytest.approx(after["eval_margin"], abs=1e-5)


@pytest.mark.parametrize("task", ["orpo", "kto", "rm"])
def test_qlora_runs_on_the_cpu(tiny_llama_dir, tmp_path, task):
    data = head(UNPAIRED if task == "kto" else PAIRS, 8, tmp_path)
    out = tmp_path / "out"
    values = task_config(tiny_llama_dir, out, task, data, "qlora", max_steps=3, eval_on_start=False)
    values.pop("eval_file")
    trainer = train(values)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert any("Linear4bit" in type(m).__name__ for m in trainer.model.modules())
    assert list(trainer.model.peft_config) == ["default"]
    assert_saved(out, "qlora", task)


def test_reward_model_keeps_added_tokens_trainable(tiny_llama_dir, tmp_path):
    """add_special_tokens under LoRA: the classifier's adapter trains the new embedding rows (no LM head left)."""
    out = tmp_path / "out"
    values = task_config(tiny_llama_dir, out, "rm", head(PAIRS, 8, tmp_path), add_special_tokens=["<extra_1>"])
    values.update(max_steps=2, eval_on_start=False)
    values.pop("eval_file")
    trainer = train(values)
    config = trainer.model.peft_config["default"]
    assert config.task_type == "SEQ_CLS" and list(config.trainable_token_indices) == ["embed_tokens"]
    assert "score" in config.modules_to_save
    deltas = [p for n, p in trainer.model.named_parameters() if "trainable_tokens_delta" in n]
    assert deltas and all(p.requires_grad for p in deltas)


# ---------------------------------------------------------------- DDP


def test_orpo_under_torchrun_matches_one_process(tiny_llama_dir, tmp_path):
    """2 ranks at batch 2 train as one process at batch 2 with 2 accumulation steps: the same pairs per step,
    and ORPO's NLL term averaged over each micro-batch's tokens in both (so not one process at batch 4)."""
    from tests.test_distributed import PER_RANK_BATCH, RANKS, assert_same_training, launch_one_node
    from tests.test_distributed import STEPS as DDP_STEPS

    data = head(PAIRS, 8, tmp_path)

    def config(name: str, **extra) -> Path:
        values = task_config(tiny_llama_dir, tmp_path / name, "orpo", data, "lora", orpo_beta=1.0, **extra)
        values.update(max_steps=DDP_STEPS, save_steps=DDP_STEPS, per_device_train_batch_size=PER_RANK_BATCH)
        for key in ("eval_file", "eval_on_start", "eval_steps"):
            values.pop(key)
        return write_config(tmp_path / f"{name}.json", **values)

    launch_one_node([config("ddp")])
    assert main_train(["--train_args_file", str(config("single", gradient_accumulation_steps=RANKS))]) == 0
    assert_same_training(tmp_path / "ddp", tmp_path / "single", "lora")


def test_simpo_widens_the_length_normalised_margin(tiny_llama_dir, tmp_path):
    """SimPO through trl's CPOTrainer (loss_type simpo, cpo_alpha 0), on our tokenized pairs."""
    out, pairs = tmp_path / "out", head(PAIRS, 8, tmp_path)
    trainer = train(task_config(tiny_llama_dir, out, "simpo", pairs, "lora"))
    assert (trainer.args.loss_type, trainer.args.cpo_alpha, trainer.args.beta) == ("simpo", 0.0, 2.0)
    before, after = before_and_after(trainer)
    assert after["eval_rewards/margins"] > before["eval_rewards/margins"], (before, after)
    assert after["eval_loss"] < before["eval_loss"], (before, after)
    assert_saved(out, "lora", "simpo")
