"""Checkpoints: marking them complete, checking them, and choosing one to resume from.

transformers' Trainer writes `checkpoint-N/` in place, file by file, so a process
killed while saving leaves a folder that looks like a checkpoint but is not one.
`FinetuneTrainer` therefore writes `checkpoint_complete.json` (every file with its
size) only after the whole checkpoint is on disk, on every rank. A checkpoint is
complete when that marker is there, every file it lists has the recorded size and
each safetensors file opens with safetensors' own checks. Resuming never takes an
incomplete checkpoint: `resume_from_checkpoint: true` skips it, with a warning, in
favour of the newest complete one.

`resolve_resume(config)` turns the config's `resume_from_checkpoint` into a path:
`true` is the newest complete checkpoint in output_dir, a string is that
checkpoint, and absent (or false) with checkpoints already in output_dir is an
error that says how to resume or how to start fresh.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from loguru import logger
from safetensors import SafetensorError, safe_open
from transformers import TrainerCallback
from transformers.trainer_utils import rotate_checkpoints

from component.config import CONFIG_FILE_FLAG, RESOLVED_CONFIG_NAME
from component.errors import ConfigError
from component.model.weights import pickle_problem

CHECKPOINT_PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR
CHECKPOINT_PATTERN = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")
COMPLETE_MARKER = "checkpoint_complete.json"
TRAINER_STATE_FILE = "trainer_state.json"
SAFETENSORS_SUFFIX = ".safetensors"
RESUME_FLAG = "--resume_from_checkpoint"
# Settings that may change between a run and its resumption without changing what it computes.
RESUME_NEUTRAL_KEYS = frozenset(
    {
        "resume_from_checkpoint",
        "overwrite_output_dir",
        "config_file",
        "max_nonfinite_steps",
        "allow_pickle_weights",
        "output_dir",
        "run_name",  # a run folder may be moved before it is resumed
        "logging_dir",
        "logging_steps",
        "save_steps",
        "save_total_limit",
        "report_to",
        "disable_tqdm",
        "tokenize_num_workers",
        "dataloader_num_workers",
        "eval_steps",
        "eval_file",
    }
)


def checkpoint_step(path: Path) -> Optional[int]:
    match = CHECKPOINT_PATTERN.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """`checkpoint-N` folders in output_dir, oldest step first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def _file_sizes(folder: Path) -> dict[str, int]:
    return {
        str(f.relative_to(folder)): f.stat().st_size
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.name != COMPLETE_MARKER
    }


def mark_complete(folder: str | Path, step: int) -> Path:
    """Record every file of a fully written checkpoint; written last, atomically."""
    folder = Path(folder)
    marker = folder / COMPLETE_MARKER
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"step": step, "files": _file_sizes(folder)}, indent=1) + "\n")
    os.replace(tmp, marker)  # a reader sees the whole marker or none
    return marker


def safetensors_problem(path: Path) -> Optional[str]:
    """Why a safetensors file is unusable (truncated, bad header), or None; reads the header only.

    safetensors' own open validates exactly what its loader will: the header
    parses, every tensor's offsets fit its dtype and shape, and the data covers
    the file to its last byte (so a truncated or extended file fails).
    """
    try:
        with safe_open(path, framework="pt"):
            return None
    except SafetensorError as exc:
        return f"{path.name} ({path.stat().st_size} bytes): {exc}"


def checkpoint_problems(folder: str | Path) -> list[str]:
    """What makes a checkpoint incomplete; empty when it can be resumed from."""
    folder = Path(folder)
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return [f"no {COMPLETE_MARKER}: the process most likely stopped while saving it"]
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return [f"{COMPLETE_MARKER} is unreadable"]
    problems = []
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{name} has {path.stat().st_size} bytes, {size} were written")
        elif name.endswith(SAFETENSORS_SUFFIX) and (problem := safetensors_problem(path)):
            problems.append(problem)
    if TRAINER_STATE_FILE not in files:
        problems.append(f"{TRAINER_STATE_FILE} is missing")
    return problems


class NewestCheckpoint(NamedTuple):
    path: Optional[Path]
    skipped: list[tuple[Path, list[str]]]  # newer, incomplete checkpoints passed over


def newest_complete(output_dir: str | Path) -> NewestCheckpoint:
    skipped = []
    for folder in reversed(list_checkpoints(output_dir)):
        problems = checkpoint_problems(folder)
        if not problems:
            return NewestCheckpoint(folder, skipped)
        skipped.append((folder, problems))
    return NewestCheckpoint(None, skipped)


def _warn_skipped(skipped: list[tuple[Path, list[str]]]) -> None:
    for folder, problems in skipped:
        logger.warning(f"skipping incomplete checkpoint {folder}: {'; '.join(problems)}")


def _fresh_start_problem(config, checkpoints: list[Path]) -> str:
    out = config.output_dir
    newest = newest_complete(out).path
    newest_text = f"the newest complete one is {newest.name}" if newest else "none of them is complete"
    return (
        f"{config.source}: key 'output_dir': {out!r} already holds checkpoints "
        f"({', '.join(p.name for p in checkpoints[-3:])}; {newest_text}). "
        f"To resume, set resume_from_checkpoint: true (or pass {RESUME_FLAG} true). To start fresh, choose "
        "another output_dir, or set overwrite_output_dir: true (its checkpoints are then deleted)."
    )


def _explicit_checkpoint(config, value: str) -> Path:
    path = Path(value)
    inside = Path(config.output_dir) / value
    if not path.is_dir() and inside.is_dir():
        path = inside  # `checkpoint-40` names a folder of output_dir
    if not path.is_dir():
        raise ConfigError(f"{config.source}: key 'resume_from_checkpoint': checkpoint folder {value!r} not found")
    problems = checkpoint_problems(path)
    if problems:
        newest = newest_complete(config.output_dir).path
        hint = f" The newest complete checkpoint is {newest}." if newest else ""
        raise ConfigError(
            f"{config.source}: key 'resume_from_checkpoint': {str(path)!r} is not a complete checkpoint: "
            f"{'; '.join(problems)}.{hint}"
        )
    return path


def changed_settings(config, training_args=None) -> list[str]:
    """Settings that differ from the run being resumed (its saved config), as `key: old -> new`."""
    saved_path = Path(config.output_dir) / RESOLVED_CONFIG_NAME
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, ValueError):
        return []
    now = json.loads(json.dumps(config.to_dict(training_args), default=str))
    return [
        f"{key}: {saved[key]!r} -> {now[key]!r}"
        for key in sorted(set(saved) & set(now))
        if saved[key] != now[key] and key not in RESUME_NEUTRAL_KEYS
    ]


def resolve_resume(config, training_args=None) -> Optional[str]:
    """The checkpoint to resume from, or None for a fresh run; raises ConfigError with the way out."""
    value = config.method.resume_from_checkpoint
    out = config.output_dir
    checkpoints = list_checkpoints(out)
    if value is None or value is False:
        if checkpoints and not config.method.overwrite_output_dir:
            raise ConfigError(_fresh_start_problem(config, checkpoints))
        return None
    if value is True:
        newest = newest_complete(out)
        _warn_skipped(newest.skipped)
        if newest.path is None:
            found = (
                f"its checkpoints are all incomplete ({len(checkpoints)})" if checkpoints else "it holds no checkpoint"
            )
            raise ConfigError(
                f"{config.source}: key 'resume_from_checkpoint': nothing to resume in {out!r}: {found}. "
                "Remove resume_from_checkpoint to start a new run."
            )
        path = newest.path
    else:
        path = _explicit_checkpoint(config, value)
    problem = pickle_problem(path, "checkpoint", config.model.allow_pickle_weights)
    if problem:
        raise ConfigError(f"{config.source}: key 'resume_from_checkpoint': {problem}")
    changes = changed_settings(config, training_args)
    if changes:
        logger.warning(
            "resuming with settings that differ from the interrupted run, so it will not reproduce it: "
            + "; ".join(changes[:10])
        )
    logger.info(f"resuming from {path} (step {checkpoint_step(path)})")
    return str(path)


def remove_checkpoints(output_dir: str | Path) -> None:
    """Delete an earlier run's checkpoints before a fresh run that overwrites output_dir,
    so that a later `resume_from_checkpoint: true` cannot pick one of them."""
    for folder in list_checkpoints(output_dir):
        logger.warning(f"overwrite_output_dir: deleting the earlier run's {folder}")
        shutil.rmtree(folder)


def flag_groups(argv: Sequence[str]) -> list[list[str]]:
    """argv cut into flags, each with its value: `--key value`, `--key=value` or a bare `--flag`
    (grouped as component/config/parse.py's split_cli reads them)."""
    groups: list[list[str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        takes_next = arg.startswith("--") and "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--")
        groups.append(list(argv[i : i + 1 + takes_next]))
        i += 1 + takes_next
    return groups


def resume_command(config) -> str:
    """The exact command that resumes this run: the config file, every command-line override, and
    `--resume_from_checkpoint true` (replacing any given before), shell-quoted.

    A Config built from a dict (no argv) names its source, or a placeholder, and no overrides."""
    overrides = [
        arg
        for group in flag_groups(config.argv)
        if group[0].partition("=")[0] not in (CONFIG_FILE_FLAG, RESUME_FLAG)
        for arg in group
    ]
    has_file = bool(config.source) and config.source != "command line"
    if config.argv:
        file_flag = [CONFIG_FILE_FLAG, config.source] if has_file else []
    else:
        file_flag = [CONFIG_FILE_FLAG, config.source if has_file else "CONFIG.json"]
    return shlex.join(["python", "train.py", *file_flag, *overrides, RESUME_FLAG, "true"])


class CheckpointMarker(TrainerCallback):
    """Marks each checkpoint complete once every rank has saved it, then rotates old ones.

    Rotation (save_total_limit) moves here from the Trainer, which would delete older
    checkpoints before the new one is marked: a crash in between would leave none.
    `take_rotation(args)` hands the limit over; call it once, before training.
    """

    def __init__(self):
        self.save_total_limit: Optional[int] = None

    def take_rotation(self, args) -> None:
        self.save_total_limit, args.save_total_limit = args.save_total_limit, None

    def _folder(self, args, state) -> Path:
        return Path(args.output_dir) / f"{CHECKPOINT_PREFIX}-{state.global_step}"

    def _unmark_upcoming(self, args, state, control) -> None:
        # A folder about to be rewritten (resuming from an older checkpoint) is not complete meanwhile.
        if control.should_save and args.should_save:
            (self._folder(args, state) / COMPLETE_MARKER).unlink(missing_ok=True)

    def on_step_end(self, args, state, control, **kwargs):
        self._unmark_upcoming(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._unmark_upcoming(args, state, control)

    def on_save(self, args, state, control, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank's files are on disk
        if not args.should_save:
            return
        mark_complete(self._folder(args, state), state.global_step)
        rotate_checkpoints(
            output_dir=args.output_dir,
            save_total_limit=self.save_total_limit,
            best_model_checkpoint=state.best_model_checkpoint,
            use_mtime=False,
        )
