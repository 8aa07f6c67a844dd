"""The run report: `report.json` and `loss.png` in the output folder.

`RunReportCallback` counts what a run has seen (steps, examples, real and
supervised tokens), times it, and tracks peak memory. It writes the report
at every save and at the end of training, and `report_on_exit` writes it once
more when a run stops on an error or a signal, so a failed run still says how
far it got. Only the main process writes.

Tokens are counted from the batches themselves (`observe_batch`, called by
`FinetuneTrainer.training_step` for each micro-batch): real tokens are the
ones `attention_mask` marks, or, for padding-free batches (no mask; packed
rows whose `position_ids` restart at 0), every token; supervised tokens are
labels other than IGNORE_INDEX. Counts are summed over processes once per
optimizer step, so the report covers the whole run, not one rank. Every
training record of the log carries the rate and the counts so far
(`log_metrics`), so TensorBoard plots them too.

An online-RL run (GRPO) logs rewards at every step: report.json then has a
`rewards` section (`reward_summary`: first and last reward, and per step each
reward function's mean, the reward std, completion length, KL and clip ratio)
and `reward.png` plots them beside `loss.png`.

The plots use matplotlib's object API with the Agg canvas: no display, no
pyplot global state.
"""

from __future__ import annotations

import json
import platform
import resource
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch
from loguru import logger
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from component.data.template import IGNORE_INDEX
from component.ranks import is_main_process
from component.training.safety import SIGNAL_EXIT_BASE, TrainingInterrupted

REPORT_FILE = "report.json"
PLOT_FILE = "loss.png"
REWARD_PLOT_FILE = "reward.png"
REWARD_KEY = "reward"  # trl's GRPO: the weighted sum of the reward functions, mean over the step's completions
# What the per-step reward records keep from a log entry: these keys, and those under these prefixes.
REWARD_STEP_KEYS = ("reward", "reward_std", "completions/mean_length", "kl", "entropy")
REWARD_STEP_PREFIXES = ("rewards/", "clip_ratio/")
VERSIONED_PACKAGES = ("torch", "transformers", "peft", "accelerate", "trl", "datasets")
# ru_maxrss is KiB on Linux, bytes on macOS.
RSS_UNIT_BYTES = 1 if sys.platform == "darwin" else 1024
MIB = 1024**2
PLOT_SIZE_INCHES = (8, 4.5)
PLOT_DPI = 110

STATUS_RUNNING = "running"
STATUS_FINISHED = "finished"
STATUS_STOPPED = "stopped early"
STATUS_INTERRUPTED = "interrupted"

# What each training record of the log gets (`RunReportCallback.log_metrics`), named as in report.json.
TOKENS_PER_SECOND_KEY = "tokens_per_second"
COUNT_KEYS = ("examples_seen", "real_tokens_seen", "supervised_tokens_seen")


# ---------------------------------------------------------------- counting


def batch_counts(inputs: dict) -> tuple[int | torch.Tensor, int | torch.Tensor, int | torch.Tensor]:
    """(examples, real tokens, supervised tokens) in one micro-batch, as 0-d tensors or ints.

    Examples are sequences: a DPO pair counts as two (chosen and rejected), and its supervised
    tokens are those of both completions.

    Left as tensors so that counting a GPU batch does not wait for the GPU.
    """
    if isinstance(inputs.get("completion_mask"), torch.Tensor) and isinstance(inputs.get("prompt_mask"), torch.Tensor):
        # A generated batch (trl's GRPO): the prompts and their completions, which are what it learns from.
        completion = inputs["completion_mask"]
        return completion.shape[0], inputs["prompt_mask"].sum() + completion.sum(), completion.sum()
    input_ids = inputs.get("input_ids")
    labels = inputs.get("labels")
    mask = inputs.get("attention_mask")
    positions = inputs.get("position_ids")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        real = mask.sum()
        examples = mask.shape[0]
    elif isinstance(input_ids, torch.Tensor):
        real = input_ids.numel()
        examples = input_ids.shape[0] if input_ids.dim() > 1 else 1
        bounds = inputs.get("cu_seq_lens_q")
        if isinstance(bounds, torch.Tensor):  # padding-free with flash-attention boundaries
            examples = bounds.numel() - 1
        elif isinstance(positions, torch.Tensor):  # padding-free: a new example starts at position 0
            examples = (positions == 0).sum()
    else:
        return 0, 0, 0
    completion = inputs.get("completion_mask")  # preference batches (trl's DPO collator): no labels
    if isinstance(labels, torch.Tensor):
        supervised = (labels != IGNORE_INDEX).sum()
    elif isinstance(completion, torch.Tensor):
        supervised = (completion * mask).sum() if isinstance(mask, torch.Tensor) else completion.sum()
    else:
        supervised = 0
    return examples, real, supervised


class TokenCounter:
    """Running totals of examples, real tokens and supervised tokens seen in training."""

    def __init__(self):
        self.examples = 0
        self.real_tokens = 0
        self.supervised_tokens = 0
        self.batches = 0  # micro-batches seen; 0 when the trainer does not call observe_batch
        self._pending: list = []

    def add(self, inputs: dict) -> None:
        self._pending.append(batch_counts(inputs))
        self.batches += 1

    def flush(self, device: Optional[torch.device] = None) -> None:
        """Fold pending micro-batches into the totals, summed over processes when distributed."""
        local = torch.zeros(3, dtype=torch.int64, device=device)
        for counts in self._pending:
            local += torch.stack([torch.as_tensor(c, dtype=torch.int64, device=device) for c in counts])
        self._pending.clear()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(local)
        examples, real, supervised = local.tolist()
        self.examples += examples
        self.real_tokens += real
        self.supervised_tokens += supervised


# ---------------------------------------------------------------- the report


def peak_memory() -> dict[str, Optional[float]]:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RSS_UNIT_BYTES
    out: dict[str, Optional[float]] = {"peak_rss_mib": round(rss / MIB, 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_gpu_allocated_mib"] = round(torch.cuda.max_memory_allocated() / MIB, 1)
        out["peak_gpu_reserved_mib"] = round(torch.cuda.max_memory_reserved() / MIB, 1)
    return out


def package_versions() -> dict[str, Optional[str]]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _step_weighted_mean(losses: list[tuple[int, float]]) -> Optional[float]:
    """Mean loss per step: each logged loss averages the steps since the previous log, so it weighs that many."""
    if not losses:
        return None
    weights = [step - previous for (previous, _), (step, _) in zip([(0, 0.0), *losses], losses, strict=False)]
    if sum(weights) <= 0:
        return sum(x for _, x in losses) / len(losses)
    return sum(w * x for w, (_, x) in zip(weights, losses, strict=True)) / sum(weights)


def loss_summary(log_history: list[dict]) -> dict[str, Any]:
    """First, final, best and mean training loss, and eval loss, from the Trainer's log history.

    The mean is over every logged training loss of the whole run. Not the Trainer's `train_loss`:
    after a resume that averages only the steps since the checkpoint, whereas the log history
    (restored from the checkpoint's trainer_state.json) holds the earlier steps too.
    """
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    out: dict[str, Any] = {
        "first_loss": train[0][1] if train else None,
        "final_loss": train[-1][1] if train else None,
        "best_loss": min(x for _, x in train) if train else None,
        "best_loss_step": min(train, key=lambda t: t[1])[0] if train else None,
        "mean_train_loss": _step_weighted_mean(train),
        "final_eval_loss": evals[-1][1] if evals else None,
        "best_eval_loss": min(x for _, x in evals) if evals else None,
    }
    return out


def reward_steps(log_history: list[dict]) -> list[dict]:
    """Per logged step of an RL run: the reward, each function's mean and std, and what moves with them."""
    return [
        {"step": e["step"]}
        | {k: v for k, v in e.items() if k in REWARD_STEP_KEYS or k.startswith(REWARD_STEP_PREFIXES)}
        for e in log_history
        if REWARD_KEY in e and "step" in e
    ]


def reward_summary(log_history: list[dict]) -> Optional[dict[str, Any]]:
    """The `rewards` section of report.json; None for a run that logs no reward."""
    steps = reward_steps(log_history)
    if not steps:
        return None
    return {"first_reward": steps[0][REWARD_KEY], "final_reward": steps[-1][REWARD_KEY], "per_step": steps}


def plot_rewards(log_history: list[dict], path: Path) -> Optional[Path]:
    """The reward and each reward function's mean against step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    steps = reward_steps(log_history)
    if not steps:
        return None
    fig = Figure(figsize=PLOT_SIZE_INCHES, dpi=PLOT_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = [s["step"] for s in steps]
    marker = "." if len(steps) < 50 else None
    ax.plot(x, [s[REWARD_KEY] for s in steps], color="black", marker=marker, label="reward (weighted sum)")
    functions = sorted({k for s in steps for k in s if k.startswith("rewards/") and k.endswith("/mean")})
    if len(functions) > 1:
        for key in functions:
            ax.plot(x, [s.get(key) for s in steps], alpha=0.7, label=key[len("rewards/") : -len("/mean")])
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("mean reward")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(f"{path.parent.name}: reward by step")
    fig.tight_layout()
    fig.savefig(path)
    return path


def write_json(path: Path, data: dict) -> None:
    # Write then rename, so a reader (or a crash mid-write) never sees half a file.
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def plot_losses(log_history: list[dict], path: Path) -> Optional[Path]:
    """Training loss (and eval loss) against step, learning rate on a second axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    rates = [(e["step"], e["learning_rate"]) for e in log_history if "learning_rate" in e and "step" in e]
    if not train and not evals:
        return None
    fig = Figure(figsize=PLOT_SIZE_INCHES, dpi=PLOT_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(
            *zip(*train, strict=True), color="tab:blue", marker="." if len(train) < 50 else None, label="train loss"
        )
    if evals:
        ax.plot(*zip(*evals, strict=True), color="tab:orange", marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if rates:
        lr_ax = ax.twinx()
        lr_ax.plot(*zip(*rates, strict=True), color="tab:green", linestyle="--", alpha=0.7, label="learning rate")
        lr_ax.set_ylabel("learning rate")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        more_handles, more_labels = lr_ax.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, loc="upper right")
    ax.set_title(f"{path.parent.name}: loss by step")
    fig.tight_layout()
    fig.savefig(path)
    return path


class RunReportCallback(TrainerCallback, ExportableState):
    """Counts, times and reports a training run; see the module docstring.

    Its counts travel in each checkpoint's trainer_state.json (ExportableState), so a
    resumed run reports the whole run, not only the part since the resume."""

    def __init__(self):
        self.tokens = TokenCounter()
        self.earlier_wall_time = 0.0  # seconds of training before the checkpoint resumed from
        self.started: Optional[float] = None
        self.resumed_at_step = 0
        self.started_at: Optional[str] = None
        self.train_examples: Optional[int] = None
        self.trainer_args = None
        self.trainer_state = None
        self._warned_no_plot = False

    def observe_batch(self, inputs: dict) -> None:
        """Count a training micro-batch; called by the trainer (RunHooks) for each one."""
        self.tokens.add(inputs)

    def tokens_per_second(self) -> Optional[float]:
        elapsed = self.elapsed()
        return self.tokens.real_tokens / elapsed if elapsed and self.tokens.batches else None

    def elapsed(self) -> Optional[float]:
        """Training wall time so far, earlier sessions of a resumed run included."""
        if self.started is None:
            return None
        return self.earlier_wall_time + time.perf_counter() - self.started

    def log_metrics(self) -> dict[str, float | int]:
        """The token rate and counts so far, for a training record of the log (RunHooks.log puts them in every
        one, so TensorBoard and the log history have them); empty where batches are not counted."""
        rate = self.tokens_per_second()
        if rate is None:
            return {}
        counts = (self.tokens.examples, self.tokens.real_tokens, self.tokens.supervised_tokens)
        return {TOKENS_PER_SECOND_KEY: round(rate, 1), **dict(zip(COUNT_KEYS, counts, strict=True))}

    def state(self) -> dict:
        counts = {
            "examples": self.tokens.examples,
            "real_tokens": self.tokens.real_tokens,
            "supervised_tokens": self.tokens.supervised_tokens,
            "batches": self.tokens.batches,
            "wall_time_s": self.elapsed() or 0.0,
        }
        return {"args": {}, "attributes": {"saved_counts": counts}}

    def resume_counts(self, state) -> None:
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        counts = saved.get("attributes", {}).get("saved_counts") if isinstance(saved, dict) else None
        if state.global_step > 0 and counts:
            self.tokens.examples = counts["examples"]
            self.tokens.real_tokens = counts["real_tokens"]
            self.tokens.supervised_tokens = counts["supervised_tokens"]
            self.tokens.batches = counts.get("batches", 0)
            self.earlier_wall_time = counts["wall_time_s"]

    # -- events

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.trainer_args, self.trainer_state = args, state
        self.started = time.perf_counter()
        self.started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.resume_counts(state)
        self.resumed_at_step = state.global_step
        dataset = getattr(train_dataloader, "dataset", None)
        try:
            self.train_examples = len(dataset) if dataset is not None else None
        except TypeError:  # an iterable dataset has no length
            self.train_examples = None

    def on_step_end(self, args, state, control, **kwargs):
        self.tokens.flush(args.device)

    def on_save(self, args, state, control, **kwargs):
        self.write(STATUS_RUNNING)

    def on_train_end(self, args, state, control, **kwargs):
        done = state.max_steps and state.global_step >= state.max_steps
        self.write(STATUS_FINISHED if done else STATUS_STOPPED)

    # -- writing

    def report(self, status: str) -> dict[str, Any]:
        state, args = self.trainer_state, self.trainer_args
        elapsed = self.elapsed()
        history = state.log_history if state is not None else []
        counted = self.tokens.batches > 0
        return {
            "status": status,
            "started_at": self.started_at,
            "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "wall_time_s": round(elapsed, 2) if elapsed is not None else None,
            "global_step": state.global_step if state else 0,
            "max_steps": state.max_steps if state else None,
            "resumed_at_step": self.resumed_at_step,
            "epoch": round(state.epoch, 4) if state and state.epoch is not None else None,
            "num_train_epochs": args.num_train_epochs if args else None,
            "train_examples": self.train_examples,
            # None where this trainer does not show its batches (observe_batch), rather than a false 0.
            "examples_seen": self.tokens.examples if counted else None,
            "real_tokens_seen": self.tokens.real_tokens if counted else None,
            "supervised_tokens_seen": self.tokens.supervised_tokens if counted else None,
            "real_tokens_per_second": round(self.tokens_per_second() or 0.0, 1) if counted and elapsed else None,
            **loss_summary(history),
            **({"rewards": rewards} if (rewards := reward_summary(history)) else {}),
            **peak_memory(),
            "device": str(args.device) if args else None,
            "world_size": args.world_size if args else 1,
            "versions": package_versions(),
        }

    def write(self, status: str) -> Optional[Path]:
        """Write report.json and loss.png to output_dir (main process only); never raises."""
        if (
            self.trainer_args is None
            or not is_main_process()
            or (self.trainer_state and not self.trainer_state.is_world_process_zero)
        ):
            return None
        out = Path(self.trainer_args.output_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / REPORT_FILE, self.report(status))
            history = self.trainer_state.log_history if self.trainer_state else []
            plotted = plot_losses(history, out / PLOT_FILE)
            plot_rewards(history, out / REWARD_PLOT_FILE)
        except Exception as exc:  # a report must never be the reason a run fails
            logger.warning(f"could not write the run report to {out}: {exc}")
            return None
        if plotted is None and not self._warned_no_plot:
            self._warned_no_plot = True  # once: a report is written at every save
            logger.warning(
                f"no {PLOT_FILE} in {out}: no training or eval loss was logged by step "
                f"{self.trainer_state.global_step if self.trainer_state else 0} (one is logged every "
                f"logging_steps={self.trainer_args.logging_steps} steps, and at step 1 with logging_first_step)"
            )
        return out / REPORT_FILE


def describe_exit(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return STATUS_INTERRUPTED
    if isinstance(exc, TrainingInterrupted):  # stopped by a signal after saving a checkpoint
        try:
            name = signal.Signals(exc.exit_code - SIGNAL_EXIT_BASE).name
        except ValueError:
            name = "a signal"
        return f"{STATUS_INTERRUPTED} by {name}; checkpoint saved"
    if isinstance(exc, SystemExit):
        return f"{STATUS_INTERRUPTED} (exit {exc.code})"
    return f"error: {type(exc).__name__}: {exc}"


@contextmanager
def report_on_exit(report: RunReportCallback) -> Iterator[None]:
    """Around `trainer.train()`: if training raises (an error, Ctrl-C, a signal turned
    into an exception), write the report with that status before the exception goes on."""
    try:
        yield
    except BaseException as exc:
        written = report.write(describe_exit(exc))
        if written:
            logger.info(f"run report written to {written}")
        raise
