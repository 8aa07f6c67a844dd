"""GRPO (task_type grpo): it learns, with our prompts, rewards, reports, resume and errors.

The learning runs train a tiny random Llama (tests/tiny.py: 512-token vocabulary, hidden 32) from
scratch on the CPU, seeded, on a reward it can learn: the share of a completion's tokens that lie in
a fixed eighth of the vocabulary (tests/grpo_rewards.py: about 0.12 for a random model, 1.0 for one
that writes only those). The assertion is on the mean reward of the last 10 steps against the first 10.
"""

from __future__ import annotations

import inspect
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from component.errors import USER_ERROR_EXIT_CODE, ConfigError, DataError, UserError
from component.model.loading import load_tokenizer
from component.tasks import grpo, rewards
from component.tasks.rewards import RewardError, RewardSpec
from tests import grpo_rewards
from tests.conftest import ROOT, base_config, write_config
from tests.runs import config_of, run_with_fault, subprocess_env, train, train_in_process

PROMPTS = ROOT / "tests" / "data" / "grpo_prompts.jsonl"
TARGET = {"function": "tests.grpo_rewards:target_share", "name": "target_share"}
STEPS = 40
MARGIN = 0.3  # seen: +0.62 (full), +0.83 (LoRA); a model that does not learn stays within about ±0.05
# The tiny model's frozen head turns any hidden state into logits within about ±0.6, too little to move the
# sampling much: the LoRA runs train the head too (modules_to_save), as a LoRA run that must change which
# tokens it writes would. The adapters on every linear layer train as well.
LORA_EXTRA = {"modules_to_save": ["lm_head"], "learning_rate": 3e-2}


def grpo_values(model_dir: Path, out: Path, **overrides) -> dict:
    values = base_config(
        model_dir,
        out,
        task_type="grpo",
        train_mode="full",
        train_file=str(PROMPTS),
        grpo_rewards=[TARGET],
        grpo_num_generations=4,
        grpo_max_completion_length=8,
        per_device_train_batch_size=8,  # 2 prompts x 4 completions a step
        max_steps=STEPS,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_prompt_length=64,
        grpo_samples_every=5,
    )
    values.update(overrides)
    return values


def rewards_by_step(history: list[dict]) -> list[float]:
    return [e["reward"] for e in history if "reward" in e]


def learned(history: list[dict]) -> float:
    r = rewards_by_step(history)
    assert len(r) == STEPS, len(r)
    return sum(r[-10:]) / 10 - sum(r[:10]) / 10


# ---------------------------------------------------------------- it learns


@pytest.fixture(scope="module")
def full_run(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo-full") / "out"
    trainer = train(grpo_values(tiny_llama_dir, out, report_to="tensorboard"))
    return out, trainer


def test_grpo_learns_a_reward_full(full_run):
    _, trainer = full_run
    assert learned(trainer.state.log_history) > MARGIN


def test_grpo_learns_a_reward_lora(tiny_llama_dir, tmp_path):
    trainer = train(grpo_values(tiny_llama_dir, tmp_path / "out", train_mode="lora", **LORA_EXTRA))
    assert learned(trainer.state.log_history) > MARGIN
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_grpo_learns_under_two_rank_ddp(tiny_llama_dir, tmp_path):
    """torchrun, 2 CPU ranks over gloo, each generating half of every step's completions."""
    from component.training.distributed import free_port

    out = tmp_path / "out"
    # 2 ranks x 4 completions: the same 8 completions (2 prompts x 4) a step as one process at batch 8.
    cfg = write_config(tmp_path / "ddp.json", **grpo_values(tiny_llama_dir, out, per_device_train_batch_size=4))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(ROOT / "train.py"),
        "--train_args_file",
        str(cfg),
    ]
    env = subprocess_env()
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2
    history = [{"reward": s["reward"]} for s in report["rewards"]["per_step"]]
    assert learned(history) > MARGIN


# ---------------------------------------------------------------- what a run writes


def test_report_carries_rewards_per_step_and_plots_them(full_run):
    out, _ = full_run
    report = json.loads((out / "report.json").read_text())
    steps = report["rewards"]["per_step"]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    for key in (
        "reward",
        "reward_std",
        "rewards/target_share/mean",
        "completions/mean_length",
        "clip_ratio/region_mean",
    ):
        assert all(key in s for s in steps), key
    assert report["rewards"]["final_reward"] == steps[-1]["reward"]
    assert report["real_tokens_seen"] > report["supervised_tokens_seen"] > 0  # prompts + completions, completions
    assert (out / "reward.png").stat().st_size > 0 and (out / "loss.png").is_file()


def test_tensorboard_gets_the_rewards(full_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = full_run
    events = EventAccumulator(str(next(out.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "train/reward",
        "train/reward_std",
        "train/rewards/target_share/mean",
        "train/completions/mean_length",
    } <= tags
    assert len(events.Scalars("train/reward")) == STEPS


def test_samples_jsonl_keeps_completions_with_their_rewards(full_run):
    out, _ = full_run
    lines = [json.loads(x) for x in (out / grpo.SAMPLES_FILE).read_text().splitlines()]
    assert sorted({x["step"] for x in lines}) == [1, 5, 10, 15, 20, 25, 30, 35, 40]
    assert all(len([x for x in lines if x["step"] == s]) == grpo.SAMPLES_PER_STEP for s in (1, 40))
    for x in lines:
        assert x["prompt"].startswith("<|im_start|>user\n") and x["prompt"].endswith("<|im_start|>assistant\n")
        assert x["reward"] == pytest.approx(x["rewards"]["target_share"])


def test_generation_starts_from_our_prompt_ids_and_stops_at_the_end_of_turn(full_run, tiny_llama_dir):
    """trl's hook point is still there (the one method overridden), and it gets our template's ids."""
    from trl import GRPOTrainer

    assert "self._tokenize_prompts(prompts)" in inspect.getsource(GRPOTrainer._generate)
    assert inspect.signature(GRPOTrainer._tokenize_prompts).parameters.keys() == {"self", "prompts"}
    _, trainer = full_run
    tok = load_tokenizer(config_of(grpo_values(tiny_llama_dir, Path("/unused"))).model)
    text = "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n"
    ids, images, fields = trainer._tokenize_prompts([text])
    assert ids == [tok(text, add_special_tokens=False)["input_ids"]] and images is None and fields == {}
    assert trainer.eos_token_ids[0] == tok.eos_token_id
    assert tok.convert_tokens_to_ids("<|im_end|>") in trainer.eos_token_ids


# ---------------------------------------------------------------- modes, knobs


@pytest.mark.parametrize(
    "overrides",
    [
        dict(train_mode="qlora"),
        dict(train_mode="lora", grpo_beta=0.04, grpo_loss_type="grpo"),
        dict(train_mode="full", grpo_beta=0.04, grpo_loss_type="dr_grpo", grpo_temperature=0.7),
        dict(train_mode="lora", grpo_loss_type="bnpo", gradient_accumulation_steps=2, per_device_train_batch_size=4),
    ],
    ids=["qlora", "lora-kl-grpo", "full-kl-dr_grpo", "lora-bnpo-accumulation"],
)
def test_modes_and_knobs_train(tiny_llama_dir, tmp_path, overrides):
    trainer = train(grpo_values(tiny_llama_dir, tmp_path / "out", max_steps=3, **overrides))
    history = [e for e in trainer.state.log_history if "reward" in e]
    assert len(history) == 3 and all(math.isfinite(e["loss"]) for e in history)
    if overrides.get("grpo_beta"):
        assert all("kl" in e for e in history) and history[-1]["kl"] >= 0
    assert trainer.args.loss_type == overrides.get("grpo_loss_type", "dapo")


def test_our_loss_types_are_trls():
    from trl import GRPOConfig

    help_text = GRPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    assert all(f"'{name}'" in help_text for name in grpo.GRPO_LOSS_TYPES)


# ---------------------------------------------------------------- resume


def test_kill9_then_resume_continues_the_reward_curve(tiny_llama_dir, tmp_path):
    """Killed at step 6 with checkpoint-4 on disk, resumed: steps 5-8 have the rewards and losses of the
    uninterrupted run (the generation's RNG state comes back with the checkpoint)."""
    values = grpo_values(tiny_llama_dir, tmp_path / "ref", max_steps=8, save_steps=4)
    reference = train(values).state.log_history
    cfg = write_config(tmp_path / "run.json", **{**values, "output_dir": str(tmp_path / "out")})
    killed = run_with_fault("kill", 6, cfg)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = train_in_process(cfg, "--resume_from_checkpoint", "true").state.log_history
    ref = {e["step"]: e for e in reference if "reward" in e}
    new = {e["step"]: e for e in resumed if "reward" in e}
    assert sorted(new) == list(range(1, 9))  # steps 1-4 come back from the checkpoint's state
    for step in range(5, 9):
        assert new[step]["reward"] == pytest.approx(ref[step]["reward"], abs=1e-6), step
        assert new[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5, abs=1e-7), step
    # samples.jsonl: step 5 was written before the kill and again after the resume; it is there once.
    ref_samples = (tmp_path / "ref" / grpo.SAMPLES_FILE).read_text()
    assert (tmp_path / "out" / grpo.SAMPLES_FILE).read_text() == ref_samples


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "function, says",
    [
        ("tests.grpo_rewards:raises", "raised KeyError"),
        ("tests.grpo_rewards:wrong_length", "returned 3 values for 2 completions"),
        ("tests.grpo_rewards:nan_reward", "got nan"),
        ("tests.grpo_rewards:absent", "has no function 'absent'"),
        ("no_such_module_here:score", "cannot import module 'no_such_module_here'"),
    ],
)
def test_a_bad_reward_function_stops_before_output_dir(tiny_llama_dir, tmp_path, function, says):
    out = tmp_path / "out"
    with pytest.raises(UserError) as err:
        train(grpo_values(tiny_llama_dir, out, grpo_rewards=[{"function": function}]))
    assert function in str(err.value) and says in str(err.value)
    assert not out.exists()


def test_a_reward_that_fails_mid_run_names_itself(tiny_llama_dir, tmp_path, monkeypatch):
    calls = []

    def fails_on_second_call(prompts, completions, completion_ids, **columns):
        calls.append(1)
        if len(calls) > 2:  # the probe and step 1 pass
            return [None] * len(completions)
        return [0.0] * len(completions)

    monkeypatch.setattr(grpo_rewards, "later", fails_on_second_call, raising=False)
    with pytest.raises(RewardError, match=r"reward function tests.grpo_rewards:later: completion 0 got None"):
        train(grpo_values(tiny_llama_dir, tmp_path / "out", grpo_rewards=[{"function": "tests.grpo_rewards:later"}]))


def test_prompt_errors_name_the_line_and_write_nothing(tiny_llama_dir, tmp_path):
    """A prompt over the limit and a missing reference (for accuracy) are named by file and line."""
    long_prompt = tmp_path / "long.jsonl"
    long_prompt.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}], "reference": "1"})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "word " * 200}], "reference": "2"})
        + "\n"
    )
    no_reference = tmp_path / "noref.jsonl"
    no_reference.write_text(json.dumps({"messages": [{"role": "user", "content": "What is 2+2?"}]}) + "\n")
    cases = [
        (
            dict(train_file=str(long_prompt)),
            f"{long_prompt}:2: the prompt is",
        ),
        (
            dict(train_file=str(no_reference), grpo_rewards=[{"name": "accuracy", "mode": "numeric"}]),
            f"{no_reference}:1: no reference answer, which the accuracy reward compares with",
        ),
    ]
    for i, (overrides, says) in enumerate(cases):
        out = tmp_path / f"out{i}"
        with pytest.raises(DataError) as err:
            train(grpo_values(tiny_llama_dir, out, **overrides))
        assert says in str(err.value)
        assert not out.exists()


def test_a_bad_reward_exits_2_through_train_py(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    values = grpo_values(tiny_llama_dir, out, grpo_rewards=[{"function": "tests.grpo_rewards:nan_reward"}])
    cfg = write_config(tmp_path / "c.json", **values)
    done = subprocess.run(
        [sys.executable, "train.py", "--train_args_file", str(cfg)],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == USER_ERROR_EXIT_CODE, done.stderr[-2000:]
    assert "reward function tests.grpo_rewards:nan_reward: completion 0 got nan" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "overrides, says",
    [
        (dict(grpo_rewards=None), "key 'grpo_rewards': GRPO needs one or more reward functions"),
        (dict(grpo_rewards=["fromat"]), "unknown reward 'fromat'"),
        (dict(grpo_rewards=[{"name": "format", "pattern": "("}]), "'pattern' is not a regular expression"),
        (dict(grpo_rewards=[{"name": "accuracy", "mode": "fuzzy"}]), "'mode' must be one of exact, numeric, boxed"),
        (dict(grpo_rewards=[{"name": "length"}]), "'target' (tokens) is required"),
        (dict(grpo_rewards=[{"name": "json", "schema": {"type": 5}}]), "'schema' is not a valid JSON schema"),
        (dict(grpo_rewards=[{"name": "format", "weigth": 2}]), "unknown option(s) weigth"),
        (dict(grpo_rewards=[{"name": "format", "weight": "high"}]), "'weight' must be a number"),
        (dict(grpo_rewards=[{"function": "my rewards"}]), "'function' must be 'module:name'"),
        (dict(grpo_rewards=["format", "format"]), "format listed twice"),
        (dict(grpo_num_generations=1), "2 or more completions"),
        (dict(per_device_train_batch_size=6), "whole groups of grpo_num_generations (4)"),
        (dict(grpo_loss_type="ppo"), "grpo_loss_type"),
        (dict(grpo_temperature=0), "'grpo_temperature': must be above 0"),
        (dict(train_mode="lora", lora_target_modules=["q_proj", "lm_head"]), "LoRA adapter on lm_head would never"),
        (dict(grpo_use_vllm=True), "key 'grpo_use_vllm'"),
    ],
)
def test_config_errors_name_the_key(tiny_llama_dir, tmp_path, overrides, says):
    with pytest.raises(ConfigError) as err:
        config_of(grpo_values(tiny_llama_dir, tmp_path / "out", **overrides))
    assert says in str(err.value)


def test_grpo_keys_on_another_task_are_refused(tiny_llama_dir, tmp_path):
    values = base_config(tiny_llama_dir, tmp_path / "out", grpo_num_generations=8)
    with pytest.raises(ConfigError, match="key 'grpo_num_generations': read by task_type 'grpo' only"):
        config_of(values)


# ---------------------------------------------------------------- data


def test_prompts_in_every_format_give_the_same_ids_and_references(tiny_llama_dir, tmp_path):
    from component.data.prompts import build_prompt_dataset
    from component.data.template_registry import TEMPLATES

    tok = load_tokenizer(config_of(grpo_values(tiny_llama_dir, Path("/unused"))).model)
    q, a = "What is two plus two?", "4"
    lines = {
        "messages": {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
        "sharegpt": {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]},
        "alpaca": {"instruction": q, "output": a},
        "prompt_completion": {"prompt": q, "completion": a},
        "conversation": {"conversation": [{"human": q, "assistant": a}]},
        "messages_prompt_only": {"messages": [{"role": "user", "content": q}], "reference": a},
        "alpaca_prompt_only": {"instruction": q, "reference": a},
    }
    rows = []
    for name, line in lines.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(line) + "\n")
        rows.append(build_prompt_dataset(str(path), TEMPLATES["chatml"], tok, 64).dataset[0])
    expected = tok(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert all(r["prompt_ids"] == expected for r in rows)
    assert all(r["reference"] == a for r in rows)


def test_reward_functions_get_every_column_decoded(tiny_llama_dir, tmp_path):
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    path = tmp_path / "p.jsonl"
    path.write_text(
        "\n".join(
            json.dumps(x)
            for x in (
                {"messages": [{"role": "user", "content": "a"}], "tools": tools, "meta": {"level": 1}, "answer": "x"},
                {"messages": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "B"}], "answer": "y"},
            )
        )
        + "\n"
    )
    grpo_rewards.SEEN.clear()
    spy = {"function": "tests.grpo_rewards:columns_seen"}
    train(
        grpo_values(
            tiny_llama_dir,
            tmp_path / "out",
            train_file=str(path),
            template_name="auto",
            chat_template=str(ROOT / "data" / "chat_templates" / "chatml_tools.jinja"),
            grpo_rewards=[spy, TARGET],
            max_steps=1,
            max_prompt_length=400,  # the tool definitions take about 250 tokens
        )
    )
    probe, step = grpo_rewards.SEEN[0], grpo_rewards.SEEN[1]
    assert probe["completions"] == ["", "B"]  # the probe: each line's reference as its completion
    by_answer = {
        a: (t, m, r) for a, t, m, r in zip(step["answer"], step["tools"], step["meta"], step["reference"], strict=True)
    }
    assert by_answer["x"] == (tools, {"level": 1}, None)
    assert by_answer["y"] == (None, None, "B")
    assert type(step["trainer_state"]).__name__ == "TrainerState"  # trl's own state object, as trl passes it


# ---------------------------------------------------------------- built-in rewards


def score(name: str, completions: list[str], ids=None, **options_and_columns) -> list[float]:
    columns = {k: options_and_columns.pop(k) for k in list(options_and_columns) if k in ("reference", "tools")}
    reward = rewards.CheckedReward(RewardSpec(name, builtin=name, options=options_and_columns))
    return reward(["p"] * len(completions), completions, ids or [[0]] * len(completions), **columns)


def test_samples_hold_training_steps_only(tiny_llama_dir, tmp_path):
    """An evaluation generates and scores completions too; samples.jsonl keeps the training steps' only."""
    out = tmp_path / "out"
    train(
        grpo_values(
            tiny_llama_dir,
            out,
            max_steps=2,
            grpo_samples_every=1,
            eval_file=str(PROMPTS),
            eval_strategy="steps",
            eval_steps=1,
            per_device_eval_batch_size=8,
        )
    )
    steps = [json.loads(x)["step"] for x in (out / grpo.SAMPLES_FILE).read_text().splitlines()]
    assert steps == [1] * grpo.SAMPLES_PER_STEP + [2] * grpo.SAMPLES_PER_STEP


def test_a_strict_signature_gets_the_columns_trl_passes(tiny_llama_dir, tmp_path):
    """The probe passes what trl passes (prompt_ids too): a function without **kwargs that the probe lets
    through trains."""
    values = grpo_values(tiny_llama_dir, tmp_path / "out", max_steps=1)
    values["grpo_rewards"] = [{"function": "tests.grpo_rewards:strict"}, TARGET]
    assert len(rewards_by_step(train(values).state.log_history)) == 1


def test_references_are_read_as_the_accuracy_mode_needs(tiny_llama_dir, tmp_path):
    """Blank references are missing; a final tool call is its JSON; LaTeX that is not a number is refused for
    numeric accuracy (never its last digit), each on its line."""
    from component.data.prompts import build_prompt_dataset
    from component.data.template_registry import TEMPLATES

    tok = load_tokenizer(config_of(grpo_values(tiny_llama_dir, Path("/unused"))).model)
    user = {"role": "user", "content": "q"}
    lines = [
        {"messages": [user, {"role": "assistant", "content": "  "}]},
        {"messages": [user], "reference": "  "},
        {"messages": [user], "reference": "\\boxed{\\frac{1}{2}}"},
        {"messages": [user], "reference": "so 3 + 4 = 7\n#### 7"},
        {"messages": [user], "reference": 36},
    ]
    path = tmp_path / "refs.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    specs = rewards.reward_specs([{"name": "accuracy", "mode": "numeric"}])
    required = rewards.needs_reference(specs)
    with pytest.raises(DataError) as err:
        build_prompt_dataset(str(path), TEMPLATES["chatml"], tok, 64, required=required[0], check_required=required[1])
    found = str(err.value)
    assert f"{path}:1: messages[1].content: empty text" in found  # the format refuses a blank reply
    assert f"{path}:2: no reference answer" in found
    assert f"{path}:3: the reference answer" in found and "gives no a number" not in found
    assert "gives no number to compare with (accuracy mode 'numeric')" in found
    assert f"{path}:4" not in found and f"{path}:5" not in found
    kept = build_prompt_dataset(
        str(path),
        TEMPLATES["chatml"],
        tok,
        64,
        skip_invalid=True,
        **dict(required=required[0], check_required=required[1]),
    ).dataset
    assert kept["reference"] == ["so 3 + 4 = 7\n#### 7", "36"]
    calls = tmp_path / "calls.jsonl"
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 1}}}
    calls.write_text(
        json.dumps({"messages": [user, {"role": "assistant", "content": "", "tool_calls": [call]}]}) + "\n"
    )
    template = resolve_auto(tok)
    row = build_prompt_dataset(str(calls), template, tok, 512).dataset[0]
    assert json.loads(row["reference"]) == [{"name": "add", "arguments": {"a": 1}}]


def resolve_auto(tok):
    from component.data.tokenizer_template import resolve_template, use_chat_template_file

    use_chat_template_file(tok, str(ROOT / "data" / "chat_templates" / "chatml_tools.jinja"))
    return resolve_template("auto", tok)


def test_eval_only_columns_are_decoded_too(tiny_llama_dir, tmp_path):
    from component.data.prompts import build_prompt_dataset, json_columns
    from component.data.template_registry import TEMPLATES

    tok = load_tokenizer(config_of(grpo_values(tiny_llama_dir, Path("/unused"))).model)
    user = {"role": "user", "content": "q"}
    (tmp_path / "t.jsonl").write_text(json.dumps({"messages": [user], "city": {"name": "Paris"}}) + "\n")
    (tmp_path / "e.jsonl").write_text(json.dumps({"messages": [user], "city": "Paris", "meta": {"x": 1}}) + "\n")
    t, e = (
        build_prompt_dataset(str(tmp_path / f), TEMPLATES["chatml"], tok, 64).dataset for f in ("t.jsonl", "e.jsonl")
    )
    columns = json_columns(t, e)
    assert set(columns) == {"city", "meta", "tools"}
    assert rewards.decoded({"city": list(e["city"]), "meta": list(e["meta"])}, columns) == {"city": ["Paris"], "meta": [{"x": 1}]}
    assert rewards.decoded({"city": list(t["city"])}, columns) == {"city": [{"name": "Paris"}]}


def test_format_reward():
    replies = ["<think>add them</think> 4", "4", "<think></think> 4", "<think>x</think>", " <think>x</think> 4"]
    assert score("format", replies) == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert score("format", ["Answer: 4", "4"], pattern=r"Answer: \d+$") == [1.0, 0.0]
    assert score("format", ["<think>a\nb</think>\n4"]) == [1.0]  # the dot matches newlines


def test_accuracy_reads_no_answer_from_unfinished_reasoning_or_lists():
    cut = ["<think>6*7 = 42, let me check", "<think>6*7</think> 42", "the numbers are 1,2,3", "1,234 apples"]
    assert score("accuracy", cut, reference=["42", "42", "123", "1234"], mode="numeric") == [0.0, 1.0, 0.0, 1.0]
    assert score("accuracy", ["<think>so</think>4"], reference=["<think>2+2</think>4"], mode="exact") == [1.0]
    assert score("accuracy", ["\\boxed{72}", "72"], reference=["3 + 4\n#### 72"] * 2, mode="boxed") == [1.0, 0.0]
    assert score("accuracy", ["0.5", "is 2"], reference=["\\boxed{\\frac{1}{2}}"] * 2, mode="boxed") == [0.0, 0.0]
    assert score("accuracy", ["", "\\boxed{}"], reference=["4", "4"], mode="boxed") == [0.0, 0.0]


def test_accuracy_reward_exact_numeric_and_boxed():
    assert score("accuracy", ["Paris", " Paris ", "paris"], reference=["Paris"] * 3, mode="exact") == [1, 1, 0]
    assert score("accuracy", ["<think>2+2=5?</think>4"], reference=["4"], mode="exact") == [1.0]
    numeric = ["so it is 1,000", "about 999.99", "12 then 13", "it is 3/4.", "none"]
    refs = ["1000", "1000", "12", "0.75", "1"]
    assert score("accuracy", numeric, reference=refs, mode="numeric") == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert score("accuracy", ["999.9999999"], reference=["1000"], mode="numeric", tolerance=1e-3) == [1.0]
    boxed = ["so \\boxed{\\frac{1}{2}}", "\\boxed{12} then \\boxed{13}", "\\boxed{0.50}", "0.5", "\\boxed{x^{2}+1}"]
    refs = ["\\boxed{\\frac{1}{2}}", "13", "1/2", "0.5", "x^{2} + 1"]
    assert score("accuracy", boxed, reference=refs, mode="boxed") == [1.0, 1.0, 1.0, 0.0, 1.0]


def test_length_reward():
    ids = [[0] * n for n in (10, 5, 15, 30, 0)]
    assert score("length", ["x"] * 5, ids, target=10) == [0.0, -0.5, -0.5, -1.0, -1.0]


def test_json_reward_with_and_without_a_schema():
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    replies = ['{"city": "Paris"}', '```json\n{"city": "Oslo"}\n```', '{"town": "Rome"}', "{city: Paris}", "[1]"]
    assert score("json", replies, schema=schema) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert score("json", replies) == [1.0, 1.0, 1.0, 0.0, 1.0]


def test_tool_call_reward():
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    replies = [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        '{"name": "get_weather", "parameters": {"city": "Oslo"}}',  # Llama 3.1's form
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>',  # not one of the line's tools
        '<tool_call>{"name": "get_weather", "arguments": {"town": "Rome"}}</tool_call>',  # misses "city"
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}</tool_call>',  # does not parse
        "It is sunny.",
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n<tool_call>{"name": "rm"',
        'Sure! <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>',
    ]
    assert score("tool_call", replies, tools=[tools] * 8) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert score("tool_call", replies[:1], tools=[None]) == [0.0]  # a line without tools


def test_a_reward_that_returns_a_non_number_is_named():
    with pytest.raises(RewardError, match="reward function x: completion 1 got 'high'"):
        rewards.checked_values("x", [1.0, "high"], 2)
    assert rewards.checked_values("x", [torch.tensor(0.5), True and 1], 2) == [0.5, 1.0]


def test_user_functions_load_from_the_current_folder_and_are_logged(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_here.py").write_text(
        "def score(prompts, completions, completion_ids, **kw):\n    return [float(len(c)) for c in completions]\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    reward = rewards.CheckedReward(RewardSpec("my_rewards_here:score", function="my_rewards_here:score"))
    assert reward(["p", "p"], ["ab", "c"], [[1], [2]]) == [2.0, 1.0]
    assert reward.__name__ == "my_rewards_here:score"
    assert str(tmp_path / "my_rewards_here.py") in reward.origin


def test_shipped_grpo_config_is_valid():
    from tests.runs import load_config

    config = load_config(["--train_args_file", str(ROOT / "train_args" / "smollm2-135m-grpo-lora.json")])
    assert config.method.task_type == "grpo" and config.method.grpo_rewards
    assert Path(ROOT / config.data.train_file).is_file()


@pytest.mark.parametrize(
    "family, template_name",
    [("qwen3", "qwen3"), ("qwen3", "auto"), ("llama3_1", "llama3"), ("smollm2", "smollm"), ("gemma3", "gemma")],
)
def test_the_prompt_is_the_official_generation_prompt(official, tmp_path, family, template_name):
    """A GRPO prompt's ids are what the family's official chat template gives with add_generation_prompt."""
    from component.data.prompts import build_prompt_dataset
    from component.data.tokenizer_template import resolve_template

    tok = official(family)
    messages = [{"role": "user", "content": "What is 12 times 3?"}]
    if family != "gemma3":  # Gemma's template folds a system prompt into the user turn; the others have one
        messages.insert(0, {"role": "system", "content": "Answer with a number."})
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"messages": messages, "reference": "36"}) + "\n")
    row = build_prompt_dataset(str(path), resolve_template(template_name, tok), tok, 512).dataset[0]
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert row["prompt_ids"] == expected["input_ids"]
    if family == "qwen3":  # empty_think_block 'prompt': the empty think block in the prompt, as enable_thinking=False
        row = build_prompt_dataset(
            str(path), resolve_template(template_name, tok), tok, 512, empty_think="prompt"
        ).dataset[0]
        expected = tok.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, enable_thinking=False
        )
        assert row["prompt_ids"] == expected["input_ids"]
