"""A run folder works from any directory: what it records names the base model by an absolute path.

training_meta.json (read by chat, serve, merge and evaluate) and peft's adapter_config.json are
written where the run was started, but read from anywhere; a relative path there would name
another file, or none, once the reader's working directory differs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from peft import AutoPeftModelForCausalLM

from component.config import config_from_values
from component.inference.generation import load_for_inference
from component.inference.merge import adapter_info
from component.training.outputs import read_meta, write_meta
from tests.conftest import ROOT, base_config
from tests.runs import train

GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.gguf"


def _train_here(work: Path, model: str, out: Path = Path("out"), **overrides) -> Path:
    """Train in the working directory `work` from a relative model path, as a user in the repository would."""
    train(base_config(Path(model), out, max_steps=1, **overrides))
    return work / out


def test_an_adapter_run_loads_from_another_directory(tmp_path, tiny_llama_dir, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    (work / "tiny").symlink_to(tiny_llama_dir)
    monkeypatch.chdir(work)
    run_dir = _train_here(work, "tiny")
    monkeypatch.chdir(elsewhere)
    loaded = load_for_inference(str(run_dir))  # what chat, serve and evaluate do with a run folder
    assert loaded.name == f"{work / 'tiny'} + {run_dir}"
    assert read_meta(str(run_dir))["base_model"] == str(work / "tiny")
    assert adapter_info(str(run_dir)).base_model == str(work / "tiny")  # merge_lora
    AutoPeftModelForCausalLM.from_pretrained(run_dir)  # peft's own loader reads adapter_config.json


def test_a_gguf_base_is_recorded_with_its_file_name(tmp_path, monkeypatch):
    """A GGUF base is a folder plus a file name for from_pretrained: both are recorded, absolute."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "real-name.gguf").write_bytes(b"")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.gguf").symlink_to(blobs / "real-name.gguf")
    monkeypatch.chdir(tmp_path)
    config = config_from_values(base_config(Path("models/m.gguf"), Path("out")))
    (tmp_path / "out").mkdir()
    meta = read_meta(str(write_meta(config, "out", finished=False).parent))
    assert meta["base_model"] == str(tmp_path / "models" / "m.gguf")
    assert meta["base_model_gguf_file"] == "real-name.gguf"


@pytest.mark.slow
@pytest.mark.skipif(not GGUF.exists(), reason="models/SmolLM2-135M-Instruct.gguf is created by script/setup.sh")
def test_a_run_on_the_gguf_demo_model_loads_from_another_directory(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(ROOT)
    run_dir = _train_here(
        ROOT, os.path.relpath(GGUF, ROOT), tmp_path / "out", template_name="smollm", max_seq_length=64
    )
    monkeypatch.chdir(elsewhere)
    load_for_inference(str(run_dir))
    meta = read_meta(str(run_dir))
    assert meta["base_model"] == str(GGUF)
    AutoPeftModelForCausalLM.from_pretrained(run_dir, gguf_file=meta["base_model_gguf_file"])  # as README says
