"""The lean loss equals the standard full-logits loss, in value and gradients, wherever it is used."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Gemma2Config, GPT2Config, TrainingArguments

from component.data.collator import PaddingCollator, PaddingFreeCollator
from component.data.template import IGNORE_INDEX
from component.training import loss as lean
from component.training.loss import find_head_parts, lean_causal_lm_loss
from component.training.trainer import FinetuneTrainer
from tests.tiny import tiny_model, tiny_tokenizer

TOL = dict(atol=1e-5, rtol=1e-4)


def examples(vocab: int, lengths=(9, 14, 6, 11)) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for n in lengths:
        ids = torch.randint(5, vocab, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX] * 3 + ids[3:]
        labels[5] = IGNORE_INDEX  # a gap inside the reply, as a second user turn would leave
        out.append({"input_ids": ids, "labels": labels})
    return out


def model_of(kind: str, tok):
    model = tiny_model(kind, tokenizer=tok)
    model.config.use_cache = False
    return model


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def standard(model, batch, num_items=None):
    model.zero_grad()
    kwargs = {"num_items_in_batch": num_items} if num_items is not None else {}
    loss = model(**batch, **kwargs).loss
    loss.backward()
    return loss.item(), grads(model)


def lean_loss(model, batch, num_items=None):
    model.zero_grad()
    parts = find_head_parts(model)
    assert parts is not None
    loss = lean_causal_lm_loss(model, parts, batch, num_items)
    loss.backward()
    return loss.item(), grads(model)


def assert_same(reference, ours):
    (loss_a, grads_a), (loss_b, grads_b) = reference, ours
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], **TOL, msg=name)


@pytest.mark.parametrize("kind", ["llama", "gemma", "bloom", "mamba"])
def test_lean_matches_standard_padded(kind):
    tok = tiny_tokenizer()
    model = model_of(kind, tok)
    batch = PaddingCollator(tok.pad_token_id)(examples(len(tok)))
    assert_same(standard(model, batch), lean_loss(model, batch))


def test_lean_matches_standard_padding_free_with_num_items():
    tok = tiny_tokenizer()
    model = model_of("llama", tok)
    batch = PaddingFreeCollator()(examples(len(tok)))
    # Under gradient accumulation the Trainer divides by the whole accumulated batch's label count.
    num_items = torch.tensor(97)
    assert_same(standard(model, batch, num_items), lean_loss(model, batch, num_items))


@pytest.mark.parametrize("min_chunk_rows", [1, lean.MIN_CHUNK_ROWS])  # row chunks; vocabulary blocks
def test_chunks_and_tied_head(monkeypatch, min_chunk_rows):
    monkeypatch.setattr(lean, "LOGITS_CHUNK_ELEMENTS", 3 * 512)  # a few rows per chunk
    monkeypatch.setattr(lean, "MIN_CHUNK_ROWS", min_chunk_rows)
    monkeypatch.setattr(lean, "CPU_BLOCK_ELEMENTS", 1)  # blocks of MIN_BLOCK_COLUMNS: several over the vocabulary
    tok = tiny_tokenizer()
    model = model_of("gemma", tok)  # Gemma ties the head to the embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    batch = PaddingCollator(tok.pad_token_id)(examples(len(tok)))
    assert_same(standard(model, batch), lean_loss(model, batch))


def test_final_logit_softcapping_is_applied():
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        final_logit_softcapping=2.0,
        pad_token_id=tok.pad_token_id,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model.config.use_cache = False
    batch = PaddingCollator(tok.pad_token_id)(examples(len(tok)))
    assert find_head_parts(model).softcap == 2.0
    assert_same(standard(model, batch), lean_loss(model, batch))


def lora(model, targets):
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))


def test_lora_with_gradient_checkpointing():
    tok = tiny_tokenizer()
    model = model_of("llama", tok)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = lora(model, ["q_proj", "v_proj", "down_proj"])
    model.train()
    batch = PaddingFreeCollator()(examples(len(tok)))
    reference = standard(model, batch)
    assert all("lora_" in name for name in reference[1])
    assert_same(reference, lean_loss(model, batch))


def test_adapted_head_goes_through_the_checkpointed_path():
    tok = tiny_tokenizer()
    model = lora(model_of("llama", tok), ["q_proj", "lm_head"])
    assert not lean._plain_linear(find_head_parts(model).head)
    batch = PaddingCollator(tok.pad_token_id)(examples(len(tok)))
    reference = standard(model, batch)
    assert any("lm_head" in name for name in reference[1])
    assert_same(reference, lean_loss(model, batch))


def test_unverified_model_types_and_logit_scaling_fall_back():
    tok = tiny_tokenizer()
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2))
    assert find_head_parts(gpt2) is None  # not a verified model type
    model = model_of("llama", tok)
    model.config.logits_scaling = 4.0
    assert find_head_parts(model) is None


def trained_weights(tmp_path, batch_size, accumulation, lean_on, kind="llama"):
    tok = tiny_tokenizer()
    model = model_of(kind, tok)
    args = TrainingArguments(
        output_dir=str(tmp_path / f"o{kind}{batch_size}{accumulation}{lean_on}"),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        remove_unused_columns=False,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        seed=1,
        optim="sgd",
    )  # Adam would amplify float noise
    trainer = FinetuneTrainer(
        model=model, args=args, train_dataset=examples(len(tok)), data_collator=PaddingFreeCollator(), lean_loss=lean_on
    )
    trainer.get_train_dataloader = _in_order(trainer)
    assert (trainer.lean is not None) == lean_on
    # Gemma ties its head to the embedding: one process, so the lean loss keeps one gradient buffer for both.
    assert (trainer.tied_grad is not None) == (lean_on and kind == "gemma")
    trainer.train()
    assert not model.get_input_embeddings().sparse  # given back after training
    loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    if trainer.tied_grad is not None:  # a second train() (as a resume would) pairs them again
        trainer.train()
        assert not trainer.tied_grad.pending and not model.get_input_embeddings().sparse
        assert not torch.equal(model.get_input_embeddings().weight, weights["model.embed_tokens.weight"])
    return loss, weights


def _in_order(trainer):
    from torch.utils.data import DataLoader

    return lambda: DataLoader(
        trainer.train_dataset,
        batch_size=trainer.args.per_device_train_batch_size,
        collate_fn=trainer.data_collator,
        shuffle=False,
    )


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_trainer_lean_loss_is_accumulation_invariant(tmp_path, kind):
    loss_ref, ref = trained_weights(tmp_path, 4, 1, lean_on=False, kind=kind)
    for batch_size, accumulation in ((4, 1), (1, 4)):
        loss, weights = trained_weights(tmp_path, batch_size, accumulation, lean_on=True, kind=kind)
        assert loss == pytest.approx(loss_ref, rel=1e-4)
        for name in ref:
            torch.testing.assert_close(weights[name], ref[name], **TOL, msg=name)


def test_second_backward_through_the_fused_head_is_refused():
    tok = tiny_tokenizer()
    model = model_of("llama", tok)
    batch = PaddingCollator(tok.pad_token_id)(examples(len(tok)))
    loss = lean_causal_lm_loss(model, find_head_parts(model), batch)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        loss.backward()


@pytest.mark.parametrize("deferred", [False, True])
def test_tied_head_gradient_is_one_buffer_and_equals_autograds_sum(monkeypatch, deferred):
    """The head's gradient goes to TiedHeadGrad, the embedding's comes sparse; flush gives autograd's dense sum."""
    if deferred:  # vocabulary blocks (as for a 256k vocabulary): the head's gradient is made in flush()
        monkeypatch.setattr(lean, "LOGITS_CHUNK_ELEMENTS", 3 * 512)
        monkeypatch.setattr(lean, "CPU_BLOCK_ELEMENTS", 1)
    tok = tiny_tokenizer()
    model = model_of("gemma", tok)
    batch = PaddingCollator(tok.pad_token_id)(examples(len(tok)))
    reference = standard(model, batch)
    parts = find_head_parts(model)
    embedding = lean.TiedHeadGrad.usable(parts, model, processes=1)
    assert embedding is model.get_input_embeddings()
    sink = lean.TiedHeadGrad(embedding.weight, embedding)
    assert not embedding.sparse  # untouched until opened (the trainer opens it in train())
    sink.open()
    model.zero_grad()
    count = torch.tensor(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()))
    for first, half in ((True, slice(0, 2)), (False, slice(2, 4))):  # two micro-batches, as under accumulation
        part = {k: v[half] for k, v in batch.items()}
        lean_causal_lm_loss(model, parts, part, count, sink=sink).backward()
        assert len(sink.pending) == 1 and embedding.weight.grad.is_sparse == first  # the embedding's rows only
        assert isinstance(sink.pending[0], lean.DeferredWeightGrad) == deferred
        sink.flush()
        assert not sink.pending and not embedding.weight.grad.is_sparse
    assert_same(reference, (reference[0], grads(model)))
    sink.close()
    assert not embedding.sparse


def test_tied_head_gradient_only_where_it_is_exact():
    tok = tiny_tokenizer()
    gemma = model_of("gemma", tok)
    parts = find_head_parts(gemma)
    assert lean.TiedHeadGrad.usable(parts, gemma, processes=1) is not None
    assert lean.TiedHeadGrad.usable(parts, gemma, processes=2) is None  # DDP reduces gradients during backward
    llama = model_of("llama", tok)
    assert llama.get_output_embeddings().weight is not llama.get_input_embeddings().weight
    assert lean.TiedHeadGrad.usable(find_head_parts(llama), llama, processes=1) is None  # untied
    adapted = lora(model_of("gemma", tok), ["q_proj"])
    assert lean.TiedHeadGrad.usable(find_head_parts(adapted), adapted, processes=1) is None  # frozen embedding


def _reference_head_loss(hidden, weight, bias, targets, softcap):
    """Autograd through full logits: the summed cross-entropy and its gradients (fp32 logits, as the model's loss)."""
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight)]
    b = None if bias is None else bias.detach().clone().requires_grad_()
    logits = F.linear(leaves[0], leaves[1], b).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    loss = F.cross_entropy(logits, targets, reduction="sum")
    loss.backward()
    return loss, leaves[0].grad, leaves[1].grad, None if b is None else b.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("method,size", [("rows", 1), ("rows", 5), ("rows", 37), ("vocab", 7), ("vocab", 1000)])
def test_fused_head_row_chunks_and_vocab_blocks_equal_autograd(dtype, softcap, with_bias, frozen, method, size):
    """Both ways of walking the logits give autograd's loss and gradients (a frozen head: the hidden rows' only)."""
    g = torch.Generator().manual_seed(3)
    vocab, width, rows = 1000, 24, 37  # blocks of 7 leave a ragged last one; 1000 is the whole vocabulary
    hidden = torch.randn(rows, width, generator=g).to(dtype)
    weight = (torch.randn(vocab, width, generator=g) * 0.5).to(dtype)
    bias = torch.randn(vocab, generator=g).to(dtype) if with_bias else None
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[:3] = targets[3]  # a target repeated across rows: index_add_ must sum, not overwrite
    loss, *expected = _reference_head_loss(hidden, weight, bias, targets, softcap)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_(not frozen)
    b = None if bias is None else bias.clone().requires_grad_(not frozen)
    plan = (lean._row_chunks if method == "rows" else lean._vocab_blocks, size)
    ours = lean._FusedHeadCrossEntropy.apply(h, w, b, targets, softcap, plan, True)
    ours.backward()
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ours, loss.detach(), rtol=1e-5 if dtype == torch.float32 else 1e-3, atol=0)
    torch.testing.assert_close(h.grad, expected[0], **tol)
    if frozen:
        assert w.grad is None and (b is None or b.grad is None)
        return
    torch.testing.assert_close(w.grad, expected[1], **tol)
    if with_bias:
        torch.testing.assert_close(b.grad, expected[2], **tol)


def test_fused_plan_picks_vocab_blocks_for_a_large_vocabulary_or_a_frozen_head():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    rows_per_chunk = lean.LOGITS_CHUNK_ELEMENTS // 49152
    assert lean.fused_plan(4000, 49152, cpu, weight_grad=True) == (lean._row_chunks, rows_per_chunk)
    # 256k: a row chunk holds 65 rows, so the weight gradient would be re-written for every 65 rows.
    method, columns = lean.fused_plan(600, 256000, cpu, weight_grad=True)
    assert method is lean._vocab_blocks and columns * 600 <= lean.CPU_BLOCK_ELEMENTS
    assert lean.fused_plan(40, 256000, cpu, weight_grad=True)[0] is lean._row_chunks  # one chunk: one pass
    assert lean.fused_plan(4000, 49152, cpu, weight_grad=False)[0] is lean._vocab_blocks  # one pass either way
    assert lean.fused_plan(600, 256000, gpu, weight_grad=True)[1] == lean.LOGITS_CHUNK_ELEMENTS // 600
    assert lean.fused_plan(10**6, 49152, cpu, weight_grad=False)[1] == lean.MIN_BLOCK_COLUMNS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("plan", ["rows", "vocab"])
def test_sink_weight_gradient_equals_autograd_after_flush(dtype, softcap, with_bias, plan):
    """With a sink, the weight's gradient waits for flush() (under vocabulary blocks, not even made till then)."""
    g = torch.Generator().manual_seed(4)
    vocab, width, rows = 1000, 24, 37
    hidden = torch.randn(rows, width, generator=g).to(dtype)
    weight = (torch.randn(vocab, width, generator=g) * 0.5).to(dtype)
    bias = torch.randn(vocab, generator=g).to(dtype) if with_bias else None
    targets = torch.randint(0, vocab, (rows,), generator=g)
    loss, *expected = _reference_head_loss(hidden, weight, bias, targets, softcap)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b = None if bias is None else bias.clone().requires_grad_()
    already = torch.randn(vocab, width, generator=g).to(dtype)  # e.g. an earlier micro-batch's
    w.grad = already.clone()
    sink = lean.TiedHeadGrad(w, embedding=None)
    method = lean._row_chunks if plan == "rows" else lean._vocab_blocks
    ours = lean._FusedHeadCrossEntropy.apply(h, w, b, targets, softcap, (method, 7), True, sink)
    (ours * 0.25).backward()
    assert len(sink.pending) == 1 and torch.equal(w.grad, already)  # nothing added yet
    assert isinstance(sink.pending[0], lean.DeferredWeightGrad) == (plan == "vocab")
    sink.flush()
    assert w.grad.grad_fn is None and not w.grad.requires_grad  # no graph kept alive (its blocks' memory with it)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(h.grad, expected[0] * 0.25, **tol)
    torch.testing.assert_close(w.grad, already + expected[1] * 0.25, **tol)
    if with_bias:  # the bias has its own gradient, through autograd
        torch.testing.assert_close(b.grad, expected[2] * 0.25, **tol)


def test_a_deferred_gradient_buffer_is_made_after_handing_free_heap_back(monkeypatch):
    """Only where flush() makes the vocabulary-sized buffer itself (deferred, on the CPU) is the heap trimmed first."""
    calls = []
    monkeypatch.setattr(lean, "release_free_heap", lambda: calls.append(1) or True)
    g = torch.Generator().manual_seed(5)
    hidden, targets = torch.randn(6, 8, generator=g), torch.randint(0, 50, (6,), generator=g)
    for method, trimmed in ((lean._row_chunks, 0), (lean._vocab_blocks, 1)):
        w = torch.randn(50, 8, generator=g).requires_grad_()
        sink = lean.TiedHeadGrad(w, embedding=None)
        lean._FusedHeadCrossEntropy.apply(hidden, w, None, targets, None, (method, 7), True, sink).backward()
        sink.flush()
        assert len(calls) == trimmed and w.grad is not None


def test_release_free_heap_trims_where_glibc_is():
    import platform

    assert lean.release_free_heap() is (platform.libc_ver()[0] == "glibc")
