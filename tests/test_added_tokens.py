"""add_special_tokens: the tokenizer grows, the embedding follows (multiple of 64, new rows at the
mean), under LoRA only the new rows train, and chat, merge and inspect_data use the run's tokenizer."""

from __future__ import annotations

import io
import json

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from component.inference.generation import load_for_inference
from component.model.loading import EMBEDDING_MULTIPLE
from script import inspect_data, merge_lora
from tests.conftest import base_config, write_config
from tests.runs import train as train_values

TOKENS = ["<calc>", "</calc>"]


def data_with_tokens(path):
    rows = [
        {"conversation": [{"human": f"What is {a} plus {b}?", "assistant": f"<calc>{a}+{b}</calc> {a + b}."}]}
        for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 2), (9, 1)]
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_added_tokens_train_only_their_rows_and_every_tool_uses_the_run_tokenizer(tmp_path, tiny_llama_dir):
    data = data_with_tokens(tmp_path / "d.jsonl")
    out = tmp_path / "out"
    values = base_config(tiny_llama_dir, out, train_file=str(data), add_special_tokens=TOKENS, max_steps=6)
    trainer = train_values(values)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert any("trainable_tokens_delta" in n for n in trainable)

    tok = AutoTokenizer.from_pretrained(out)  # saved with the run
    base_tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = tok.convert_tokens_to_ids(TOKENS)
    assert len(tok) == len(base_tok) + 2 and ids == [len(base_tok), len(base_tok) + 1]
    assert tok("<calc>1+2</calc>", add_special_tokens=False)["input_ids"][0] == ids[0]  # one id each

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    old_rows = base.get_input_embeddings().weight.shape[0]
    old_embed = base.get_input_embeddings().weight.detach().clone()
    old_head = base.get_output_embeddings().weight.detach().clone()
    loaded = load_for_inference(str(out))  # chat/serve's loader: base grown to the run's tokenizer + adapter
    assert loaded.tokenizer.convert_tokens_to_ids(TOKENS) == ids
    embed = loaded.model.get_input_embeddings()
    rows = (embed.weight if hasattr(embed, "weight") else embed.base_layer.weight).shape[0]
    assert rows % EMBEDDING_MULTIPLE == 0 and rows >= len(tok)

    merged = PeftModel.from_pretrained(_grown(tiny_llama_dir, tok), out).merge_and_unload()
    new_embed = merged.get_input_embeddings().weight.detach()
    new_head = merged.get_output_embeddings().weight.detach()
    torch.testing.assert_close(new_embed[:old_rows], old_embed, rtol=0, atol=0)  # old rows: untouched
    torch.testing.assert_close(new_head[:old_rows], old_head, rtol=0, atol=0)  # the untied head too
    mean = old_embed.mean(0)
    assert all((new_embed[i] - mean).abs().max() > 1e-3 for i in ids)  # new rows: trained away from the mean

    merged_dir = tmp_path / "merged"
    assert merge_lora.main(["--adapter_dir", str(out), "--output_dir", str(merged_dir), "--dtype", "fp32"]) == 0
    assert AutoTokenizer.from_pretrained(merged_dir).convert_tokens_to_ids(TOKENS) == ids
    assert AutoModelForCausalLM.from_pretrained(merged_dir).get_input_embeddings().weight.shape[0] == rows

    config = write_config(tmp_path / "c.json", **values)
    text = io.StringIO()
    dump = tmp_path / "dump.jsonl"
    assert inspect_data.main(["--train_args_file", str(config), "--color", "never", "--dump", str(dump)], text) == 0
    assert "[[<calc>1+2</calc> 3.<|im_end|>]]" in text.getvalue()
    first = json.loads(dump.read_text().splitlines()[0])
    assert ids[0] in first["input_ids"] and ids[0] in first["labels"]  # learned as one token


def _grown(model_dir, tok):
    from component.model.loading import fit_embeddings

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    fit_embeddings(model, tok)
    return model


def test_new_rows_start_at_the_mean_of_the_old_ones(tiny_llama_dir):
    from component.model.loading import fit_embeddings

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.add_tokens(TOKENS, special_tokens=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    old = model.get_input_embeddings().weight.detach().clone()
    fit_embeddings(model, tok)
    grown = model.get_input_embeddings().weight.detach()
    assert grown.shape[0] % EMBEDDING_MULTIPLE == 0
    torch.testing.assert_close(grown[len(tok) - 1], old.mean(0), rtol=0, atol=1e-3)
