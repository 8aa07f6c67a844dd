"""The benchmark's settings stay those TRL picks by default (its speed claims depend on it)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("sft_throughput", ROOT / "bench" / "sft_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_both_sides_use_trls_default_optimizer_and_checkpointing(tmp_path):
    from trl import SFTConfig

    bench = _bench()
    trl_default = SFTConfig(output_dir=str(tmp_path), use_cpu=True)
    args = bench.common_args(bench.MODELS["tiny_llama"], str(tmp_path))
    assert args["optim"] == str(trl_default.optim.value) == bench.TRL_DEFAULT_OPTIM
    assert args["gradient_checkpointing"] is True
