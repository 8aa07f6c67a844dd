"""script/merge_lora.py: exact LoRA merges, measured QLoRA merges, metadata, a guarded output folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from component.inference.generation import load_for_inference
from component.inference.merge import DEFAULT_QLORA_MERGE_BASE, MERGE_BASES, probe_ids
from component.runner import run
from component.training.outputs import META_FILE, read_meta
from script import merge_lora
from tests.conftest import ROOT, base_config, write_config
from tests.runs import load_config

LORA_MERGE_TOLERANCE = 1e-4  # relative logit error, fp32


def _train(root: Path, model_dir: Path, mode: str, **overrides) -> Path:
    out = root / mode
    values = base_config(model_dir, out, train_mode=mode, max_prompt_length=64, max_steps=6, **overrides)
    run(load_config(["--train_args_file", str(write_config(root / f"{mode}.json", **values))]))
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_llama_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {mode: _train(root, tiny_llama_dir, mode) for mode in ("lora", "qlora")}


def _merge(*args: str) -> int:
    return merge_lora.main([str(a) for a in args])


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_lora_merge_reproduces_base_plus_adapter(adapters, tiny_llama_dir, tmp_path):
    from peft import PeftModel

    out = tmp_path / "merged"
    assert _merge("--adapter_dir", adapters["lora"], "--output_dir", out, "--dtype", "fp32") == 0
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    ids = probe_ids(load_for_inference(str(out)).tokenizer, "chatml")
    base_logits = _logits(base, ids)
    reference = _logits(PeftModel.from_pretrained(base, adapters["lora"]), ids)
    assert _rel(reference, base_logits) > 1e-3  # the adapter changes the model: the check can fail
    assert _rel(_logits(merged, ids), reference) < LORA_MERGE_TOLERANCE


def test_qlora_merge_errors_measured_and_default_is_smaller(adapters, tmp_path, capsys):
    out = tmp_path / "merged"
    assert _merge("--adapter_dir", adapters["qlora"], "--output_dir", out) == 0
    errors = read_meta(str(out))["merge_logit_errors"]
    assert set(errors) == set(MERGE_BASES)
    assert DEFAULT_QLORA_MERGE_BASE == min(errors, key=errors.get)
    assert errors["dequantized"] < LORA_MERGE_TOLERANCE < errors["original"]
    assert read_meta(str(out))["merge_base"] == DEFAULT_QLORA_MERGE_BASE
    printed = capsys.readouterr().out
    assert "dequantized" in printed and "original" in printed


def test_qlora_merge_is_saved_in_full_precision(adapters, tmp_path):
    out = tmp_path / "merged"
    assert _merge("--adapter_dir", adapters["qlora"], "--output_dir", out, "--dtype", "bf16", "--skip_check") == 0
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert not any("absmax" in n or "quant" in n for n in names)
        assert {f.get_tensor(n).dtype for n in names} == {torch.bfloat16}


def test_merged_output_chats_without_being_told_the_template(adapters, tmp_path):
    out = tmp_path / "merged"
    assert _merge("--adapter_dir", adapters["lora"], "--output_dir", out) == 0
    meta = read_meta(str(out))
    assert meta["template_name"] == "chatml" and meta["merged_from"] == str(adapters["lora"])
    loaded = load_for_inference(str(out))
    assert loaded.template.name == "chatml"
    assert not (out / "adapter_config.json").exists()


def test_base_model_comes_from_metadata(adapters, tiny_llama_dir, tmp_path):
    out = tmp_path / "merged"
    assert _merge("--adapter_dir", adapters["lora"], "--output_dir", out) == 0
    assert read_meta(str(out))["base_model"] == str(tiny_llama_dir)


def test_base_model_flag_overrides_metadata(adapters, tiny_llama_dir, tmp_path):
    copy = shutil.copytree(tiny_llama_dir, tmp_path / "base-copy")
    out = tmp_path / "merged"
    assert _merge("--adapter_dir", adapters["lora"], "--output_dir", out, "--base_model", copy) == 0
    assert read_meta(str(out))["base_model"] == str(copy)


def test_base_model_from_adapter_config_without_our_metadata(adapters, tiny_llama_dir, tmp_path):
    adapter = shutil.copytree(adapters["lora"], tmp_path / "adapter")
    (adapter / META_FILE).unlink()
    out = tmp_path / "merged"
    assert _merge("--adapter_dir", adapter, "--output_dir", out, "--dtype", "fp32") == 0
    assert read_meta(str(out))["base_model"] == str(tiny_llama_dir)


def test_unknown_base_model_is_a_clear_error(adapters, tmp_path, capsys):
    adapter = shutil.copytree(adapters["lora"], tmp_path / "adapter")
    (adapter / META_FILE).unlink()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    assert _merge("--adapter_dir", adapter, "--output_dir", tmp_path / "merged") == 2
    assert "which base model" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


def test_existing_output_is_refused_without_force(adapters, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    keep = out / "notes.txt"
    keep.write_text("mine")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "script" / "merge_lora.py"),
            "--adapter_dir",
            str(adapters["lora"]),
            "--output_dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # any folder: the installed package is found without the checkout on sys.path
    )
    assert proc.returncode == 2
    assert "--output_dir" in proc.stderr and "--force" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert _merge("--adapter_dir", adapters["lora"], "--output_dir", out, "--force") == 0
    assert (out / "model.safetensors").is_file() and keep.read_text() == "mine"


def test_output_may_not_be_the_adapter(adapters):
    assert _merge("--adapter_dir", adapters["lora"], "--output_dir", adapters["lora"], "--force") == 2


@pytest.mark.parametrize("variant", [{"lora_variant": "dora"}, {"lora_init": "pissa"}], ids=["dora", "pissa"])
def test_merge_script_on_dora_and_converted_pissa_adapters(tmp_path, tiny_llama_dir, variant):
    """merge_lora.py merges DoRA (magnitudes folded in) and a PiSSA adapter (converted for the
    original base) into weights that give base + adapter's logits."""
    from peft import PeftModel

    adapter = _train(tmp_path, tiny_llama_dir, "lora", lora_dropout=0.0, **variant)
    out = tmp_path / "merged"
    assert _merge("--adapter_dir", adapter, "--output_dir", out, "--dtype", "fp32") == 0
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    ids = probe_ids(load_for_inference(str(out)).tokenizer, "chatml")
    base_logits = _logits(base, ids)
    reference = _logits(PeftModel.from_pretrained(base, adapter), ids)
    assert _rel(reference, base_logits) > 1e-3
    assert _rel(_logits(merged, ids), reference) < LORA_MERGE_TOLERANCE
