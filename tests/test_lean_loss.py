"""The lean loss equals the standard full-logits loss, in value and gradients, wherever it is used."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Gemma2Config, GPT2Config, TrainingArguments

from component import loss as lean
from component.collator import PaddingCollator
from component.loss import find_head_parts, lean_causal_lm_loss
from component.padding_free import PaddingFreeCollator
from component.template import IGNORE_INDEX
from component.trainer import FinetuneTrainer
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


def test_chunks_and_tied_head(monkeypatch):
    monkeypatch.setattr(lean, "LOGITS_CHUNK_ELEMENTS", 3 * 512)  # a few rows per chunk
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
    assert (trainer.lean_parts is not None) == lean_on
    # Gemma ties its head to the embedding: one process, so the lean loss keeps one gradient buffer for both.
    assert (trainer.tied_grad is not None) == (lean_on and kind == "gemma")
    trainer.train()
    assert not model.get_input_embeddings().sparse  # given back after training
    loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    if trainer.tied_grad is not None:  # a second train() (as a resume would) pairs them again
        trainer.train()
        assert trainer.tied_grad.pending is None and not model.get_input_embeddings().sparse
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


def test_tied_head_gradient_is_one_buffer_and_equals_autograds_sum():
    """The head's gradient goes to TiedHeadGrad, the embedding's comes sparse; flush gives autograd's dense sum."""
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
        assert sink.pending is not None and embedding.weight.grad.is_sparse == first  # the embedding's rows only
        sink.flush()
        assert sink.pending is None and not embedding.weight.grad.is_sparse
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
