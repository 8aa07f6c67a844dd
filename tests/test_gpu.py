"""The GPU paths: padding-free attention, the lean loss and whole runs on CUDA (skipped without a GPU).

The same exactness checks as tests/test_padding_free.py and tests/test_lean_loss.py, on the
device where the kernels differ (CUDA sdpa, flash-attention's varlen path where installed),
and short bf16 training runs through `component.runner.run`.
"""

from __future__ import annotations

import json

import pytest
import torch

from component.data.collator import PaddingCollator, PaddingFreeCollator
from component.model.attention import FLASH_ATTENTION, SEGMENT_SDPA, flash_attention_usable
from component.training.loss import find_head_parts, lean_causal_lm_loss
from tests.conftest import base_config, write_config
from tests.runs import load_config, trainer_losses
from tests.test_padding_free import count_varlen_calls, examples
from tests.tiny import tiny_model, tiny_tokenizer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
TOL = dict(atol=1e-4, rtol=1e-3)  # CUDA fp32 matmuls may use TF32-free but reordered reductions


def on_cuda(batch: dict) -> dict:
    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}


def cuda_model(kind: str, tok, dtype=torch.float32):
    model = tiny_model(kind, tokenizer=tok).to("cuda", dtype)
    model.config.use_cache = False
    return model


def loss_and_grads(model, batch, lean: bool = False):
    model.zero_grad()
    if lean:
        loss = lean_causal_lm_loss(model, find_head_parts(model), batch)
    else:
        loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(reference, ours, tol=TOL, rel=1e-4):
    (loss_a, grads_a), (loss_b, grads_b) = reference, ours
    assert loss_b == pytest.approx(loss_a, rel=rel)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], **tol, msg=name)


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


CASES = [(SEGMENT_SDPA, torch.float32), (SEGMENT_SDPA, torch.bfloat16)]  # per-example sdpa; torch's varlen kernel
CASES += [(FLASH_ATTENTION, torch.bfloat16)] if flash_attention_usable() else []  # flash-attention has no fp32


@pytest.mark.parametrize("attention,dtype", CASES)
@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_padding_free_matches_padded_on_cuda(kind, attention, dtype):
    tok = tiny_tokenizer()
    model = cuda_model(kind, tok, dtype)
    feats = examples(len(tok))
    padded = loss_and_grads(model, on_cuda(PaddingCollator(tok.pad_token_id)(feats)))
    model.set_attn_implementation(attention)
    packed = loss_and_grads(model, on_cuda(PaddingFreeCollator()(feats)))
    if dtype == torch.bfloat16:
        assert_same(padded, packed, tol=dict(atol=2e-2, rtol=5e-2), rel=2e-2)
    else:
        assert_same(padded, packed)


def test_half_precision_uses_one_varlen_kernel_per_layer(monkeypatch):
    tok = tiny_tokenizer()
    model = cuda_model("llama", tok, torch.bfloat16)
    model.set_attn_implementation(SEGMENT_SDPA)
    calls = count_varlen_calls(monkeypatch)
    model(**on_cuda(PaddingFreeCollator()(examples(len(tok)))))
    assert calls["varlen"] == model.config.num_hidden_layers


def test_bf16_padding_free_step_syncs_once(monkeypatch):
    """Forward, lean loss and backward of a padding-free bf16 batch (not the whole training_step, which
    tests/test_sync_free.py covers on the CPU): at most one host synchronisation, transformers' packed-sequence
    check once per forward, as that test finds."""
    import warnings

    tok = tiny_tokenizer()
    model = cuda_model("llama", tok, torch.bfloat16)
    model.set_attn_implementation(SEGMENT_SDPA)
    batch = on_cuda(PaddingFreeCollator()(examples(len(tok))))
    parts = find_head_parts(model)
    lean_causal_lm_loss(model, parts, batch).backward()  # warm-up: allocations, kernel selection
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lean_causal_lm_loss(model, parts, batch).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, [f"{w.filename}:{w.lineno}" for w in syncs]


def test_fp32_projections_under_autocast_still_take_the_varlen_kernel(monkeypatch):
    """QLoRA keeps norms in fp32 and 4-bit layers return their input's dtype: q/k/v arrive in fp32 under bf16
    autocast. They are attended in bf16 by the varlen kernel (as sdpa would under autocast), once per layer."""
    tok = tiny_tokenizer()
    model = cuda_model("llama", tok, torch.float32)
    model.set_attn_implementation(SEGMENT_SDPA)
    calls = count_varlen_calls(monkeypatch)
    batch = on_cuda(PaddingFreeCollator()(examples(len(tok))))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = lean_causal_lm_loss(model, find_head_parts(model), batch)
    loss.backward()
    assert calls["varlen"] == model.config.num_hidden_layers and loss.isfinite()


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_lean_loss_matches_standard_on_cuda(kind):
    tok = tiny_tokenizer()
    model = cuda_model(kind, tok)
    model.set_attn_implementation(SEGMENT_SDPA)
    batch = on_cuda(PaddingFreeCollator()(examples(len(tok))))
    assert_same(loss_and_grads(model, batch), loss_and_grads(model, batch, lean=True))


@pytest.mark.parametrize("train_mode", ["full", "lora"])
def test_bf16_sft_run_on_cuda(tiny_llama_dir, tmp_path, train_mode):
    from component.runner import run

    out = tmp_path / "out"
    values = base_config(tiny_llama_dir, out, train_mode=train_mode, bf16=True, max_steps=10)
    if train_mode == "full":
        values["learning_rate"] = 1e-3
    config = load_config(["--train_args_file", str(write_config(tmp_path / "c.json", **values))])
    trainer = run(config)
    assert next(trainer.model.parameters()).device.type == "cuda"
    assert trainer.model.config._attn_implementation in (SEGMENT_SDPA, FLASH_ATTENTION)
    losses = trainer_losses(trainer)
    assert losses[-1] < losses[0]
    report = json.loads((out / "report.json").read_text())
    assert report
