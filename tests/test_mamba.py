"""Mamba fine-tuning: which LoRA targets train, full/LoRA/QLoRA learn, padding and accumulation are exact.

Tiny random MambaForCausalLM / Mamba2ForCausalLM on the CPU, with a tokenizer
whose BOS/EOS is GPT-NeoX's `<|endoftext|>` and which has no pad token (as
GPT-NeoX). The CUDA fast path (mamba_ssm's fused `mamba_inner_fn`) cannot run
here, so the `fast_path` fixture swaps in a PyTorch stand-in with the kernel's
signature. Like the kernel it sees only the tensors MambaMixer passes it: the
raw weights of conv1d, x_proj, dt_proj and out_proj. An adapter the kernel
would bypass therefore gets no gradient here either. The stand-in is first
checked against the PyTorch path's output.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Mamba2Config, TrainerCallback
from transformers.models.mamba import modeling_mamba

from component.data.collator import PaddingCollator
from component.data.template import IGNORE_INDEX, Message, encode_messages, stop_token_ids
from component.data.template_registry import get_template
from component.errors import ConfigError
from component.model import loading as model_module
from component.model.loading import apply_lora, torch_dtype
from component.model.model_types import MODEL_TYPES, model_type_info
from component.runner import run
from component.tasks.sft import build_data
from component.training.setup import training_arguments
from tests.conftest import ROOT, base_config, write_config
from tests.runs import load_config, trainer_losses
from tests.tiny import tiny_model, tiny_tokenizer

NEOX_EOS = "<|endoftext|>"
NEOX_ASSET = ROOT / "tests" / "assets" / "tokenizers" / "gpt_neox"
TIED = {"embeddings", "lm_head"}
# Per-example losses and the merged model must match to this relative error.
REL_TOL = 1e-4


# ---------------------------------------------------------------- fixtures


def neox_like_tokenizer():
    """The real (trimmed) GPT-NeoX tokenizer where the templates' assets hold it, else a tiny one like it."""
    if (NEOX_ASSET / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(NEOX_ASSET))
    return tiny_tokenizer(bos=NEOX_EOS, eos=NEOX_EOS, pad=None)


def save_tiny(kind: str, path: Path) -> Path:
    """A tiny random Mamba/Mamba2 and the NeoX-like tokenizer, with non-zero conv1d biases.

    Random init zeroes the conv1d biases; trained checkpoints' are not zero,
    and a zero bias would hide how padding reaches the recurrent state.
    """
    tokenizer = tiny_tokenizer(bos=NEOX_EOS, eos=NEOX_EOS, pad=None)
    if kind == "mamba":
        model = tiny_model("mamba", tokenizer=tokenizer)
    else:
        config = Mamba2Config(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            state_size=8,
            expand=2,
            conv_kernel=4,
            num_heads=8,
            head_dim=8,
            n_groups=1,
            chunk_size=8,
            use_cache=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.mixer.conv1d.bias.normal_(0.0, 0.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mamba_dir(tmp_path_factory) -> Path:
    return save_tiny("mamba", tmp_path_factory.mktemp("tiny-mamba"))


@pytest.fixture(scope="module")
def mamba2_dir(tmp_path_factory) -> Path:
    return save_tiny("mamba2", tmp_path_factory.mktemp("tiny-mamba2"))


@pytest.fixture(params=["mamba", "mamba2"])
def any_mamba_dir(request, mamba_dir, mamba2_dir) -> Path:
    return {"mamba": mamba_dir, "mamba2": mamba2_dir}[request.param]


def _mamba_inner_standin(
    xz,
    conv1d_weight,
    conv1d_bias,
    x_proj_weight,
    delta_proj_weight,
    out_proj_weight,
    out_proj_bias,
    A,
    B=None,
    C=None,
    D=None,
    delta_bias=None,
    delta_softplus=True,
    **_,
):
    """mamba_ssm's fused mamba_inner_fn in PyTorch: computes from the raw weights it is given, nothing else."""
    x, z = xz.chunk(2, dim=1)
    x = modeling_mamba.causal_conv1d_fn(x, conv1d_weight.squeeze(1), conv1d_bias, activation="silu")
    rank, state = delta_proj_weight.shape[1], A.shape[-1]
    dt, b, c = torch.split(F.linear(x.transpose(1, 2), x_proj_weight), [rank, state, state], dim=-1)
    delta = delta_proj_weight @ dt.transpose(1, 2)
    y = modeling_mamba.mamba_selective_scan(
        x,
        delta,
        A,
        b.transpose(1, 2),
        c.transpose(1, 2),
        D=D,
        z=z,
        delta_bias=delta_bias,
        delta_softplus=delta_softplus,
    )
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)


@pytest.fixture
def fast_path(monkeypatch):
    """Route MambaMixer's training forward through the fused-kernel stand-in; counts its calls."""
    calls = []

    def standin(*args, **kwargs):
        calls.append(1)
        return _mamba_inner_standin(*args, **kwargs)

    monkeypatch.setattr(modeling_mamba, "mamba_inner_fn", standin)
    return calls


@dataclass
class TrainingPath:
    name: str
    calls: list

    def check_used(self) -> None:
        """On the fast path, the stand-in must really have run (once per layer and forward)."""
        assert self.name == "pytorch" or self.calls, "the fused-kernel stand-in never ran"


@pytest.fixture(params=["pytorch", "fast"])
def path(request) -> TrainingPath:
    """Run a test on both training paths: transformers' PyTorch path and the fused-kernel stand-in."""
    calls = request.getfixturevalue("fast_path") if request.param == "fast" else []
    return TrainingPath(request.param, calls)


def _model(model_dir: Path, **kwargs):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs)


def _config(tmp_path, model_dir, **overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    values = base_config(model_dir, tmp_path / "out", template_name="mamba", **overrides)
    return load_config(["--train_args_file", str(write_config(tmp_path / "c.json", **values))])


def _ids(n: int = 10, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


def _adapted_modules_with_grad(model) -> set[str]:
    """Module names (last part) whose LoRA A and B matrices both hold a non-zero gradient."""
    grads: dict[str, list[bool]] = {}
    for name, p in model.named_parameters():
        match = re.search(r"\.(\w+)\.lora_(?:embedding_)?[AB]\b", name)
        if match:
            grads.setdefault(match.group(1), []).append(p.grad is not None and bool(p.grad.abs().sum() > 0))
    return {module for module, flags in grads.items() if all(flags)}


# ---------------------------------------------------------------- which targets train


@pytest.mark.parametrize("module", ["out_proj", "conv1d"])
def test_peft_refuses_out_proj_and_conv1d(mamba_dir, module):
    from peft import LoraConfig, get_peft_model

    with pytest.raises(ValueError, match=module):
        get_peft_model(_model(mamba_dir), LoraConfig(r=4, target_modules=[module]))


def test_fast_path_standin_matches_pytorch_path(mamba_dir, monkeypatch):
    model = _model(mamba_dir).train()
    ids = _ids()
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    calls = []
    monkeypatch.setattr(
        modeling_mamba, "mamba_inner_fn", lambda *a, **k: calls.append(1) or _mamba_inner_standin(*a, **k)
    )
    with torch.no_grad():
        standin = model(input_ids=ids).logits
    assert len(calls) == model.config.num_hidden_layers
    torch.testing.assert_close(standin, reference, rtol=1e-5, atol=1e-5)


# LoRA on every module peft allows; which adapters get a gradient on each path?
EXPECTED_TRAINED = {"pytorch": {"in_proj", "x_proj", *TIED}, "fast": {"in_proj", *TIED}}


def test_which_adapters_train_on_each_path(mamba_dir, path):
    from peft import LoraConfig, get_peft_model

    targets = ["in_proj", "x_proj", "dt_proj", *sorted(TIED)]
    model = get_peft_model(_model(mamba_dir), LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    model.train()
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    path.check_used()
    trained = _adapted_modules_with_grad(model)
    assert trained == EXPECTED_TRAINED[path.name]
    # Default targets train on both paths; everything else allowed by peft is refused with a reason.
    info = model_type_info("mamba")
    assert set(info.lora_targets) <= EXPECTED_TRAINED["pytorch"] & EXPECTED_TRAINED["fast"]
    refused = {m for m, _ in info.refused_lora_targets}
    assert set(targets) - set(info.lora_targets) <= refused


def test_tied_embedding_adapter_does_not_merge(mamba_dir):
    """Why embeddings/lm_head are refused: they share one matrix, so a merged adapter changes both."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(mamba_dir), LoraConfig(r=4, target_modules=["embeddings"], init_lora_weights=False))
    model.eval()
    ids = _ids()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        merged = model.merge_and_unload()(input_ids=ids).logits
    assert (merged - adapted).abs().max() / adapted.abs().max() > 1e-2


@pytest.mark.parametrize(
    "targets, named, reason",
    [
        (["x_proj"], "x_proj", "fast path"),
        (["dt_proj"], "dt_proj", "dt_proj.weight @ x"),
        (["in_proj", "out_proj"], "out_proj", "peft refuses"),
        (["conv1d"], "conv1d", "peft refuses"),
        (["embeddings"], "embeddings", "merged model"),
        (["backbone.layers.0.mixer.x_proj"], "x_proj", "fast path"),
        (["all-linear"], "all-linear", "x_proj"),
    ],
)
def test_refused_target_is_a_config_error_before_output_dir(tmp_path, mamba_dir, targets, named, reason):
    values = base_config(mamba_dir, tmp_path / "out", template_name="mamba", lora_target_modules=targets)
    with pytest.raises(ConfigError) as err:
        load_config(["--train_args_file", str(write_config(tmp_path / "c.json", **values))])
    assert f"'{named}'" in str(err.value) and reason in str(err.value) and "lora_target_modules" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_refused_target_checked_again_when_lora_is_applied(tmp_path, mamba_dir, monkeypatch):
    """A hub model not in the local cache is only known once loaded: apply_lora refuses it there."""
    monkeypatch.setattr(model_module, "_cached_model_config", lambda values: None)
    config = _config(tmp_path, mamba_dir, lora_target_modules=["dt_proj"])
    with pytest.raises(ConfigError, match="'dt_proj'.*dt_proj.weight @ x"):
        apply_lora(_model(mamba_dir), config)


def test_mamba2_refuses_out_proj(tmp_path, mamba2_dir):
    values = base_config(mamba2_dir, tmp_path / "out", template_name="mamba", lora_target_modules=["out_proj"])
    with pytest.raises(ConfigError, match="'out_proj'.*peft refuses"):
        load_config(["--train_args_file", str(write_config(tmp_path / "c.json", **values))])


# ---------------------------------------------------------------- training


class GradRecorder(TrainerCallback):
    """Remembers each trainable parameter's first value and whether it ever had a non-zero gradient."""

    def __init__(self):
        self.initial: dict[str, torch.Tensor] = {}
        self.had_grad: set[str] = set()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        for name, p in model.named_parameters():
            if p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0:
                self.had_grad.add(name)


def _train(tmp_path, model_dir, **overrides):
    recorder = GradRecorder()
    # The whole (8-conversation) set in every step, so the losses of successive steps are comparable.
    values = dict(per_device_train_batch_size=8, max_steps=8, learning_rate=2e-2)
    trainer = run(_config(tmp_path, model_dir, **{**values, **overrides}), callbacks=[recorder])
    return trainer, recorder


def dead_adapters(out_dir: Path, recorder: GradRecorder) -> list[str]:
    """Saved adapter tensors that never had a gradient or never changed; [] when every one learned."""
    saved = load_file(str(out_dir / "adapter_model.safetensors"))
    initial = {re.sub(r"\.default(?=\.)", "", n): v for n, v in recorder.initial.items()}
    had_grad = {re.sub(r"\.default(?=\.)", "", n) for n in recorder.had_grad}
    assert set(saved) == set(initial), "saved adapter and trainable parameters differ"
    return sorted(k for k in saved if k not in had_grad or torch.equal(saved[k], initial[k]))


@pytest.mark.parametrize("mode, checkpointing", [("lora", False), ("lora", True), ("qlora", False)])
def test_every_saved_adapter_tensor_learns(tmp_path, mamba_dir, monkeypatch, mode, checkpointing, path):
    if mode == "qlora":
        pytest.importorskip("bitsandbytes")
    trainer, recorder = _train(tmp_path, mamba_dir, train_mode=mode, gradient_checkpointing=checkpointing)
    path.check_used()
    losses = trainer_losses(trainer)
    assert losses[-1] < losses[0] - 0.3, losses
    assert dead_adapters(tmp_path / "out", recorder) == []
    assert {n.split(".")[-4] for n in recorder.initial} == {"in_proj"}


def test_dead_adapter_is_detected(tmp_path, mamba_dir, monkeypatch):
    """The check above fails when an adapter is bypassed: dt_proj's, forced past our refusal."""
    monkeypatch.setattr(model_module, "check_lora_targets", lambda *a: None)
    monkeypatch.setattr(model_module, "_cached_model_config", lambda values: None)
    _, recorder = _train(tmp_path, mamba_dir, lora_target_modules=["in_proj", "dt_proj"], max_steps=2)
    dead = dead_adapters(tmp_path / "out", recorder)
    assert dead and all(".dt_proj." in k for k in dead)


def test_full_training_loss_falls(tmp_path, any_mamba_dir, monkeypatch):
    trainer, recorder = _train(tmp_path, any_mamba_dir, train_mode="full", learning_rate=3e-3)
    losses = trainer_losses(trainer)
    assert losses[-1] < losses[0] - 0.3, losses
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_mamba2_trains_every_adapter(tmp_path, mamba2_dir, monkeypatch, mode):
    if mode == "qlora":
        pytest.importorskip("bitsandbytes")
    trainer, recorder = _train(tmp_path, mamba2_dir, train_mode=mode)
    losses = trainer_losses(trainer)
    assert losses[-1] < losses[0] - 0.3, losses
    assert dead_adapters(tmp_path / "out", recorder) == []
    assert {n.split(".")[-4] for n in recorder.initial} == {"in_proj"}


# ---------------------------------------------------------------- merge


def _merge(adapter_dir: Path, out_dir: Path) -> Path:
    from script.merge_lora import main as merge_main

    assert merge_main(["--adapter_dir", str(adapter_dir), "--output_dir", str(out_dir)]) == 0
    return out_dir


def test_merged_lora_equals_base_plus_adapter(tmp_path, any_mamba_dir, monkeypatch):
    from peft import PeftModel

    _train(tmp_path, any_mamba_dir, max_steps=4)
    merged = AutoModelForCausalLM.from_pretrained(_merge(tmp_path / "out", tmp_path / "merged")).eval()
    adapted = PeftModel.from_pretrained(_model(any_mamba_dir), str(tmp_path / "out")).eval()
    ids = _ids(16)
    with torch.no_grad():
        reference, result = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
        base = _model(any_mamba_dir).eval()(input_ids=ids).logits
    assert (reference - base).abs().max() > 1e-3  # the adapter does something
    assert ((result - reference).abs().max() / reference.abs().max()).item() < REL_TOL


def test_merged_qlora_equals_trained_model(tmp_path, mamba_dir, monkeypatch):
    pytest.importorskip("bitsandbytes")
    trainer, _ = _train(tmp_path, mamba_dir, train_mode="qlora", max_steps=4)
    merged = AutoModelForCausalLM.from_pretrained(_merge(tmp_path / "out", tmp_path / "merged")).eval()
    trained = trainer.model.eval()
    ids = _ids(16)
    with torch.no_grad():
        reference, result = trained(input_ids=ids).logits, merged(input_ids=ids).logits
    assert ((result - reference).abs().max() / reference.abs().max()).item() < REL_TOL


# ---------------------------------------------------------------- QLoRA skips


@pytest.mark.parametrize(
    "skip, fast, runs",
    [
        (None, False, False),  # transformers' default skips only lm_head: dt_proj.weight @ x fails
        (("dt_proj", "lm_head"), False, True),  # the minimum the PyTorch path needs
        (("dt_proj", "lm_head"), True, False),  # the fused kernel reads x_proj/out_proj raw too
        ("data", False, True),
        ("data", True, True),
    ],
)
def test_quantization_skips_needed_for_4bit(mamba_dir, monkeypatch, skip, fast, runs):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    if skip == "data":
        skip = model_type_info("mamba").quantization_skip
    if fast:
        monkeypatch.setattr(modeling_mamba, "mamba_inner_fn", _mamba_inner_standin)
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=list(skip) if skip else None
    )
    model = _model(mamba_dir, quantization_config=quant).train()
    ids = _ids()
    if runs:
        assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
    else:
        with pytest.raises((RuntimeError, AssertionError, ValueError)):
            model(input_ids=ids, labels=ids)


# ---------------------------------------------------------------- loss


@pytest.mark.parametrize("mode, lean_loss", [("full", True), ("lora", True), ("lora", False)])
def test_gradient_accumulation_invariance(tmp_path, mamba_dir, monkeypatch, mode, lean_loss):
    """Batch 4 x accumulation 1 == batch 1 x accumulation 4: same loss, same update (plain SGD).

    With lean_loss off this is transformers' own loss: MambaForCausalLM.forward
    takes **kwargs and hands num_items_in_batch to its loss_function, so
    Trainer normalises by the token count of the whole accumulated batch.
    """
    results = []
    for batch, accumulation in ((4, 1), (1, 4)):
        trainer, _ = _train(
            tmp_path / f"{batch}x{accumulation}",
            mamba_dir,
            train_mode=mode,
            lean_loss=lean_loss,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            optim="sgd",
            learning_rate=0.5,
            lr_scheduler_type="constant",
        )
        assert trainer.model_accepts_loss_kwargs and (trainer.lean is not None) == lean_loss
        params = torch.cat([p.detach().flatten() for p in trainer.model.parameters() if p.requires_grad])
        results.append((trainer_losses(trainer)[0], params))
    (loss_a, params_a), (loss_b, params_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    torch.testing.assert_close(params_a, params_b, rtol=1e-5, atol=1e-6)


def _examples(tmp_path, model_dir, n: int = 3) -> tuple[list[dict], object]:
    config = _config(tmp_path, model_dir)
    tokenizer = model_module.load_tokenizer(config.model)
    data = build_data(config, training_arguments(config), tokenizer)
    rows = sorted((data.train[i] for i in range(len(data.train))), key=lambda r: len(r["input_ids"]))
    picked = [rows[0], rows[len(rows) // 2], rows[-1]][:n]
    assert len({len(r["input_ids"]) for r in picked}) == n  # really different lengths
    return picked, tokenizer


def _per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    shifted = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )
    return shifted.sum(1) / labels[:, 1:].ne(IGNORE_INDEX).sum(1)


def test_right_padded_batch_equals_each_example_alone(tmp_path, any_mamba_dir, path):
    rows, tokenizer = _examples(tmp_path, any_mamba_dir)
    collate = PaddingCollator(tokenizer.pad_token_id)
    model = _model(any_mamba_dir).train()  # train mode: the fast path where it exists
    if path.name == "fast" and model.config.model_type != "mamba":
        pytest.skip("the fused-kernel stand-in replaces Mamba's mamba_inner_fn only")
    with torch.no_grad():
        batch = collate(rows)
        batched = _per_example_loss(
            model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits, batch["labels"]
        )
        alone = torch.cat(
            [
                _per_example_loss(model(input_ids=b["input_ids"]).logits, b["labels"])
                for b in (collate([r]) for r in rows)
            ]
        )
    path.check_used()
    assert batch["attention_mask"][0, -1] == 0  # the shortest example really is padded, on the right
    torch.testing.assert_close(batched, alone, rtol=REL_TOL, atol=0)


def test_mamba_batches_are_right_padded_never_packed(tmp_path, any_mamba_dir):
    from component.tasks.sft import choose_collator

    config = _config(tmp_path, any_mamba_dir)
    tokenizer = model_module.load_tokenizer(config.model)
    assert type(choose_collator(config, tokenizer)) is PaddingCollator
    with pytest.raises(ConfigError, match="padding_free.*recurrent"):
        choose_collator(_config(tmp_path, any_mamba_dir, padding_free=True), tokenizer)


def test_left_padding_would_leak_into_the_state_on_the_fast_path(tmp_path, mamba_dir, fast_path):
    """Why Mamba is right-padding only: the fused kernel ignores attention_mask."""
    rows, tokenizer = _examples(tmp_path, mamba_dir, n=2)
    model = _model(mamba_dir).train()
    short = torch.tensor([rows[0]["input_ids"]])
    pad = len(rows[1]["input_ids"]) - short.shape[1]
    left = torch.cat([torch.full((1, pad), tokenizer.pad_token_id), short], dim=1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones_like(short)], dim=1)
    with torch.no_grad():
        alone = model(input_ids=short).logits
        padded = model(input_ids=left, attention_mask=mask).logits[:, pad:]
    assert (padded - alone).abs().max() > 1e-3


# ---------------------------------------------------------------- template and configs


def test_mamba_template_supervised_tokens_end_with_endoftext():
    tokenizer = neox_like_tokenizer()
    eos_id = tokenizer.convert_tokens_to_ids(NEOX_EOS)
    template = get_template("mamba")
    messages = [
        Message("system", "Be brief."),
        Message("user", "hello there"),
        Message("assistant", "hi"),
        Message("user", "What is two plus two?"),
        Message("assistant", "Two plus two is four."),
    ]
    encoded = encode_messages(template, tokenizer, messages)
    runs, current = [], []
    for label in encoded.labels:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    runs += [current] if current else []
    assert len(runs) == 2  # one supervised run per assistant reply
    assert all(run[-1] == eos_id and eos_id not in run[:-1] for run in runs)
    assert stop_token_ids(template, tokenizer) == [eos_id]
    if NEOX_ASSET.is_dir():
        assert eos_id == 0  # GPT-NeoX's <|endoftext|>


def test_every_training_example_ends_with_endoftext(tmp_path, mamba_dir):
    config = _config(tmp_path, mamba_dir)
    tokenizer = model_module.load_tokenizer(config.model)
    eos_id = tokenizer.convert_tokens_to_ids(NEOX_EOS)
    data = build_data(config, training_arguments(config), tokenizer)
    for row in data.train:
        supervised = [t for t in row["labels"] if t != IGNORE_INDEX]
        assert supervised and supervised[-1] == eos_id


MAMBA_CONFIGS = sorted((ROOT / "train_args").glob("mamba-*.json"))


def test_mamba_configs_exist():
    names = {p.name for p in MAMBA_CONFIGS}
    assert {"mamba-1.4b-sft-lora.json", "mamba-2.8b-sft-lora.json"} <= names


@pytest.mark.parametrize("config_path", MAMBA_CONFIGS, ids=lambda p: p.name)
def test_mamba_configs_train_in_the_recommended_dtype_and_targets(config_path):
    raw = json.loads(config_path.read_text())
    assert {"task_type", "train_mode", "fp16", "bf16"} <= set(raw)  # nothing rides on a hidden default
    config = load_config(["--train_args_file", str(config_path)])
    # fp32, as Mamba's authors advise: no fp16/bf16 flag (the reference config's fp16 contradicted that)
    assert torch_dtype(config) == getattr(torch, MODEL_TYPES["mamba"].recommended_dtype)
    targets = config.method.lora_target_modules
    assert targets is None or set(targets) <= set(model_type_info("mamba").lora_targets)


@pytest.mark.parametrize("config_path", MAMBA_CONFIGS, ids=lambda p: p.name)
def test_mamba_config_runs_on_a_tiny_model(tmp_path, mamba_dir, config_path):
    """Each shipped config, its precision, optimizer and checkpointing included, trains (model and data swapped)."""
    if json.loads(config_path.read_text())["train_mode"] == "qlora":
        pytest.importorskip("bitsandbytes")
    overrides = {
        "model_name_or_path": str(mamba_dir),
        "train_file": str(ROOT / "tests" / "data" / "tiny_sft.jsonl"),
        "output_dir": str(tmp_path / "out"),
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "tokenize_num_workers": 1,
        "report_to": "none",
        "logging_steps": 1,
    }
    argv = ["--train_args_file", str(config_path)] + [x for k, v in overrides.items() for x in (f"--{k}", str(v))]
    trainer = run(load_config(argv))
    assert all(torch.isfinite(torch.tensor(loss)) for loss in trainer_losses(trainer))
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_recommended_precision_warns(mamba_dir, monkeypatch):
    warnings = []
    monkeypatch.setattr(model_module.logger, "warning", warnings.append)
    model_module.warn_precision("mamba", torch.float32)
    assert warnings == []
    model_module.warn_precision("mamba", torch.float16)
    assert len(warnings) == 1 and "float32" in warnings[0]
