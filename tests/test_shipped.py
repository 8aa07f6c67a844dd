"""Every shipped config validates, and the LIMA converter handles odd rows."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from component.config import load_values
from tests.conftest import LIMA, ROOT

RUN_CONFIGS = sorted(p for p in (ROOT / "train_args").glob("*.json") if not p.name.startswith("ds_"))


def test_there_are_shipped_configs():
    names = {p.name for p in RUN_CONFIGS}
    assert {
        "llama2-7b-sft-qlora.json",
        "gemma-2b-sft-qlora.json",
        "bloom-1b1-sft-full.json",
        "smollm2-135m-sft-lora.json",
    } <= names


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # configs use paths relative to the repo root
    raw = json.loads(path.read_text())
    assert "task_type" in raw and "train_mode" in raw, "configs state task_type and train_mode explicitly"
    values, _ = load_values(["--train_args_file", str(path)])
    assert values["output_dir"]


def test_llama2_config_is_7b():
    raw = json.loads((ROOT / "train_args" / "llama2-7b-sft-qlora.json").read_text())
    assert "7b" in raw["model_name_or_path"].lower() and "13b" not in raw["model_name_or_path"].lower()


def test_reference_hyperparameters():
    for name in ("llama2-7b-sft-qlora.json", "gemma-2b-sft-qlora.json"):
        raw = json.loads((ROOT / "train_args" / name).read_text())
        assert (
            raw["num_train_epochs"],
            raw["learning_rate"],
            raw["lora_rank"],
            raw["lora_alpha"],
            raw["lora_dropout"],
            raw["max_seq_length"],
        ) == (5, 1e-4, 64, 16, 0.05, 1024)
    bloom = json.loads((ROOT / "train_args" / "bloom-1b1-sft-full.json").read_text())
    assert (ROOT / bloom["deepspeed"]).is_file()


def run_prepare(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "script" / "prepare_lima.py"), *args], capture_output=True, text=True
    )


def test_prepare_lima_gair_format_with_odd_rows(tmp_path):
    src = tmp_path / "gair.jsonl"
    rows = [
        {"conversations": ["q1", "a1"], "source": "x"},
        {"conversations": ["q1", "a1", "q2", "", "q3", "a3"]},  # empty reply: cut before it
        {"conversations": ["q1", "a1", "q2"]},  # trailing question: dropped
        {"conversations": ["q1", "  "]},  # nothing usable: row dropped
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "train.jsonl"
    proc = run_prepare("--input", str(src), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert got == [
        {"source": "x", "conversation": [{"human": "q1", "assistant": "a1"}]},
        {"conversation": [{"human": "q1", "assistant": "a1"}]},
        {"conversation": [{"human": "q1", "assistant": "a1"}]},
    ]
    assert "row 2: pair 2" in proc.stderr and "row 3: pair 2" in proc.stderr and "row 4" in proc.stderr


@pytest.mark.skipif(not LIMA.is_file(), reason="LIMA not present at ../shared/data/lima/train.jsonl")
def test_prepare_lima_real_file(tmp_path):
    from component.sft_data import read_conversations

    out = tmp_path / "train.jsonl"
    proc = run_prepare("--input", str(LIMA), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "wrote 1030 conversations" in proc.stdout
    assert "empty human or assistant text" in proc.stderr
    assert len(read_conversations(str(out)).records) == 1030


def test_prepare_lima_missing_input(tmp_path):
    proc = run_prepare("--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o.jsonl"))
    assert proc.returncode == 2 and "file not found" in proc.stderr
