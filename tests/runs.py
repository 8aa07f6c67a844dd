"""The one place tests train a config and read back what a run left.

- `load_config` / `load_values` / `config_of`: a config checked as train.py checks it (with the
  task registry's checks), from argv or from a dict;
- `train(...)`: one run in-process, with extra callbacks injected (never patched in);
- `run_with_fault(...)`: train.py as a subprocess with one injected fault (tests/fault_runner.py);
- `step_losses`, `final_weights`, `assert_same_run`: what a run left, and "same run" comparisons.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from component import config as _config
from component.config import CONFIG_FILE_FLAG, Config
from component.runner import run
from component.tasks.registry import CONFIG_CHECKS
from tests.conftest import base_config, write_config

ROOT = Path(__file__).resolve().parents[1]
FAULT_RUNNER = ROOT / "tests" / "fault_runner.py"
SUBPROCESS_TIMEOUT_S = 600
# 8 examples at batch 2: 4 steps per epoch. 9 steps cross two epoch boundaries, and
# resuming from checkpoint-3 starts mid-epoch (the data loader must skip 3 batches).
STEPS = 9
SAVE_STEPS = 3
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors")


def load_config(argv: list[str]) -> Config:
    """A config from argv, checked as train.py checks it."""
    return _config.load_config(argv, CONFIG_CHECKS)


def load_values(argv: list[str]) -> tuple[dict, str]:
    return _config.load_values(argv, CONFIG_CHECKS)


def config_of(values: dict) -> Config:
    """A config from a dict of keys, checked as train.py checks a file."""
    return _config.config_from_values(values, CONFIG_CHECKS)


def train(values: dict, callbacks=()):
    """Train the config `values` in this process; `callbacks` join the run's own. Returns the trainer."""
    return run(config_of(values), callbacks=callbacks)


def run_config(tmp: Path, model_dir: Path, out: Path, name: str = "run.json", **overrides) -> Path:
    # lora_dropout: resuming must restore the RNG state too.
    defaults = dict(max_steps=STEPS, save_steps=SAVE_STEPS, max_prompt_length=64, lora_dropout=0.1)
    values = base_config(model_dir, out, **{**defaults, **overrides})
    return write_config(tmp / name, **values)


def train_in_process(config_path: Path, *flags: str, callbacks=()):
    return run(load_config([CONFIG_FILE_FLAG, str(config_path), *flags]), callbacks=callbacks)


def subprocess_env(**extra: str) -> dict:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }
    env.update(extra)
    return env


def fault_command(fault: str, step: int, config_path: Path, *flags: str) -> list[str]:
    return [sys.executable, str(FAULT_RUNNER), fault, str(step), CONFIG_FILE_FLAG, str(config_path), *flags]


def run_with_fault(fault: str, step: int, config_path: Path, *flags: str, env: Optional[dict] = None):
    return subprocess.run(
        fault_command(fault, step, config_path, *flags),
        cwd=ROOT,
        env=env or subprocess_env(),
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )


def step_losses(checkpoint: Path) -> dict[int, float]:
    """step -> training loss, from the Trainer's state saved in a checkpoint folder."""
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def trainer_losses(trainer) -> list[float]:
    """The logged training losses of a finished in-process run, in step order."""
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHT_FILES:
        if (out / name).is_file():
            return load_file(out / name)
    raise AssertionError(f"no weights in {out}: {sorted(p.name for p in out.iterdir())}")


def assert_same_run(reference: Path, resumed: Path, resumed_from: int) -> None:
    """Same per-step losses after the resume point, same final weights."""
    ref_losses = step_losses(reference / f"checkpoint-{STEPS}")
    new_losses = step_losses(resumed / f"checkpoint-{STEPS}")
    after = [s for s in ref_losses if s > resumed_from]
    assert after == list(range(resumed_from + 1, STEPS + 1))
    for s in after:
        assert abs(new_losses[s] - ref_losses[s]) <= 1e-5 * abs(ref_losses[s]), (s, new_losses[s], ref_losses[s])
    ref_w, new_w = final_weights(reference), final_weights(resumed)
    assert ref_w.keys() == new_w.keys()
    for k in ref_w:
        torch.testing.assert_close(new_w[k], ref_w[k], rtol=1e-5, atol=1e-6, msg=k)


_REFERENCES: dict[tuple[str, str], Path] = {}


def reference_run(mode: str, model_dir: Path, tmp_path_factory) -> Path:
    """The uninterrupted run for `mode`, trained once per test session."""
    key = (mode, str(model_dir))
    if key not in _REFERENCES:
        tmp = tmp_path_factory.mktemp(f"reference-{mode}")
        train_in_process(run_config(tmp, model_dir, tmp / "out", train_mode=mode))
        _REFERENCES[key] = tmp / "out"
    return _REFERENCES[key]
