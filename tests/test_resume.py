"""Resume: checkpoint completeness, choosing the checkpoint, and exact resumption.

A run killed with SIGKILL mid-training and then resumed must end where the
uninterrupted run ends: the same per-step losses after the resume point and
the same final weights (full, LoRA and QLoRA). A half-written checkpoint is
never resumed from.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
from loguru import logger

from component.config import CONFIG_FILE_FLAG
from component.errors import ConfigError
from component.training.checkpoints import (
    COMPLETE_MARKER,
    checkpoint_problems,
    list_checkpoints,
    mark_complete,
    newest_complete,
    resolve_resume,
)
from component.training.outputs import META_FILE
from component.training.setup import training_arguments
from tests.conftest import base_config, write_config
from tests.runs import (
    SAVE_STEPS,
    STEPS,
    assert_same_run,
    final_weights,
    load_config,
    load_values,
    reference_run,
    run_config,
    run_with_fault,
    train_in_process,
)


@pytest.fixture
def warnings():
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(str(m)), level="WARNING")
    yield messages
    logger.remove(sink)


# ---------------------------------------------------------------- completeness, no training


def fake_checkpoint(out: Path, step: int, complete: bool = True) -> Path:
    """A checkpoint folder with a valid tiny safetensors file and a trainer state."""
    import torch
    from safetensors.torch import save_file

    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({"w": torch.arange(64, dtype=torch.float32)}, folder / "adapter_model.safetensors")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (folder / "optimizer.pt").write_bytes(b"x" * 100)
    if complete:
        mark_complete(folder, step)
    return folder


def fake_config(out: Path, resume=None, overwrite=False, allow_pickle=False):
    return SimpleNamespace(
        source="cfg.json",
        output_dir=str(out),
        method=SimpleNamespace(resume_from_checkpoint=resume, overwrite_output_dir=overwrite),
        model=SimpleNamespace(allow_pickle_weights=allow_pickle),
    )


def test_marked_checkpoint_is_complete(tmp_path):
    folder = fake_checkpoint(tmp_path, 2)
    assert checkpoint_problems(folder) == []
    marker = json.loads((folder / COMPLETE_MARKER).read_text())
    assert marker["step"] == 2 and set(marker["files"]) == {
        "adapter_model.safetensors",
        "trainer_state.json",
        "optimizer.pt",
    }


def test_unmarked_checkpoint_is_incomplete(tmp_path):
    folder = fake_checkpoint(tmp_path, 2, complete=False)
    assert "stopped while saving" in checkpoint_problems(folder)[0]


@pytest.mark.parametrize("damage", ["truncate_weights", "truncate_optimizer", "delete_state", "truncate_header"])
def test_damaged_checkpoint_is_incomplete(tmp_path, damage):
    folder = fake_checkpoint(tmp_path, 2)
    weights = folder / "adapter_model.safetensors"
    if damage == "truncate_weights":
        weights.write_bytes(weights.read_bytes()[:-10])
    elif damage == "truncate_optimizer":
        (folder / "optimizer.pt").write_bytes(b"x" * 50)
    elif damage == "delete_state":
        (folder / "trainer_state.json").unlink()
    else:  # same size, but the header no longer matches the data
        raw = bytearray(weights.read_bytes())
        raw[0:8] = (10**9).to_bytes(8, "little")
        weights.write_bytes(bytes(raw))
    problems = checkpoint_problems(folder)
    assert problems, damage
    assert any(name in p for p in problems for name in ("adapter_model", "optimizer.pt", "trainer_state.json"))


def test_newest_complete_skips_incomplete_ones(tmp_path):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 12, complete=False)
    (tmp_path / "checkpoint-notastep").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10", "checkpoint-12"]
    newest = newest_complete(tmp_path)
    assert newest.path.name == "checkpoint-10"
    assert [p.name for p, _ in newest.skipped] == ["checkpoint-12"]


def test_resume_true_takes_newest_complete_with_a_warning(tmp_path, warnings):
    fake_checkpoint(tmp_path, 4)
    fake_checkpoint(tmp_path, 6, complete=False)
    assert resolve_resume(fake_config(tmp_path, resume=True)) == str(tmp_path / "checkpoint-4")
    assert any("skipping incomplete checkpoint" in w and "checkpoint-6" in w for w in warnings)


def test_resume_path_and_checkpoint_name(tmp_path):
    fake_checkpoint(tmp_path, 4)
    fake_checkpoint(tmp_path, 8)
    assert resolve_resume(fake_config(tmp_path, resume=str(tmp_path / "checkpoint-4"))).endswith("checkpoint-4")
    assert resolve_resume(fake_config(tmp_path, resume="checkpoint-4")).endswith("checkpoint-4")


def test_resume_path_that_is_incomplete_is_refused(tmp_path):
    fake_checkpoint(tmp_path, 4)
    fake_checkpoint(tmp_path, 6, complete=False)
    with pytest.raises(ConfigError, match="not a complete checkpoint.*newest complete checkpoint is .*checkpoint-4"):
        resolve_resume(fake_config(tmp_path, resume="checkpoint-6"))
    with pytest.raises(ConfigError, match="not found"):
        resolve_resume(fake_config(tmp_path, resume="checkpoint-99"))


def test_checkpoints_present_without_resume_is_an_error_saying_how(tmp_path):
    fake_checkpoint(tmp_path, 4)
    with pytest.raises(ConfigError) as err:
        resolve_resume(fake_config(tmp_path))
    text = str(err.value)
    assert "checkpoint-4" in text and "resume_from_checkpoint: true" in text and "overwrite_output_dir" in text
    assert resolve_resume(fake_config(tmp_path, overwrite=True)) is None  # a fresh start was asked for


def test_resume_true_with_nothing_to_resume(tmp_path):
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        resolve_resume(fake_config(tmp_path, resume=True))
    fake_checkpoint(tmp_path, 2, complete=False)
    with pytest.raises(ConfigError, match="all incomplete"):
        resolve_resume(fake_config(tmp_path, resume=True))


def test_pickled_checkpoint_weights_are_refused_unless_allowed(tmp_path):
    folder = tmp_path / "checkpoint-4"
    fake_checkpoint(tmp_path, 4)
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(b"pickle")
    mark_complete(folder, 4)
    with pytest.raises(ConfigError, match="pickle.*allow_pickle_weights"):
        resolve_resume(fake_config(tmp_path, resume=True))
    assert resolve_resume(fake_config(tmp_path, resume=True, allow_pickle=True)).endswith("checkpoint-4")


@pytest.mark.parametrize(
    ("file_value", "flags", "expected"),
    [
        (True, [], True),
        ("out/checkpoint-4", [], "out/checkpoint-4"),
        (None, ["--resume_from_checkpoint", "true"], True),
        (None, ["--resume_from_checkpoint", "checkpoint-4"], "checkpoint-4"),
        (True, ["--resume_from_checkpoint", "false"], False),
    ],
)
def test_config_reads_resume_as_true_or_a_path(tmp_path, tiny_llama_dir, file_value, flags, expected):
    values = base_config(tiny_llama_dir, tmp_path / "out", max_prompt_length=64)
    if file_value is not None:
        values["resume_from_checkpoint"] = file_value
    path = write_config(tmp_path / "c.json", **values)
    config = load_config([CONFIG_FILE_FLAG, str(path), *flags])
    assert config.method.resume_from_checkpoint == expected


def test_config_rejects_bad_resume_values(tmp_path, tiny_llama_dir):
    values = base_config(
        tiny_llama_dir, tmp_path / "out", max_prompt_length=64, resume_from_checkpoint=3, max_nonfinite_steps=-1
    )
    path = write_config(tmp_path / "c.json", **values)
    with pytest.raises(ConfigError) as err:
        load_values([CONFIG_FILE_FLAG, str(path)])
    assert "resume_from_checkpoint" in str(err.value)


# ---------------------------------------------------------------- exact resumption (training)


@pytest.fixture
def reference_runs(tmp_path_factory):
    """Uninterrupted runs, per train mode, trained once per session."""
    return lambda mode, model_dir: reference_run(mode, model_dir, tmp_path_factory)


def kill_then_resume(tmp_path: Path, model_dir: Path, mode: str, kill_at: int) -> Path:
    out = tmp_path / "out"
    config = run_config(tmp_path, model_dir, out, train_mode=mode)
    killed = run_with_fault("kill", kill_at, config)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    assert newest_complete(out).path.name == f"checkpoint-{SAVE_STEPS}"
    train_in_process(config, "--resume_from_checkpoint", "true")
    return out


@pytest.mark.parametrize("mode", ["lora", pytest.param("full", marks=pytest.mark.slow)])
def test_kill9_then_resume_matches_uninterrupted_run(tmp_path, tiny_llama_dir, reference_runs, mode):
    out = kill_then_resume(tmp_path, tiny_llama_dir, mode, kill_at=SAVE_STEPS + 2)
    assert_same_run(reference_runs(mode, tiny_llama_dir), out, resumed_from=SAVE_STEPS)


@pytest.mark.slow
def test_kill9_then_resume_matches_uninterrupted_run_qlora(tmp_path, tiny_llama_dir, reference_runs):
    pytest.importorskip("bitsandbytes")
    out = kill_then_resume(tmp_path, tiny_llama_dir, "qlora", kill_at=SAVE_STEPS + 2)
    assert_same_run(reference_runs("qlora", tiny_llama_dir), out, resumed_from=SAVE_STEPS)


def test_truncated_checkpoint_is_skipped_for_the_previous_one(tmp_path, tiny_llama_dir, reference_runs, warnings):
    reference = reference_runs("lora", tiny_llama_dir)
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / META_FILE).unlink()  # not a finished run: as if stopped after the last checkpoint
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (out / name).unlink()
    shutil.rmtree(out / f"checkpoint-{STEPS}")
    damaged = out / f"checkpoint-{2 * SAVE_STEPS}" / "adapter_model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # truncated on purpose
    config = run_config(tmp_path, tiny_llama_dir, out, train_mode="lora")
    train_in_process(config, "--resume_from_checkpoint", "true")
    assert any("skipping incomplete checkpoint" in w and f"checkpoint-{2 * SAVE_STEPS}" in w for w in warnings)
    assert not any("differ from the interrupted run" in w for w in warnings)
    assert_same_run(reference, out, resumed_from=SAVE_STEPS)


def resumable_copy(reference: Path, out: Path) -> None:
    """The reference run as it stood at checkpoint-3, before finishing."""
    shutil.copytree(reference, out)
    (out / META_FILE).unlink()
    (out / "adapter_model.safetensors").unlink()
    for folder in list_checkpoints(out)[1:]:
        shutil.rmtree(folder)


def test_comparison_catches_a_resume_at_the_wrong_data_position(tmp_path, tiny_llama_dir, reference_runs):
    """The exactness check can fail: resuming without skipping the trained batches must differ."""
    reference = reference_runs("lora", tiny_llama_dir)
    out = tmp_path / "out"
    resumable_copy(reference, out)
    config = run_config(tmp_path, tiny_llama_dir, out, train_mode="lora")
    train_in_process(config, "--resume_from_checkpoint", "true", "--ignore_data_skip", "true")
    with pytest.raises(AssertionError):
        assert_same_run(reference, out, resumed_from=SAVE_STEPS)


def test_checkpoint_half_written_at_kill_is_skipped(tmp_path, tiny_llama_dir, reference_runs, warnings):
    out = tmp_path / "out"
    config = run_config(tmp_path, tiny_llama_dir, out, train_mode="lora")
    killed = run_with_fault("kill_save", 2 * SAVE_STEPS, config)  # dies while writing checkpoint-6
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    half = out / f"checkpoint-{2 * SAVE_STEPS}"
    assert (half / "adapter_model.safetensors").is_file() and checkpoint_problems(half)
    train_in_process(config, "--resume_from_checkpoint", "true")
    assert any("skipping incomplete checkpoint" in w and half.name in w for w in warnings)
    assert_same_run(reference_runs("lora", tiny_llama_dir), out, resumed_from=SAVE_STEPS)
    assert checkpoint_problems(half) == []  # rewritten whole by the resumed run


def test_finished_run_is_not_overwritten(tmp_path, tiny_llama_dir, reference_runs):
    reference = reference_runs("lora", tiny_llama_dir)
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    before = final_weights(out)
    config = run_config(tmp_path, tiny_llama_dir, out, train_mode="lora")
    for flags in ([], ["--resume_from_checkpoint", "true"]):
        with pytest.raises(ConfigError, match="already holds a finished run.*overwrite_output_dir"):
            train_in_process(config, *flags)
    after = final_weights(out)
    assert all((before[k] == after[k]).all() for k in before)


def test_overwrite_starts_fresh_and_drops_old_checkpoints(tmp_path, tiny_llama_dir, reference_runs):
    out = tmp_path / "out"
    shutil.copytree(reference_runs("lora", tiny_llama_dir), out)
    (out / "checkpoint-99").mkdir()  # an earlier run's, later than any this run saves
    config = run_config(tmp_path, tiny_llama_dir, out, train_mode="lora", max_steps=SAVE_STEPS)
    train_in_process(config, "--overwrite_output_dir", "true")
    assert [p.name for p in list_checkpoints(out)] == [f"checkpoint-{SAVE_STEPS}"]
    assert json.loads((out / META_FILE).read_text())["finished"] is True


def test_changed_settings_are_reported_on_resume(tmp_path, tiny_llama_dir, warnings):
    out = tmp_path / "out"
    out.mkdir()
    path = write_config(tmp_path / "c.json", **base_config(tiny_llama_dir, out, max_prompt_length=64))
    from component.config import save_config

    # As the runner saves and compares them: with the built TrainingArguments (every resolved value).
    first = load_config([CONFIG_FILE_FLAG, str(path)])
    save_config(first.to_dict(training_arguments(first)), str(out))
    fake_checkpoint(out, 4)
    same = load_config([CONFIG_FILE_FLAG, str(path), "--resume_from_checkpoint", "true", "--save_steps", "7"])
    resolve_resume(same, training_arguments(same))
    assert not any("differ" in w for w in warnings)
    changed = load_config([CONFIG_FILE_FLAG, str(path), "--resume_from_checkpoint", "true", "--learning_rate", "0.5"])
    resolve_resume(changed, training_arguments(changed))
    assert any("differ from the interrupted run" in w and "learning_rate: 0.01 -> 0.5" in w for w in warnings)
