"""Shared fixtures: tiny models saved to temp folders, and a runner for train.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(1)

from tests.tiny import save_tiny_model  # noqa: E402 (after the environment is set)

TINY_SFT = ROOT / "tests" / "data" / "tiny_sft.jsonl"
LIMA = ROOT.parent / "shared" / "data" / "lima" / "train.jsonl"


@pytest.fixture(scope="session")
def official():
    """The official tokenizer (and chat template) of a family in tests/assets/tokenizers/, loaded once."""
    from transformers import AutoTokenizer

    cache = {}

    def load(name):
        if name not in cache:
            cache[name] = AutoTokenizer.from_pretrained(ROOT / "tests" / "assets" / "tokenizers" / name)
        return cache[name]

    return load


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory) -> Path:
    return save_tiny_model("gemma", tmp_path_factory.mktemp("tiny-gemma"), bos="<bos>", eos="<eos>")


@pytest.fixture(scope="session")
def tiny_bloom_dir(tmp_path_factory) -> Path:
    return save_tiny_model("bloom", tmp_path_factory.mktemp("tiny-bloom"))


def write_config(path: Path, **values) -> Path:
    path.write_text(json.dumps(values, indent=2))
    return path


def base_config(model_dir: Path, output_dir: Path, **overrides) -> dict:
    """A small, fast SFT config for tests; overrides replace any key."""
    values = {
        "output_dir": str(output_dir),
        "model_name_or_path": str(model_dir),
        "train_file": str(TINY_SFT),
        "template_name": "chatml",
        "task_type": "sft",
        "train_mode": "lora",
        "num_train_epochs": 1,
        "max_steps": 6,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_steps": 1000,
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "max_seq_length": 128,
        "report_to": "none",
        "disable_tqdm": True,
        "seed": 1,
    }
    values.update(overrides)
    return values


def dpo_config(model_dir: Path, out: Path, train_file: Path, **overrides) -> dict:
    """A small DPO config for tests: base_config with preference data and its lengths."""
    values = base_config(
        model_dir,
        out,
        task_type="dpo",
        train_file=str(train_file),
        max_seq_length=96,
        max_prompt_length=32,
        per_device_train_batch_size=4,
        max_steps=8,
        dpo_beta=0.1,
    )
    values.update(overrides)
    return values
