"""The run report: token counting, the plot, and report.json after a run, an error and Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from loguru import logger
from transformers import TrainerCallback, TrainerState

import component.training.report as report
from component.cli import main_train
from component.data.template import IGNORE_INDEX
from tests.conftest import TINY_SFT, base_config, write_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
X = IGNORE_INDEX


def test_counts_padded_batch():
    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
        "labels": torch.tensor([[X, 6, 7, X, X], [X, X, 7, 8, 9]]),
    }
    counter = report.TokenCounter()
    counter.add(batch)
    counter.add(batch)
    counter.flush()
    assert (counter.examples, counter.real_tokens, counter.supervised_tokens) == (4, 16, 10)


def test_counts_padding_free_batch():
    # Two examples packed in one row, no attention_mask: position_ids restart at 0.
    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 5, 6, 7, 8]]),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 3]]),
        "labels": torch.tensor([[X, 6, 7, X, X, 7, 8]]),
    }
    assert [int(x) for x in report.batch_counts(batch)] == [2, 7, 4]
    batch["cu_seq_lens_q"] = torch.tensor([0, 3, 7], dtype=torch.int32)
    assert [int(x) for x in report.batch_counts(batch)] == [2, 7, 4]


def test_plot_and_loss_summary(tmp_path):
    history = [{"loss": 3.1 - 0.1 * s, "learning_rate": 1e-3, "step": s} for s in range(1, 11)]
    history += [{"eval_loss": 2.5, "step": 5}, {"eval_loss": 2.2, "step": 10}, {"train_loss": 2.6, "step": 10}]
    summary = report.loss_summary(history)
    assert summary["first_loss"] == pytest.approx(3.0) and summary["final_loss"] == pytest.approx(2.1)
    assert summary["best_loss_step"] == 10 and summary["best_eval_loss"] == 2.2
    # The mean of every logged loss (3.0 ... 2.1), not the Trainer's train_loss (2.6, the resumed part only).
    assert summary["mean_train_loss"] == pytest.approx(2.55)
    path = report.plot_losses(history, tmp_path / "loss.png")
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000
    assert report.plot_losses([{"learning_rate": 1.0, "step": 1}], tmp_path / "none.png") is None


def test_trainer_without_the_batch_hook_reports_no_counts():
    # A trainer that never calls observe_batch (e.g. trl's) gets None, not a false 0 tokens.
    callback = report.RunReportCallback()
    args = SimpleNamespace(output_dir="unused", num_train_epochs=1, device="cpu", world_size=1)
    callback.on_train_begin(args, TrainerState(global_step=0, max_steps=4), None)
    callback.trainer_state.global_step = 2
    got = callback.report("running")
    assert got["real_tokens_seen"] is None and got["real_tokens_per_second"] is None
    callback.tokens.add({"input_ids": torch.ones(1, 3, dtype=torch.long)})
    callback.tokens.flush()
    assert callback.report("running")["real_tokens_seen"] == 3


def test_only_the_main_process_writes(tmp_path, monkeypatch):
    callback = report.RunReportCallback()
    callback.trainer_args = type("Args", (), {"output_dir": str(tmp_path / "out")})()
    monkeypatch.setattr(report, "is_main_process", lambda: False)
    assert callback.write("running") is None
    assert not (tmp_path / "out").exists()


def _config(tmp_path, model_dir, **overrides):
    values = base_config(model_dir, tmp_path / "out", max_prompt_length=64, **overrides)
    return write_config(tmp_path / "config.json", **values)


class _ReadAtSave(TrainerCallback):
    """Runs after the report callback; records the report each save left behind."""

    def __init__(self):
        self.seen = []

    def on_save(self, args, state, control, **kwargs):
        path = Path(args.output_dir) / report.REPORT_FILE
        got = json.loads(path.read_text())
        self.seen.append((got["status"], got["global_step"], path.with_name(report.PLOT_FILE).is_file()))


def test_report_after_a_run(tmp_path, tiny_llama_dir):
    at_save = _ReadAtSave()
    extra = [at_save]
    # 4 steps x batch 2 = exactly one epoch of the 8 examples: every token is seen once.
    config = _config(
        tmp_path,
        tiny_llama_dir,
        max_steps=4,
        save_steps=2,
        eval_file=str(TINY_SFT),
        eval_strategy="steps",
        eval_steps=2,
    )
    assert main_train(["--train_args_file", str(config)], extra) == 0
    out = tmp_path / "out"
    data = json.loads((out / "data_summary.json").read_text())
    got = json.loads((out / report.REPORT_FILE).read_text())
    assert got["status"] == report.STATUS_FINISHED
    assert (got["global_step"], got["max_steps"], got["epoch"]) == (4, 4, 1.0)
    assert got["examples_seen"] == got["train_examples"] == data["examples"] == 8
    assert got["real_tokens_seen"] == data["tokens"]
    assert got["supervised_tokens_seen"] == data["supervised_tokens"]
    assert got["real_tokens_per_second"] > 0 and got["wall_time_s"] > 0 and got["peak_rss_mib"] > 0
    assert got["final_loss"] < got["first_loss"] and got["best_loss"] <= got["final_loss"]
    assert got["final_eval_loss"] is not None and got["best_eval_loss"] <= got["final_eval_loss"]
    assert {"torch", "transformers", "peft"} <= {k for k, v in got["versions"].items() if v}
    assert (out / report.PLOT_FILE).read_bytes()[:8] == PNG_MAGIC
    assert "tokens_per_second=" in (out / "train.log").read_text()
    assert at_save.seen == [("running", 2, True), ("running", 4, True)]


class _Fail(TrainerCallback):
    def __init__(self, exc: BaseException, at_step: int):
        self.exc, self.at_step = exc, at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise self.exc


@pytest.mark.parametrize(
    "exc, status",
    [(RuntimeError("disk on fire"), "error: RuntimeError: disk on fire"), (KeyboardInterrupt(), "interrupted")],
)
def test_report_when_a_run_stops(tmp_path, tiny_llama_dir, exc, status):
    extra = [_Fail(exc, at_step=2)]
    config = _config(tmp_path, tiny_llama_dir, max_steps=6)
    with pytest.raises(type(exc)):
        main_train(["--train_args_file", str(config)], extra)
    got = json.loads((tmp_path / "out" / report.REPORT_FILE).read_text())
    assert got["status"] == status
    assert got["global_step"] == 2 and got["examples_seen"] == 4 and got["final_loss"] is not None
    assert (tmp_path / "out" / report.PLOT_FILE).is_file()


class _Signal(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)


def test_report_when_a_signal_stops_the_run(tmp_path, tiny_llama_dir):
    extra = [_Signal()]
    config = _config(tmp_path, tiny_llama_dir, max_steps=6)
    assert main_train(["--train_args_file", str(config)], extra) == 128 + signal.SIGTERM
    got = json.loads((tmp_path / "out" / report.REPORT_FILE).read_text())
    assert got["status"] == "interrupted by SIGTERM; checkpoint saved"
    assert got["global_step"] == 2 and got["examples_seen"] == 4


def test_a_resumed_run_reports_the_whole_run(tmp_path, tiny_llama_dir):
    extra = [_Fail(RuntimeError("node lost"), 3)]
    config = _config(tmp_path, tiny_llama_dir, max_steps=4, save_steps=2)
    with pytest.raises(RuntimeError):
        main_train(["--train_args_file", str(config)], extra)
    assert main_train(["--train_args_file", str(config), "--resume_from_checkpoint", "true"]) == 0
    out = tmp_path / "out"
    data = json.loads((out / "data_summary.json").read_text())
    got = json.loads((out / report.REPORT_FILE).read_text())
    # Steps 1-2 counted before the checkpoint, 3-4 after the resume: one whole epoch.
    assert (got["status"], got["resumed_at_step"], got["global_step"]) == ("finished", 2, 4)
    assert got["examples_seen"] == 8 and got["real_tokens_seen"] == data["tokens"]
    assert got["supervised_tokens_seen"] == data["supervised_tokens"]
    # The mean covers the steps logged before the checkpoint too (restored with its trainer_state).
    history = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    losses = {e["step"]: e["loss"] for e in history if "loss" in e}
    assert sorted(losses) == [1, 2, 3, 4]
    assert got["mean_train_loss"] == pytest.approx(sum(losses.values()) / 4)
    assert got["first_loss"] == losses[1]


def test_no_logged_loss_writes_the_report_and_says_why_there_is_no_plot(tmp_path):
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(str(m)), level="WARNING")
    try:
        callback = report.RunReportCallback()
        args = SimpleNamespace(
            output_dir=str(tmp_path / "out"), num_train_epochs=1, device="cpu", world_size=1, logging_steps=50
        )
        callback.on_train_begin(args, TrainerState(global_step=0, max_steps=4), None)
        callback.trainer_state.global_step = 2
        assert callback.write("running") == tmp_path / "out" / report.REPORT_FILE
        callback.write("running")
    finally:
        logger.remove(sink)
    assert json.loads((tmp_path / "out" / report.REPORT_FILE).read_text())["final_loss"] is None
    assert not (tmp_path / "out" / report.PLOT_FILE).exists()
    warned = [m for m in messages if report.PLOT_FILE in m]
    assert len(warned) == 1 and "no training or eval loss was logged by step 2" in warned[0]
    assert "logging_steps=50" in warned[0]


def test_tensorboard_gets_the_token_rate_and_counts(tmp_path, tiny_llama_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = _config(tmp_path, tiny_llama_dir, max_steps=3, report_to="tensorboard")
    assert main_train(["--train_args_file", str(config)]) == 0
    got = json.loads((tmp_path / "out" / report.REPORT_FILE).read_text())
    (events,) = {p.parent for p in (tmp_path / "out" / "runs").rglob("events.out.tfevents.*")}
    scalars = EventAccumulator(str(events)).Reload()
    steps = {key: [e.step for e in scalars.Scalars(f"train/{key}")] for key in ("loss", *report.COUNT_KEYS)}
    assert all(logged == [1, 2, 3] for logged in steps.values()), steps
    rates = scalars.Scalars(f"train/{report.TOKENS_PER_SECOND_KEY}")
    assert len(rates) == 3 and all(e.value > 0 for e in rates)
    last = {key: scalars.Scalars(f"train/{key}")[-1].value for key in report.COUNT_KEYS}
    # The counts of the whole run, as report.json has them; they only grow.
    assert last == {key: got[key] for key in report.COUNT_KEYS}
    supervised = [e.value for e in scalars.Scalars("train/supervised_tokens_seen")]
    assert supervised == sorted(supervised) and supervised[0] > 0
