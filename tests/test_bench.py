"""The benchmark's settings stay those TRL picks by default (its speed claims depend on it)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

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


def test_fused_head_bench_times_both_walks_and_names_the_plan(capsys):
    import json

    spec = importlib.util.spec_from_file_location("fused_head", ROOT / "bench" / "fused_head.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--shapes", "600x8x40,600x8x40:frozen", "--repeats", "1", "--threads", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert "| 600x8x40 |" in lines[2] and lines[2].endswith("| row chunks |")  # one chunk holds every row
    assert lines[3].endswith("| vocabulary blocks |")  # a frozen head: one pass in blocks
    assert set(json.loads(lines[-1])) == {"600x8x40", "600x8x40:frozen"}


def test_gpu_levers_are_config_keys_and_unknown_configs_are_refused(tiny_llama_dir, tmp_path):
    from component.config import config_from_values
    from component.tasks.registry import CONFIG_CHECKS
    from tests.conftest import base_config

    bench = _bench()
    assert set(bench.GPU_LEVERS) == {"ours_tokens_compile", "ours_tokens_liger"}
    for lever in bench.GPU_LEVERS.values():
        values = {**base_config(tiny_llama_dir, tmp_path), "batching": "tokens", "max_tokens_per_batch": 256, **lever}
        config = config_from_values(values, CONFIG_CHECKS, source="bench")
        assert all(config.training[key] == value for key, value in lever.items())
    with pytest.raises(SystemExit, match="unknown ours_fast"):
        bench.main(["--configs", "ours_tokens,ours_fast", "--work_dir", str(tmp_path)])
