"""Config parsing: strict keys, types, CLI overrides, and errors before any output."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from component.cli import main_train
from component.config import CONFIG_FILE_FLAG, save_config
from component.errors import USER_ERROR_EXIT_CODE, ConfigError
from component.training.setup import training_arguments
from tests.conftest import ROOT, base_config, write_config
from tests.runs import load_config, load_values


def run_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=ROOT)


def test_cli_overrides_file_values(tmp_path, tiny_llama_dir):
    cfg = write_config(tmp_path / "c.json", **base_config(tiny_llama_dir, tmp_path / "out"))
    config = load_config(
        [
            "--train_args_file",
            str(cfg),
            "--learning_rate",
            "5e-5",
            "--num_train_epochs=2",
            "--lora_target_modules",
            "q_proj,v_proj",
            "--gradient_checkpointing",
        ]
    )
    assert config.training["learning_rate"] == 5e-5
    assert config.training["num_train_epochs"] == 2
    assert config.method.lora_target_modules == ["q_proj", "v_proj"]
    assert config.training["gradient_checkpointing"] is True
    assert config.method.lora_rank == 8  # from the file


def test_unknown_key_suggests_the_right_one(tmp_path, tiny_llama_dir):
    values = base_config(tiny_llama_dir, tmp_path / "out")
    values["lerning_rate"] = 1e-4
    cfg = write_config(tmp_path / "c.json", **values)
    with pytest.raises(ConfigError) as err:
        load_values(["--train_args_file", str(cfg)])
    msg = str(err.value)
    assert str(cfg) in msg and "'lerning_rate'" in msg and "did you mean 'learning_rate'" in msg


def test_all_problems_reported_together(tmp_path, tiny_llama_dir):
    values = base_config(tiny_llama_dir, tmp_path / "out", lora_rank="eight", fp16=True, bf16=True)
    values["warmup_stepz"] = 3
    cfg = write_config(tmp_path / "c.json", **values)
    with pytest.raises(ConfigError) as err:
        load_values(["--train_args_file", str(cfg), "--per_device_train_batch_size", "two"])
    msg = str(err.value)
    for needle in (
        "'lora_rank'",
        "expected an integer",
        "'warmup_stepz'",
        "did you mean 'warmup_steps'",
        "--per_device_train_batch_size",
    ):
        assert needle in msg, needle


def test_conflicting_precision(tmp_path, tiny_llama_dir):
    cfg = write_config(tmp_path / "c.json", **base_config(tiny_llama_dir, tmp_path / "out", fp16=True, bf16=True))
    with pytest.raises(ConfigError, match="'fp16' and 'bf16'"):
        load_values(["--train_args_file", str(cfg)])


def test_bad_choices_and_unknown_template(tmp_path, tiny_llama_dir):
    values = base_config(tiny_llama_dir, tmp_path / "out", train_mode="qlor", template_name="chatlm")
    cfg = write_config(tmp_path / "c.json", **values)
    with pytest.raises(ConfigError) as err:
        load_values(["--train_args_file", str(cfg)])
    msg = str(err.value)
    assert "'train_mode'" in msg and "'qlor'" in msg
    assert "'template_name'" in msg and "did you mean 'chatml'" in msg


def test_invalid_json_names_line(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text('{\n  "output_dir": "x",\n  "seed": ,\n}\n')
    with pytest.raises(ConfigError, match=r"c\.json:3:"):
        load_values(["--train_args_file", str(cfg)])


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"lerning_rate": 1e-4}, "did you mean 'learning_rate'"),
        ({"lora_rank": "big"}, "'lora_rank'"),
        ({"fp16": True, "bf16": True}, "'fp16' and 'bf16'"),
    ],
)
def test_train_py_exits_nonzero_without_traceback_or_output_dir(tmp_path, tiny_llama_dir, change, needle):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.json", **{**base_config(tiny_llama_dir, out), **change})
    proc = run_train("--train_args_file", str(cfg))
    assert proc.returncode == USER_ERROR_EXIT_CODE
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_resolved_config_is_saved_without_secrets(tmp_path, tiny_llama_dir):
    # A token in the config would be pickled into training_args.bin, so it is refused
    # (component/config/checks.py); the environment is where it belongs.
    with pytest.raises(ConfigError, match="hub_token.*HF_TOKEN"):
        load_config(
            [
                CONFIG_FILE_FLAG,
                str(
                    write_config(
                        tmp_path / "t.json", **base_config(tiny_llama_dir, tmp_path / "out", hub_token="hf_secret")
                    )
                ),
            ]
        )
    # One that got into a Config anyway (built in code, not from a file) is still never saved.
    config = load_config(
        [CONFIG_FILE_FLAG, str(write_config(tmp_path / "c.json", **base_config(tiny_llama_dir, tmp_path / "out")))]
    )
    leaky = dataclasses.replace(config, training={**config.training, "hub_token": "hf_secret"})
    text = save_config(leaky.to_dict(), str(tmp_path)).read_text()
    assert "hf_secret" not in text and '"lora_rank": 8' in text and '"template_name": "chatml"' in text


def test_help_lists_our_keys():
    proc = run_train("--help")
    assert proc.returncode == 0
    assert "lora_rank (default 64)" in proc.stdout and "template_name" in proc.stdout


# What loading a config may import: the config layer needs transformers' TrainingArguments for its field
# table, and transformers 5.24 itself imports peft (and through it bitsandbytes) in trainer_utils.
# Loading must add no task library, start no process state, and import no layer above config.
IMPORT_PROBE = """
import json, sys
import transformers.training_args
from accelerate.state import PartialState
import torch.distributed as dist

library = set(sys.modules)


def seen():
    return {
        "added": sorted({m.split(".")[0] for m in set(sys.modules) - library}),
        "trl": "trl" in sys.modules,
        "layers": sorted({m.split(".")[1] for m in sys.modules if m.startswith("component.")}),
        "process_state": PartialState._shared_state != {},
        "process_group": dist.is_available() and dist.is_initialized(),
    }


from component.config import load_config
load_config(sys.argv[1:])
builtin = seen()
from component.tasks.registry import CONFIG_CHECKS
load_config(sys.argv[1:], CONFIG_CHECKS)
print(json.dumps({"peft_from_transformers": "peft" in library, "builtin": builtin, "registry": seen()}))
"""


def test_loading_a_config_imports_no_task_library_and_starts_nothing(tmp_path, tiny_llama_dir):
    cfg = write_config(tmp_path / "c.json", **base_config(tiny_llama_dir, tmp_path / "out"))
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE, CONFIG_FILE_FLAG, str(cfg)], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    # If this fails, transformers no longer imports peft with TrainingArguments: then assert that
    # peft is not in sys.modules at all after loading a config.
    assert seen["peft_from_transformers"]
    # With the built-in checks only, and with the task registry's (as train.py loads a config):
    for checks in ("builtin", "registry"):
        got = seen[checks]
        assert not got["trl"], checks
        assert not {"trl", "peft", "deepspeed", "bitsandbytes"} & set(got["added"]), (checks, got["added"])
        assert not got["process_state"] and not got["process_group"], checks
    assert seen["builtin"]["layers"] == ["config", "errors"]
    assert "datasets" not in seen["builtin"]["added"]


def test_train_py_without_arguments_prints_the_usage_and_exits_2(capsys):
    assert main_train([]) == USER_ERROR_EXIT_CODE
    err = capsys.readouterr().err
    assert err.startswith(f"usage: train.py {CONFIG_FILE_FLAG} FILE.json [--key value ...]\n")
    assert "--help" in err


# `train.py --help` lists our keys: it must not wait for transformers and peft (5 s and more) to import.
HELP_PROBE = """
import runpy, sys
sys.argv = ["train.py", "--help"]
try:
    runpy.run_path("train.py", run_name="__main__")
except SystemExit as exc:
    print(exc.code, sorted(m for m in ("transformers", "peft", "bitsandbytes") if m in sys.modules))
"""


def test_help_imports_no_model_library():
    proc = subprocess.run([sys.executable, "-c", HELP_PROBE], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "0 []"
    assert "lora_rank (default 64)" in proc.stdout


def test_a_runs_saved_config_loads_back_with_the_same_values(tmp_path, tiny_llama_dir):
    """train_args.json, as a run saves it (every TrainingArguments value resolved), is a config itself."""
    cfg = write_config(tmp_path / "c.json", **base_config(tiny_llama_dir, tmp_path / "out"))
    first = load_config([CONFIG_FILE_FLAG, str(cfg)])
    args = training_arguments(first)
    saved = save_config(first.to_dict(args), str(tmp_path))
    again = load_config([CONFIG_FILE_FLAG, str(saved)])
    assert (again.model, again.data, again.method) == (first.model, first.data, first.method)
    assert training_arguments(again).to_dict() == args.to_dict()
