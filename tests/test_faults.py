"""Faults during a run: signals, non-finite numbers, and the security rules for inputs and outputs.

- SIGTERM/SIGINT: finish the step, save a checkpoint, say how to resume, exit 128 + signal;
  the checkpoint resumes to the uninterrupted run's weights. A second signal exits at once.
- NaN loss: the run stops with the step, learning rate and likely causes, keeping the last
  good checkpoint; `max_nonfinite_steps` skips that many bad steps first.
- Security: tokens from the environment never reach logs or outputs, weights are saved as
  safetensors, pickled weights are refused unless allowed, inputs are only read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from loguru import logger
from transformers import TrainerCallback, TrainerControl, TrainerState

from component.config import CONFIG_FILE_FLAG
from component.errors import ConfigError
from component.model.weights import pickle_weight_files
from component.training.checkpoints import RESUME_FLAG, checkpoint_problems, newest_complete, resume_command
from component.training.outputs import read_meta
from component.training.safety import SIGNAL_EXIT_BASE, InterruptCallback, NonFiniteError
from tests.conftest import ROOT, TINY_SFT, base_config, dpo_config, write_config
from tests.runs import (
    SAVE_STEPS,
    STEPS,
    SUBPROCESS_TIMEOUT_S,
    assert_same_run,
    fault_command,
    final_weights,
    load_config,
    load_values,
    reference_run,
    run_config,
    run_with_fault,
    subprocess_env,
    train,
    train_in_process,
)

SIGTERM_EXIT = SIGNAL_EXIT_BASE + signal.SIGTERM
SECRET = "hf_fakeSECRETtoken0123456789"


@pytest.fixture
def log_lines():
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(str(m)), level="DEBUG")
    yield messages
    logger.remove(sink)


def assert_stopped_with_checkpoint(out: Path, step: int) -> None:
    assert checkpoint_problems(out / f"checkpoint-{step}") == []
    assert newest_complete(out).path.name == f"checkpoint-{step}"
    assert not (out / "adapter_model.safetensors").exists()  # no final save
    assert read_meta(str(out))["finished"] is False


# ---------------------------------------------------------------- signals


def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path, tiny_llama_dir, tmp_path_factory):
    """The printed resume command, run as printed from the repo root, finishes the interrupted run."""
    out = tmp_path / "out"
    # The file names another output_dir and fewer steps: only with the command line's overrides
    # does the resumed run find the checkpoint and reach the uninterrupted run's weights.
    config = run_config(tmp_path, tiny_llama_dir, tmp_path / "file-out", max_steps=5)
    overrides = ["--output_dir", str(out), "--max_steps", str(STEPS)]
    stopped = run_with_fault("term", 4, config, *overrides)  # SIGTERM arrives while step 4 runs
    assert stopped.returncode == SIGTERM_EXIT, stopped.stderr[-3000:]
    assert "stopped by SIGTERM at step 4" in stopped.stderr
    command = shlex.join(["python", "train.py", CONFIG_FILE_FLAG, str(config), *overrides, RESUME_FLAG, "true"])
    assert f"Resume with:\n  {command}\n" in stopped.stderr
    assert_stopped_with_checkpoint(out, 4)
    python_first = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    resumed = subprocess.run(
        command,
        shell=True,
        cwd=ROOT,
        env=subprocess_env(PATH=python_first),
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and not (tmp_path / "file-out").exists()
    assert_same_run(reference_run("lora", tiny_llama_dir, tmp_path_factory), out, resumed_from=4)


def test_resume_command_repeats_the_overrides_quoted_without_an_earlier_resume_flag(tmp_path, tiny_llama_dir):
    path = write_config(tmp_path / "c.json", **base_config(tiny_llama_dir, tmp_path / "out", max_prompt_length=64))
    argv = [CONFIG_FILE_FLAG, str(path), "--resume_from_checkpoint", "checkpoint-3", "--learning_rate=0.5"]
    argv += ["--output_dir", "my out", "--resume_from_checkpoint=true", "--bf16"]
    assert resume_command(load_config(argv)) == (
        f"python train.py {CONFIG_FILE_FLAG} {path} --learning_rate=0.5 --output_dir 'my out' --bf16 {RESUME_FLAG} true"
    )


def test_sigterm_from_outside_while_training(tmp_path, tiny_llama_dir, tmp_path_factory):
    """A scheduler's SIGTERM at an arbitrary moment of training."""
    out = tmp_path / "out"
    config = run_config(tmp_path, tiny_llama_dir, out)
    proc = subprocess.Popen(
        fault_command("slow", 1, config),
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        log = out / "train.log"
        while proc.poll() is None and not (log.is_file() and "step 2: loss" in log.read_text()):
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == SIGTERM_EXIT, stderr[-3000:]
    stopped_at = newest_complete(out).path.name
    step = int(stopped_at.split("-")[1])
    assert 2 <= step < STEPS and f"stopped by SIGTERM at step {step}" in stderr
    assert_stopped_with_checkpoint(out, step)
    train_in_process(config, "--resume_from_checkpoint", "true")
    assert_same_run(reference_run("lora", tiny_llama_dir, tmp_path_factory), out, resumed_from=step)


def test_second_signal_exits_at_once(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    stopped = run_with_fault("term2", SAVE_STEPS, run_config(tmp_path, tiny_llama_dir, out))
    assert stopped.returncode == SIGTERM_EXIT, stopped.stderr[-3000:]
    assert "second signal (SIGTERM): exiting now, without saving" in stopped.stderr
    assert newest_complete(out).path is None  # it did not wait for the step's save


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_asks_for_save_and_stop(sig, log_lines):
    callback = InterruptCallback()
    args, state, control = SimpleNamespace(device="cpu"), TrainerState(global_step=5, max_steps=9), TrainerControl()
    callback.on_step_end(args, state, control)
    assert not control.should_save and not control.should_training_stop
    callback.handle(sig)
    callback.on_step_end(args, state, control)
    assert control.should_save and control.should_training_stop
    assert callback.interrupted(state) and callback.stopped_at == 5
    assert any(f"received {sig.name}: finishing the current step" in m for m in log_lines)


def test_signal_handlers_are_restored_after_training(tmp_path, tiny_llama_dir):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(NonFiniteError):
        train_in_process(
            run_config(tmp_path, tiny_llama_dir, tmp_path / "out", max_steps=3), callbacks=[NaNAtSteps({2})]
        )  # ends on an error
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


# ---------------------------------------------------------------- non-finite numbers


class NaNAtSteps(TrainerCallback):
    """Makes the embeddings NaN during the given steps: the loss and every gradient become NaN."""

    def __init__(self, steps: set[int]):
        self.steps, self.hook = steps, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 in self.steps:
            self.hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: o * float("nan"))

    def on_step_end(self, args, state, control, **kwargs):
        if self.hook is not None:
            self.hook.remove()
            self.hook = None


def test_nan_loss_stops_with_step_lr_and_causes_keeping_last_checkpoint(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError) as err:
        train_in_process(run_config(tmp_path, tiny_llama_dir, out), callbacks=[NaNAtSteps({SAVE_STEPS + 2})])
    text = str(err.value)
    assert f"stopped at step {SAVE_STEPS + 2}" in text and "learning rate" in text
    assert "NaN or infinite" in text and "bf16" in text and "learning rate too high" in text
    assert f"checkpoint-{SAVE_STEPS}" in text
    assert_stopped_with_checkpoint(out, SAVE_STEPS)
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{SAVE_STEPS}"]


def test_nonfinite_steps_can_be_skipped(tmp_path, tiny_llama_dir, log_lines):
    out = tmp_path / "out"
    train_in_process(
        run_config(tmp_path, tiny_llama_dir, out), "--max_nonfinite_steps", "2", callbacks=[NaNAtSteps({2, 5})]
    )
    skipped = [m for m in log_lines if "step skipped" in m]
    assert len(skipped) == 2 and "step 2:" in skipped[0] and "step 5:" in skipped[1]
    weights = final_weights(out)
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert read_meta(str(out))["finished"] is True


def test_nonfinite_beyond_the_allowance_stops(tmp_path, tiny_llama_dir):
    with pytest.raises(NonFiniteError, match="stopped at step 3"):
        train_in_process(
            run_config(tmp_path, tiny_llama_dir, tmp_path / "out"),
            "--max_nonfinite_steps",
            "1",
            callbacks=[NaNAtSteps({2, 3})],
        )


def test_exploding_learning_rate_is_caught(tmp_path, tiny_llama_dir):
    """No injected fault: a learning rate far too high drives the loss to NaN/inf."""
    config = run_config(
        tmp_path, tiny_llama_dir, tmp_path / "out", learning_rate=1e15, train_mode="full", lr_scheduler_type="constant"
    )
    with pytest.raises(NonFiniteError, match="stopped at step 2 \\(learning rate 1e\\+15\\)"):
        train_in_process(config)


# ---------------------------------------------------------------- security


def digest(path: Path) -> tuple[str, float]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime


def test_secrets_stay_out_of_outputs_and_logs_and_inputs_are_only_read(
    tmp_path, tiny_llama_dir, monkeypatch, log_lines, capfd
):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY"):
        monkeypatch.setenv(name, SECRET)
    out = tmp_path / "out"
    config = run_config(tmp_path, tiny_llama_dir, out, max_steps=SAVE_STEPS, report_to="tensorboard")
    inputs = {p: digest(p) for p in (config, TINY_SFT)}
    train_in_process(config)
    assert {p: digest(p) for p in inputs} == inputs  # data and config only read
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any("events.out.tfevents" in p.name for p in files)  # the TensorBoard log is searched too
    leaked = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert leaked == []
    captured = capfd.readouterr()
    assert SECRET not in captured.out + captured.err and not any(SECRET in m for m in log_lines)
    # Weights are safetensors; no pickled weight file is written anywhere.
    assert (out / "adapter_model.safetensors").is_file()
    assert pickle_weight_files(out) == []


def test_tokens_in_a_config_are_refused(tmp_path, tiny_llama_dir):
    path = write_config(
        tmp_path / "c.json", **base_config(tiny_llama_dir, tmp_path / "out", max_prompt_length=64, hub_token=SECRET)
    )
    with pytest.raises(ConfigError, match="key 'hub_token'.*HF_TOKEN") as err:
        load_values([CONFIG_FILE_FLAG, str(path)])
    assert not (tmp_path / "out").exists()
    assert SECRET not in str(err.value)


def test_pickled_model_weights_are_refused_unless_allowed(tmp_path, tiny_llama_dir):
    model_dir = tmp_path / "pickled-model"
    model_dir.mkdir()
    for f in tiny_llama_dir.iterdir():
        if f.suffix != ".safetensors":
            (model_dir / f.name).write_bytes(f.read_bytes())
    torch.save({"w": torch.zeros(2)}, model_dir / "pytorch_model.bin")
    path = write_config(tmp_path / "c.json", **base_config(model_dir, tmp_path / "out", max_prompt_length=64))
    with pytest.raises(ConfigError, match="pytorch_model.bin.*allow_pickle_weights"):
        load_values([CONFIG_FILE_FLAG, str(path)])
    load_values([CONFIG_FILE_FLAG, str(path), "--allow_pickle_weights", "true"])  # the user's informed choice


def test_remote_code_is_off_unless_set(tmp_path, tiny_llama_dir):
    path = write_config(tmp_path / "c.json", **base_config(tiny_llama_dir, tmp_path / "out", max_prompt_length=64))
    assert load_config([CONFIG_FILE_FLAG, str(path)]).model.trust_remote_code is False
    saved = json.loads(json.dumps(load_config([CONFIG_FILE_FLAG, str(path)]).to_dict(), default=str))
    assert saved["trust_remote_code"] is False and saved["allow_pickle_weights"] is False
    assert "hub_token" not in saved


def test_nan_dpo_loss_stops_the_run_like_sft(tmp_path, tiny_llama_dir):
    # trl's DPOTrainer mixes in RunHooks: the guard sees its loss, and names it, before the gradients.
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(ROOT.joinpath("data", "dpo_sample.jsonl").read_text().splitlines(keepends=True)[:8]))
    values = dpo_config(tiny_llama_dir, tmp_path / "out", pairs, max_steps=3)
    with pytest.raises(NonFiniteError, match="step 2 .*the loss became NaN or infinite"):
        train(values, callbacks=[NaNAtSteps({2})])
