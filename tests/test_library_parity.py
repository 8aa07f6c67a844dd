"""Library code in place of ours, adopted only where a test shows the same result.

- safetensors' `safe_open` judges checkpoint weight files (component/training/checkpoints.py);
- huggingface_hub's `HF_HUB_DISABLE_TELEMETRY` silences trl's usage ping (component/tasks/dpo.py);
- trl's DPO loss types: trl exposes no list, so ours stays, held equal to trl's here;
- transformers' `PreTrainedModel.dequantize()` gives the QLoRA merge base (component/inference/merge.py);
- transformers' `DataCollatorWithFlattening` builds the same batches as `PaddingFreeCollator`, which
  stays because it is faster (component/data/collator.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import re
import struct
from pathlib import Path

import pytest
import torch

from component.data.collator import LABEL_ROWS, PaddingFreeCollator
from component.data.template import IGNORE_INDEX
from component.errors import ConfigError
from component.training.checkpoints import safetensors_problem
from tests.conftest import ROOT, dpo_config
from tests.runs import config_of

DPO_SAMPLE = ROOT / "data" / "dpo_sample.jsonl"


# ---------------------------------------------------------------- safetensors: safe_open's verdicts


def _header(raw: bytes) -> tuple[int, dict]:
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n])


def _with_header(raw: bytes, header) -> bytes:
    n, _ = _header(raw)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + raw[8 + n :]


def _edit_tensor(raw: bytes, name: str, **fields) -> bytes:
    """The file with tensor `name`'s header entry changed (None: removed); the data stays."""
    _, header = _header(raw)
    entry = {**header[name], **fields} if fields else None
    return _with_header(raw, {k: v for k, v in {**header, name: entry}.items() if v is not None})


# Each damaged form with what it breaks; the struct parser safe_open replaced gave these verdicts too,
# except where noted.
DAMAGED = {
    "empty": lambda raw: b"",
    "shorter than the length field": lambda raw: raw[:5],
    "cut inside the header": lambda raw: raw[:20],
    "cut at the end of the header": lambda raw: raw[: 8 + _header(raw)[0]],
    "last byte cut": lambda raw: raw[:-1],
    "10 bytes cut": lambda raw: raw[:-10],
    "10 bytes appended": lambda raw: raw + b"\0" * 10,
    "header length 1e9": lambda raw: (10**9).to_bytes(8, "little") + raw[8:],
    "header length one too long": lambda raw: (_header(raw)[0] + 1).to_bytes(8, "little") + raw[8:],
    "header length one too short": lambda raw: (_header(raw)[0] - 1).to_bytes(8, "little") + raw[8:],
    "header JSON broken": lambda raw: raw[:8] + b"[" + raw[9:],
    "header not UTF-8": lambda raw: raw[:9] + b"\xff" + raw[10:],
    "all zeros": lambda raw: b"\0" * len(raw),
    "a tensor missing from the header": lambda raw: _edit_tensor(raw, "b"),
    # Stricter than the struct parser, which accepted these two and crashed on the third:
    "offsets disagree with the shape": lambda raw: _edit_tensor(raw, "w", data_offsets=[0, 252]),
    "shape disagrees with the offsets": lambda raw: _edit_tensor(raw, "w", shape=[63]),
    "header a JSON list": lambda raw: _with_header(raw, [1, 2]),
}


@pytest.fixture
def weights_file(tmp_path) -> Path:
    from safetensors.torch import save_file

    path = tmp_path / "adapter_model.safetensors"
    tensors = {"w": torch.arange(64, dtype=torch.float32), "b": torch.ones(3, 5, dtype=torch.bfloat16)}
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def test_safetensors_good_files_pass(weights_file, tmp_path):
    from safetensors.torch import save_file

    assert safetensors_problem(weights_file) is None
    empty = tmp_path / "empty.safetensors"
    save_file({}, empty, metadata={"format": "pt"})  # no tensors, only metadata: still a whole file
    assert safetensors_problem(empty) is None


@pytest.mark.parametrize("damage", DAMAGED)
def test_safetensors_damaged_files_fail(weights_file, damage):
    weights_file.write_bytes(DAMAGED[damage](weights_file.read_bytes()))
    problem = safetensors_problem(weights_file)
    assert problem is not None and problem.startswith(weights_file.name), damage


# ---------------------------------------------------------------- DPO: telemetry and loss types


def _dpo_values(tmp_path: Path, model_dir: Path, **overrides) -> dict:
    return dpo_config(model_dir, tmp_path / "out", DPO_SAMPLE, **{"train_mode": "full", "max_steps": 1, **overrides})


def _dpo_parts(values: dict):
    """What runner.run hands build_trainer: config, arguments, model, tokenizer, data."""
    from component.model.loading import load_model, load_tokenizer
    from component.tasks.dpo import build_data, dpo_arguments

    config = config_of(values)
    args = dpo_arguments(config)
    tokenizer = load_tokenizer(config.model)
    return config, args, load_model(config), tokenizer, build_data(config, args, tokenizer)


@pytest.fixture
def pings(monkeypatch) -> queue.Queue:
    """huggingface_hub's telemetry queue, fresh and never sent; telemetry on unless something turns it off."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _telemetry

    monkeypatch.delenv("CI", raising=False)  # trl sends nothing under CI
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "0")  # recorded, so it is put back after the test
    monkeypatch.delenv("HF_HUB_DISABLE_TELEMETRY")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest's offline mode would also hide it
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", False)
    monkeypatch.setattr(_telemetry, "_TELEMETRY_QUEUE", queue.Queue())
    monkeypatch.setattr(_telemetry, "_start_telemetry_thread", lambda: None)
    return _telemetry._TELEMETRY_QUEUE


def test_trl_trainer_alone_would_ping(tmp_path, tiny_llama_dir, pings):
    """The control: without our switch, building the same trainer queues trl's ping."""
    from component.tasks.dpo import _trainer_class

    _, args, model, tokenizer, data = _dpo_parts(_dpo_values(tmp_path, tiny_llama_dir))
    _trainer_class()(model=model, args=args, train_dataset=data.train, processing_class=tokenizer)
    assert pings.get_nowait()["topic"] == "trl/other"


def test_dpo_trainer_sends_no_telemetry(tmp_path, tiny_llama_dir, pings):
    from component.tasks.dpo import build_trainer

    build_trainer(*_dpo_parts(_dpo_values(tmp_path, tiny_llama_dir)))
    assert pings.empty()
    assert "HF_HUB_DISABLE_TELEMETRY" not in os.environ  # set for trl's constructor only: nothing leaks


def test_dpo_loss_types_are_trls_documented_ones():
    from trl import DPOConfig

    from component.tasks.dpo import DPO_LOSS_TYPES

    documented = re.findall(r"`'(\w+)'`", DPOConfig.__dataclass_fields__["loss_type"].metadata["help"])
    assert sorted(DPO_LOSS_TYPES) == sorted(documented)


def test_trl_computes_every_loss_type_we_accept_and_fails_late_on_others(tmp_path, tiny_llama_dir):
    """Each accepted name runs trl's loss; an unknown one passes trl's DPOConfig and fails only at the loss."""
    from component.tasks.dpo import DPO_LOSS_TYPES, build_trainer, dpo_arguments

    config, args, model, tokenizer, data = _dpo_parts(_dpo_values(tmp_path, tiny_llama_dir))
    batch = None
    for loss_type in DPO_LOSS_TYPES:
        values = _dpo_values(tmp_path, tiny_llama_dir, dpo_loss_type=[loss_type], dpo_label_smoothing=1e-3)
        config = config_of(values)  # our check accepts it
        trainer = build_trainer(config, dpo_arguments(config), model, tokenizer, data)
        batch = batch or next(iter(trainer.get_train_dataloader()))
        assert torch.isfinite(trainer.compute_loss(trainer.model, batch)), loss_type
    with pytest.raises(ConfigError, match="key 'dpo_loss_type': unknown \\['nope'\\]"):
        config_of(_dpo_values(tmp_path, tiny_llama_dir, dpo_loss_type=["nope"]))
    unchecked = dataclasses.replace(args, loss_type=["nope"])  # trl's DPOConfig takes any name
    trainer = build_trainer(config, unchecked, model, tokenizer, data)
    with pytest.raises(ValueError, match="Unknown loss type: nope"):
        trainer.compute_loss(trainer.model, batch)


# ---------------------------------------------------------------- QLoRA merge base: dequantize()


@pytest.mark.parametrize("train_dtype", ["fp32", "bf16"])
def test_dequantize_gives_the_weights_the_4bit_layers_compute_with(tiny_llama_dir, train_dtype):
    import bitsandbytes.functional as bnbf

    from component.inference.generation import DTYPES, load_base
    from component.inference.merge import AdapterInfo, dequantized_base
    from component.model.quantization import is_quantized_linear

    quantized = load_base(str(tiny_llama_dir), DTYPES[train_dtype], load_in_4bit=True)
    expected = {
        f"{name}.weight": bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state).float().cpu()
        if is_quantized_linear(m)
        else m.weight.detach().float().cpu()
        for name, m in quantized.named_modules()
        if isinstance(getattr(m, "weight", None), torch.Tensor)
    }
    assert any(is_quantized_linear(m) for m in quantized.modules())
    info = AdapterInfo("unused", str(tiny_llama_dir), "qlora", train_dtype)
    base = dequantized_base(info)
    assert not any(is_quantized_linear(m) for m in base.modules())
    assert "quantization_config" not in base.config.to_dict()
    weights = base.state_dict()
    assert {weights[k].dtype for k in expected} == {torch.float32}
    for key, value in expected.items():
        assert torch.equal(weights[key], value), key


# ---------------------------------------------------------------- padding-free batches


def test_padding_free_collator_equals_transformers_flattening():
    from transformers import DataCollatorWithFlattening

    g = torch.Generator().manual_seed(0)
    features = []
    for n in (1, 7, 50, 3, 129):  # a one-token example too: its only label is masked
        ids = torch.randint(5, 1000, (n,), generator=g).tolist()
        features.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 3) + ids[n // 3 :]})
    ours = PaddingFreeCollator()(features)
    theirs = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(features)
    # Ours adds one key for the lean loss (not a model input): the positions whose next label is trained.
    label_rows = ours.pop(LABEL_ROWS)
    assert label_rows.tolist() == (theirs["labels"][0, 1:] != IGNORE_INDEX).nonzero().flatten().tolist()
    assert list(ours) == list(theirs)
    for key, value in ours.items():
        other = theirs[key]
        if isinstance(value, torch.Tensor):
            assert (value.dtype, value.shape) == (other.dtype, other.shape), key
            assert torch.equal(value, other), key
        else:
            assert type(value) is type(other) and value == other, key
