"""Every shipped config validates, and the LIMA converter handles odd rows."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from component.data.lima import Converted, convert, from_gair
from tests.conftest import LIMA, ROOT
from tests.runs import load_values

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


def run_prepare(*args, cwd=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "script" / "prepare_lima.py"), *args], capture_output=True, text=True, cwd=cwd
    )


def test_gair_rows_read_alike_for_training_and_evaluation():
    """One reading of GAIR's turns: training drops a trailing question, evaluation keeps it as a prompt."""
    row = {"conversations": ["q1", "a1", "q2"]}
    assert from_gair(row) == {"conversation": [{"human": "q1", "assistant": "a1"}, {"human": "q2"}]}
    assert convert(row) == Converted(
        {"conversation": [{"human": "q1", "assistant": "a1"}]}, "pair 2: question without a reply; dropped"
    )
    assert "non-empty list of strings" in from_gair({"conversations": ["q1", 2]})


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
    proc = run_prepare("--input", str(src), "--output", str(out), cwd=tmp_path)  # runs from any folder
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
    from component.data.sft import read_conversations

    out = tmp_path / "train.jsonl"
    proc = run_prepare("--input", str(LIMA), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "wrote 1030 conversations" in proc.stdout
    assert "empty human or assistant text" in proc.stderr
    assert len(read_conversations(str(out)).records) == 1030


def test_prepare_lima_missing_input(tmp_path):
    proc = run_prepare("--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o.jsonl"))
    assert proc.returncode == 2 and "file not found" in proc.stderr
