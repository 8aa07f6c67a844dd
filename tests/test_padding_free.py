"""Padding-free batches: exact layout, the same loss and gradients as padding, no dense mask."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, MistralConfig

from component.data.collator import PaddingCollator, PaddingFreeCollator
from component.data.template import IGNORE_INDEX
from component.errors import ConfigError
from component.model import attention as padding_free
from component.model.attention import SEGMENT_SDPA, register_attention, segment_bounds
from component.model.loading import load_tokenizer
from component.tasks.sft import build_data
from component.training.setup import training_arguments
from tests.conftest import base_config, write_config
from tests.runs import load_config, trainer_losses
from tests.tiny import tiny_model, tiny_tokenizer

LENGTHS = (7, 12, 5, 9)

# Model loading registers `segment_sdpa`; these tests build models directly, so they register it themselves
# (alone, this module would otherwise depend on another test having loaded a model first).
register_attention()
TOL = dict(atol=1e-5, rtol=1e-4)


def examples(vocab: int, lengths=LENGTHS, prompt: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n in lengths:
        ids = torch.randint(5, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def training_model(kind: str, tok):
    model = tiny_model(kind, tokenizer=tok)
    # As load_model does: with a cache, transformers stops detecting packed position_ids.
    model.config.use_cache = False
    return model


def loss_and_grads(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def count_varlen_calls(monkeypatch) -> dict:
    """Counts calls of the varlen path (in the returned dict's "varlen"); the per-example path fails the test."""
    calls = {"varlen": 0}
    varlen = padding_free._attend_varlen

    def spy(*args):
        calls["varlen"] += 1
        return varlen(*args)

    def no_per_example(*_args):
        raise AssertionError("per-example sdpa where the varlen path was expected")

    monkeypatch.setattr(padding_free, "_attend_varlen", spy)
    monkeypatch.setattr(padding_free, "_attend_segments", no_per_example)
    return calls


def assert_same(padded, packed):
    (loss_a, grads_a), (loss_b, grads_b) = padded, packed
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], **TOL, msg=name)


def test_collator_concatenates_without_padding():
    feats = [{"input_ids": [10, 11, 12], "labels": [-100, 11, 12]}, {"input_ids": [20, 21], "labels": [20, 21]}]
    batch = PaddingFreeCollator()(feats)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # Each example's first token is never a target: it would be predicted from the previous example.
    assert batch["labels"].tolist() == [[-100, 11, 12, -100, 21]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5]
    assert batch["max_length_q"] == 3
    assert batch["label_rows"].tolist() == [0, 1, 3]  # positions whose next label is trained, for the lean loss
    assert "attention_mask" not in batch


def test_segment_bounds_from_positions_and_cu_seqlens():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert segment_bounds(pos) == [0, 3, 5, 9]
    assert segment_bounds(pos, torch.tensor([0, 3, 5, 9])) == [0, 3, 5, 9]


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_padding_free_matches_padded(kind):
    tok = tiny_tokenizer()
    model = training_model(kind, tok)
    feats = examples(len(tok))
    padded = loss_and_grads(model, PaddingCollator(tok.pad_token_id)(feats))
    model.set_attn_implementation(SEGMENT_SDPA)
    assert_same(padded, loss_and_grads(model, PaddingFreeCollator()(feats)))


def test_transformers_default_attention_also_matches():
    # The fallback for model types without a sequence-aware attention: a dense block mask, slower but exact.
    tok = tiny_tokenizer()
    model = training_model("llama", tok)
    feats = examples(len(tok))
    padded = loss_and_grads(model, PaddingCollator(tok.pad_token_id)(feats))
    assert_same(padded, loss_and_grads(model, PaddingFreeCollator()(feats)))


def test_sliding_window_is_kept_per_sequence():
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=4,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.config.use_cache = False
    feats = examples(len(tok))
    padded = loss_and_grads(model, PaddingCollator(tok.pad_token_id)(feats))
    model.set_attn_implementation(SEGMENT_SDPA)
    assert_same(padded, loss_and_grads(model, PaddingFreeCollator()(feats)))


def test_no_dense_mask_and_attention_per_sequence(monkeypatch):
    tok = tiny_tokenizer()
    model = training_model("llama", tok)
    model.set_attn_implementation(SEGMENT_SDPA)

    def no_dense_mask(**_kwargs):
        raise AssertionError("a dense mask was built for a padding-free batch")

    seen = []
    attend = padding_free._attend_segments

    def spy(query, key, value, bounds, *args):
        seen.append(list(bounds))
        return attend(query, key, value, bounds, *args)

    monkeypatch.setattr(padding_free, "sdpa_mask", no_dense_mask)
    monkeypatch.setattr(padding_free, "_attend_segments", spy)
    model(**PaddingFreeCollator()(examples(len(tok))))
    assert seen == [[0, 7, 19, 24, 33]] * model.config.num_hidden_layers


def test_padded_batch_through_segment_sdpa_is_unchanged():
    tok = tiny_tokenizer()
    model = training_model("llama", tok)
    batch = PaddingCollator(tok.pad_token_id)(examples(len(tok)))
    reference = loss_and_grads(model, batch)
    model.set_attn_implementation(SEGMENT_SDPA)
    assert_same(reference, loss_and_grads(model, batch))


def _data(model_dir, tmp_path, **overrides):
    path = write_config(tmp_path / "c.json", **base_config(model_dir, tmp_path / "out", **overrides))
    config = load_config(["--train_args_file", str(path)])
    return config, build_data(config, training_arguments(config), load_tokenizer(config.model))


def test_collator_chosen_per_model_type(tiny_llama_dir, tiny_bloom_dir, tmp_path):
    assert isinstance(_data(tiny_llama_dir, tmp_path)[1].collator, PaddingFreeCollator)
    assert isinstance(_data(tiny_llama_dir, tmp_path, padding_free=False)[1].collator, PaddingCollator)
    assert isinstance(_data(tiny_bloom_dir, tmp_path)[1].collator, PaddingCollator)
    with pytest.raises(ConfigError, match="padding_free"):
        _data(tiny_bloom_dir, tmp_path, padding_free=True)


def test_training_run_uses_segment_attention(tiny_llama_dir, tmp_path):
    from component.runner import run

    config = load_config(
        [
            "--train_args_file",
            str(write_config(tmp_path / "c.json", **base_config(tiny_llama_dir, tmp_path / "out", train_mode="full"))),
        ]
    )
    trainer = run(config)
    assert trainer.model.config._attn_implementation == SEGMENT_SDPA
    losses = trainer_losses(trainer)
    assert losses[-1] < losses[0]
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert SEGMENT_SDPA not in json.dumps(saved)  # later tools load the model without our registry


def _reference_varlen(with_window: bool, with_gqa: bool):
    """A slow stand-in that follows torch.nn.attention.varlen.varlen_attn's documented contract (CPU has no kernel)."""

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, **kw):
        assert q.dim() == 3 and q.is_contiguous() and cu_q.dtype == torch.int32 and max_q == max_k
        if kw.get("enable_gqa"):
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        assert k.shape[1] == q.shape[1], "GQA needs enable_gqa or repeated key/value heads"
        left, right = kw["window_size"] if with_window else (-1, 0)
        assert right == 0 and (with_window or kw["is_causal"])
        out = torch.empty_like(q)
        bounds = cu_q.tolist()
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            n = end - start
            i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
            mask = (j <= i) & ((i - j <= left) if left >= 0 else True)
            out[start:end] = F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1),
                k[start:end].transpose(0, 1),
                v[start:end].transpose(0, 1),
                attn_mask=mask,
                scale=scale,
            ).transpose(0, 1)
        return out

    params = {"scale"} | ({"window_size"} if with_window else {"is_causal"}) | ({"enable_gqa"} if with_gqa else set())
    return varlen_attn, frozenset(params)


@pytest.mark.parametrize(
    "with_window,with_gqa,sliding_window",
    [(True, True, None), (True, True, 4), (True, False, 4), (False, True, None), (False, False, None)],
)
def test_varlen_call_matches_per_segment_sdpa(monkeypatch, with_window, with_gqa, sliding_window):
    # The GPU path hands the whole row to torch's varlen FlashAttention; its arguments are checked here
    # against a reference of that function's contract (the kernel itself runs in tests/test_gpu.py).
    monkeypatch.setattr(padding_free, "_torch_varlen", lambda: _reference_varlen(with_window, with_gqa))
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, bounds = 4, 2, 8, [0, 7, 19, 24, 33]
    query = torch.randn(1, heads, bounds[-1], dim, generator=g)
    key, value = (torch.randn(1, kv_heads, bounds[-1], dim, generator=g) for _ in range(2))
    cu = torch.tensor(bounds, dtype=torch.int32)
    ours = padding_free._attend_varlen(query, key, value, cu, 12, 0.3, sliding_window, heads // kv_heads)
    groups = heads // kv_heads
    ref = padding_free._attend_segments(
        query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), bounds, 0.3, 0.0, sliding_window
    )
    torch.testing.assert_close(ours, ref.transpose(1, 2), atol=1e-6, rtol=1e-5)


def test_varlen_without_window_support_refuses_sliding_window(monkeypatch):
    monkeypatch.setattr(padding_free, "_torch_varlen", lambda: _reference_varlen(False, True))
    x = torch.zeros(1, 2, 6, 4)
    with pytest.raises(ValueError, match="sliding window"):
        padding_free._attend_varlen(x, x, x, torch.tensor([0, 6], dtype=torch.int32), 6, None, 4, 1)


def test_varlen_path_only_on_cuda_half_precision():
    kwargs = {"cu_seq_lens_q": torch.tensor([0, 3], dtype=torch.int32), "max_length_q": 3}
    assert not padding_free._varlen_usable(torch.zeros(1, 2, 3, 4, dtype=torch.bfloat16), 0.0, kwargs)  # CPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segment_attention_output_is_contiguous_in_its_input_dtype(dtype):
    # Callers may .view() it; `.to(dtype, memory_format=...)` alone does not copy when the dtype is already right.
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    g = torch.Generator().manual_seed(0)
    query = torch.randn(1, 4, 12, 8, generator=g).to(dtype)
    key, value = (torch.randn(1, 2, 12, 8, generator=g).to(dtype) for _ in range(2))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    out, _ = padding_free.segment_sdpa_attention_forward(
        module, query, key, value, None, position_ids=positions, cu_seq_lens_q=cu, max_length_q=7
    )
    assert out.shape == (1, 12, 4, 8) and out.dtype == dtype and out.is_contiguous()
