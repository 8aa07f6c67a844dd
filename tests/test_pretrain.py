"""The pretrain task: packing, document isolation, cache, bad lines, training on a tiny Llama."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from component.data.packing import PackedCollator, PackingMode, load_packed, pack
from component.data.template import IGNORE_INDEX
from component.errors import DataError
from component.runner import run
from component.tasks.pretrain import choose_collator, documents_isolated
from tests.conftest import ROOT, base_config, write_config
from tests.runs import load_config, trainer_losses
from tests.tiny import tiny_model, tiny_tokenizer

SAMPLE = ROOT / "data" / "pretrain_sample.jsonl"
DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is two plus two? Two plus two is four.",
    "Write a short poem about the sea.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
]


def write_docs(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def pretrain_config(model_dir: Path, out: Path, **overrides) -> dict:
    values = base_config(
        model_dir,
        out,
        task_type="pretrain",
        train_file=str(SAMPLE),
        max_seq_length=64,
        data_cache_dir=str(out.parent / "cache"),
    )
    values.pop("template_name")
    values.update(overrides)
    return values


# ---------------------------------------------------------------- packing


def test_pack_restarts_positions_and_keeps_the_remainder():
    flat = np.arange(100, 123)  # 23 tokens: documents of 4, 11 and 8 tokens
    blocks = pack(flat, np.array([0, 4, 15]), max_len=8)
    assert [b.tolist() for b in blocks["input_ids"]] == [
        list(range(100, 108)),
        list(range(108, 116)),
        list(range(116, 123)),
    ]
    assert [p.tolist() for p in blocks["position_ids"]] == [
        [0, 1, 2, 3, 0, 1, 2, 3],  # doc 2 starts at 4
        [0, 1, 2, 3, 4, 5, 6, 0],  # doc 2 continues (positions restart at the block), doc 3 starts at 7
        [0, 1, 2, 3, 4, 5, 6],  # the remainder is kept
    ]


def test_collator_pads_the_last_block_and_masks_boundary_labels():
    batch = PackedCollator(pad_token_id=0)(
        [
            {"input_ids": [5, 6, 7, 8], "position_ids": [0, 1, 0, 1]},
            {"input_ids": [9, 10], "position_ids": [0, 1]},
        ]
    )
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # attention_mask stays None
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 1]]
    no = IGNORE_INDEX
    assert batch["labels"].tolist() == [[no, 6, no, 8], [no, 10, no, no]]


def test_block_mask_joins_only_tokens_of_one_document():
    mask = PackedCollator(0, PackingMode.BLOCK_MASK).block_mask(torch.tensor([[0, 1, 2, 0, 1]]))
    assert mask.shape == (1, 1, 5, 5)
    assert mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]


def _packed_vs_alone(model, tokenizer, collator, positions="restart") -> float:
    docs = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in DOCS[:3]]
    ids = [t for d in docs for t in d]
    pos = [p for d in docs for p in range(len(d))] if positions == "restart" else list(range(len(ids)))
    batch = collator([{"input_ids": ids, "position_ids": pos}])
    batch.pop("labels")
    with torch.no_grad():
        packed = model(**batch, use_cache=False).logits[0]
        start = len(docs[0])
        alone = model(input_ids=torch.tensor([docs[1]]), use_cache=False).logits[0]
    return (packed[start : start + len(docs[1])] - alone).abs().max().item()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", [PackingMode.POSITION_IDS, PackingMode.BLOCK_MASK])
def test_logits_of_a_packed_document_equal_the_document_alone(attn, mode):
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", tokenizer=tokenizer).eval()
    model.config._attn_implementation = attn
    mask_dtype = torch.float32 if (mode == PackingMode.BLOCK_MASK and attn == "eager") else None
    diff = _packed_vs_alone(model, tokenizer, PackedCollator(tokenizer.pad_token_id, mode, mask_dtype))
    assert diff < 1e-5
    # The same comparison sees a leak when the positions do not restart: the check can fail.
    leaky = _packed_vs_alone(model, tokenizer, PackedCollator(tokenizer.pad_token_id), positions="running")
    assert leaky > 1e-3


def test_isolation_check_picks_a_working_mode_per_model():
    tokenizer = tiny_tokenizer()
    llama = tiny_model("llama", tokenizer=tokenizer)
    assert choose_collator(llama, 0).mode == PackingMode.POSITION_IDS
    # Bloom's ALiBi ignores position_ids and rejects a 4D mask: its documents get their own rows.
    bloom = tiny_model("bloom", tokenizer=tokenizer)
    assert not documents_isolated(bloom, PackedCollator(0, PackingMode.POSITION_IDS))
    collator = choose_collator(bloom, 0)
    assert collator.mode == PackingMode.UNPACKED
    assert documents_isolated(bloom, collator)


def test_unpacked_rows_one_document_each():
    batch = PackedCollator(0, PackingMode.UNPACKED)([{"input_ids": [5, 6, 7, 8, 9], "position_ids": [0, 1, 0, 1, 2]}])
    assert batch["input_ids"].tolist() == [[5, 6, 0], [7, 8, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, IGNORE_INDEX], [IGNORE_INDEX, 8, 9]]


# ---------------------------------------------------------------- reading and cache


def test_folder_is_read_recursively_and_bad_lines_name_file_and_line(tmp_path):
    data = tmp_path / "corpus"
    write_docs(data / "a.jsonl", DOCS[:2])
    bad = data / "sub" / "b.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"text": "fine"}\n{"txt": "typo"}\nnot json\n{"text": ""}\n')
    tok = tiny_tokenizer()
    with pytest.raises(DataError) as err:
        load_packed(str(data), tok, 32, tmp_path / "cache")
    message = str(err.value)
    for line, what in ((2, "missing key 'text'"), (3, "invalid JSON"), (4, "empty text")):
        assert f"{bad}:{line}: {what}" in message
    assert not (tmp_path / "cache").exists()  # nothing cached from invalid data
    skipped = load_packed(str(data), tok, 32, tmp_path / "cache", skip_invalid=True)
    assert skipped.summary.documents == 3 and skipped.summary.files == 2 and len(skipped.problems) == 3


def test_every_token_is_kept_with_one_eos_per_document(tmp_path):
    tok = tiny_tokenizer()
    path = write_docs(tmp_path / "d.jsonl", DOCS)
    data = load_packed(str(path), tok, 16, tmp_path / "cache")
    expected = [t for d in DOCS for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    got = [t for row in data.dataset["input_ids"] for t in row]
    assert got == expected
    assert data.summary.tokens == len(expected) and data.summary.blocks == math.ceil(len(expected) / 16)
    assert data.summary.last_block_tokens == len(expected) - 16 * (data.summary.blocks - 1)


def test_parallel_tokenization_gives_the_same_blocks(tmp_path):
    tok = tiny_tokenizer()
    one = load_packed(str(SAMPLE), tok, 64, tmp_path / "c1", num_workers=1).dataset
    two = load_packed(str(SAMPLE), tok, 64, tmp_path / "c2", num_workers=2).dataset
    assert one["input_ids"] == two["input_ids"] and one["position_ids"] == two["position_ids"]


def test_cache_is_reused_and_rebuilt_when_a_file_or_the_length_changes(tmp_path):
    tok = tiny_tokenizer()
    data = tmp_path / "corpus"
    write_docs(data / "a.jsonl", DOCS[:2])
    write_docs(data / "sub" / "b.jsonl", DOCS[2:])
    cache = tmp_path / "cache"
    first = load_packed(str(data), tok, 32, cache)
    assert not first.summary.cache_hit
    again = load_packed(str(data), tok, 32, cache)
    assert again.summary.cache_hit and again.summary.cache_path == first.summary.cache_path
    assert again.dataset["input_ids"] == first.dataset["input_ids"]

    write_docs(data / "sub" / "b.jsonl", DOCS[2:] + ["One more document."])  # edit one file
    edited = load_packed(str(data), tok, 32, cache)
    assert not edited.summary.cache_hit and edited.summary.cache_path != first.summary.cache_path
    assert edited.summary.documents == first.summary.documents + 1

    longer = load_packed(str(data), tok, 48, cache)  # another max_seq_length
    assert not longer.summary.cache_hit and longer.summary.cache_path not in (
        first.summary.cache_path,
        edited.summary.cache_path,
    )
    assert max(len(r) for r in longer.dataset["input_ids"]) == 48

    other_tok = tiny_tokenizer(eos="<|endoftext|>")  # another tokenizer (its EOS differs)
    assert not load_packed(str(data), other_tok, 48, cache).summary.cache_hit
    assert load_packed(str(data), tok, 48, cache).summary.cache_hit


# ---------------------------------------------------------------- training


def test_pretrain_full_loss_falls_and_the_run_saves(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    cfg = write_config(
        tmp_path / "c.json",
        **pretrain_config(
            tiny_llama_dir,
            out,
            train_mode="full",
            max_steps=12,
            learning_rate=3e-3,
            per_device_train_batch_size=4,
            data_cache_dir=None,
        ),
    )
    trainer = run(load_config(["--train_args_file", str(cfg)]))
    losses = trainer_losses(trainer)
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses
    assert trainer.data_collator.mode == PackingMode.POSITION_IDS
    summary = json.loads((out / "data_summary.json").read_text())
    assert summary["documents"] == 42 and summary["blocks"] >= 12
    assert Path(summary["cache_path"]).parent == tmp_path / "data_cache"  # default: next to output_dir
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / "training_meta.json").read_text())["task_type"] == "pretrain"


def test_pretrain_lora_trains_with_a_configured_cache_dir(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.json", **pretrain_config(tiny_llama_dir, out, max_steps=4))
    trainer = run(load_config(["--train_args_file", str(cfg)]))
    losses = trainer_losses(trainer)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert (out / "adapter_model.safetensors").is_file()
    summary = json.loads((out / "data_summary.json").read_text())
    assert Path(summary["cache_path"]).parent == tmp_path / "cache"


def test_pretrain_qlora_runs(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.json", **pretrain_config(tiny_llama_dir, out, train_mode="qlora", max_steps=3))
    trainer = run(load_config(["--train_args_file", str(cfg)]))
    losses = trainer_losses(trainer)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert any("Linear4bit" in type(m).__name__ for m in trainer.model.modules())
    assert (out / "adapter_model.safetensors").is_file()
