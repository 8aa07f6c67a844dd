"""The loss mask: exactly the assistant replies and their end-of-turn tokens."""

from __future__ import annotations

import json

import pytest

from component.data.formats import FORMATS, convert
from component.data.sft import as_record, build_sft_dataset, read_conversations, tokenize_record
from component.data.template import IGNORE_INDEX
from component.data.template_registry import get_template
from component.errors import DataError
from tests.tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def tokenize_conversation(record: dict, template, tok, max_len: int) -> dict:
    """A record of the conversation format as its one training example."""
    (example,) = tokenize_record(as_record(convert(record, FORMATS["conversation"])), template, tok, max_len)
    return example


def supervised_text(tok, ids, labels):
    """The supervised tokens, decoded run by run."""
    runs, current = [], []
    for i, lab in zip(ids, labels, strict=True):
        if lab != IGNORE_INDEX:
            assert lab == i
            current.append(i)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


def test_single_turn_chatml_exact(tok):
    record = {"conversation": [{"human": "hello there", "assistant": "hi, how can I help you today?"}], "system": None}
    out = tokenize_conversation(record, get_template("chatml"), tok, max_len=512)
    text = tok.decode(out["input_ids"])
    assert text == (
        "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\nhi, how can I help you today?<|im_end|>\n"
    )
    assert supervised_text(tok, out["input_ids"], out["labels"]) == ["hi, how can I help you today?<|im_end|>"]
    # The label of the end-of-turn token is the end-of-turn id itself.
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    last_supervised = [lab for lab in out["labels"] if lab != IGNORE_INDEX][-1]
    assert last_supervised == im_end
    # The trailing newline after the final <|im_end|> is not supervised.
    assert out["labels"][-1] == IGNORE_INDEX


def test_multi_turn_with_system_every_reply_supervised(tok):
    record = {
        "system": "You are terse.",
        "conversation": [
            {"human": "Is the sea deep?", "assistant": "Yes, the sea is deep."},
            {"human": "And blue?", "assistant": "Blue and wide."},
            {"human": "Thanks.", "assistant": "You are welcome."},
        ],
    }
    out = tokenize_conversation(record, get_template("chatml"), tok, max_len=512)
    assert supervised_text(tok, out["input_ids"], out["labels"]) == [
        "Yes, the sea is deep.<|im_end|>",
        "Blue and wide.<|im_end|>",
        "You are welcome.<|im_end|>",
    ]
    text = tok.decode(out["input_ids"])
    assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nIs the sea deep?")


def test_default_system_prompt_is_injected_but_not_supervised(tok):
    record = {"conversation": [{"human": "hi", "assistant": "yo"}], "system": None}
    out = tokenize_conversation(record, get_template("smollm"), tok, max_len=512)
    assert tok.decode(out["input_ids"]).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    )
    assert supervised_text(tok, out["input_ids"], out["labels"]) == ["yo<|im_end|>"]


def test_eos_templates_supervise_the_tokenizer_eos(tok):
    record = {
        "conversation": [{"human": "hi", "assistant": "yo"}, {"human": "and?", "assistant": "done"}],
        "system": None,
    }
    out = tokenize_conversation(record, get_template("default"), tok, max_len=512)
    # "Assistant: done" tokenizes the space into the first word (" done"): that
    # token straddles the reply's start and must be supervised, since the
    # model has to produce it.
    assert [t.strip() for t in supervised_text(tok, out["input_ids"], out["labels"])] == ["yo</s>", "done</s>"]
    assert out["labels"].count(tok.eos_token_id) == 2


def test_truncation_keeps_prefix_and_counts(tok):
    record = {
        "conversation": [{"human": "hi", "assistant": "The quick brown fox jumps over the lazy dog."}],
        "system": None,
    }
    full = tokenize_conversation(record, get_template("chatml"), tok, max_len=512)
    cut = tokenize_conversation(record, get_template("chatml"), tok, max_len=len(full["input_ids"]) - 3)
    assert cut["truncated"] and not full["truncated"]
    assert cut["input_ids"] == full["input_ids"][: len(cut["input_ids"])]
    assert cut["labels"] == full["labels"][: len(cut["labels"])]


def test_examples_without_supervised_tokens_are_dropped_and_counted(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    rows = [
        {"conversation": [{"human": "word " * 60, "assistant": "short"}]},
        {"conversation": [{"human": "hi", "assistant": "yo"}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = build_sft_dataset(str(path), get_template("chatml"), tok, max_len=40)
    assert data.summary.examples == 1
    assert data.summary.dropped_no_supervised == 1
    assert data.summary.truncated == 1
    assert data.summary.supervised_tokens == sum(1 for lab in data.dataset[0]["labels"] if lab != IGNORE_INDEX)


def test_malformed_line_reported_as_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"conversation": [{"human": "a", "assistant": "b"}]})
        + "\n"
        + "{not json\n"
        + json.dumps({"conversation": [{"human": "a"}]})
        + "\n"
        + json.dumps({"conversations": []})
        + "\n"
    )
    with pytest.raises(DataError) as err:
        read_conversations(str(path))
    msg = str(err.value)
    assert f"{path}:2: invalid JSON" in msg
    assert f"{path}:3: conversation[0]: missing key 'assistant'" in msg
    assert f"{path}:4: missing key 'conversation'" in msg
    assert "3 problems in total" in msg


def test_sample_data_is_valid_and_varied():
    from tests.conftest import ROOT

    result = read_conversations(str(ROOT / "data" / "sft_sample.jsonl"))
    assert len(result.records) >= 50
    assert sum(len(r["messages"]) > 2 for r in result.records) >= 3
    assert sum(1 for r in result.records if r["system"]) >= 2
