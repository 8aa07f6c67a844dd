"""The tokenized SFT and DPO data cache: keyed by contents, tokenizer, template and options."""

from __future__ import annotations

import json

from component.data.cache import cache_key, cached
from component.data.preference import DPOSummary, PreferenceData, build_preference_dataset
from component.data.sft import DataSummary, SFTData, build_sft_mixture
from component.data.sources import DatasetSpec
from component.data.template_registry import get_template
from tests.conftest import TINY_SFT
from tests.tiny import tiny_tokenizer


def sft_build(tmp_path, calls: list):
    def counted(*args, **kwargs):
        calls.append(1)
        return build_sft_mixture(*args, **kwargs)

    return cached(counted, tmp_path / "cache", "sft", SFTData, DataSummary.from_dict)


def test_a_rerun_loads_the_same_sft_data_from_the_cache(tmp_path):
    calls = []
    tok, build = tiny_tokenizer(), sft_build(tmp_path, calls)
    args = dict(template=get_template("chatml"), tokenizer=tok, max_len=64, num_workers=1)
    first = build([DatasetSpec(str(TINY_SFT))], **args)
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
    second = build([DatasetSpec(str(TINY_SFT))], **{**args, "num_workers": 2})  # workers are not in the key
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == entries and len(entries) == 1
    assert len(calls) == 1  # the second call built nothing
    assert second.dataset["input_ids"] == first.dataset["input_ids"]
    assert second.dataset["labels"] == first.dataset["labels"]
    assert second.summary == first.summary and isinstance(second.summary.datasets[0].share, float)


def test_the_key_changes_with_contents_template_options_and_tokenizer(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(TINY_SFT.read_text())
    tok = tiny_tokenizer()
    base = cache_key([DatasetSpec(str(data))], tok, get_template("chatml"), {"max_len": 64})
    assert base == cache_key([DatasetSpec(str(data))], tok, get_template("chatml"), {"max_len": 64})
    changed = {
        "template": cache_key([DatasetSpec(str(data))], tok, get_template("qwen"), {"max_len": 64}),
        "options": cache_key([DatasetSpec(str(data))], tok, get_template("chatml"), {"max_len": 65}),
        "train_on": cache_key(
            [DatasetSpec(str(data), train_on="last_turn")], tok, get_template("chatml"), {"max_len": 64}
        ),
        "tokenizer": cache_key(
            [DatasetSpec(str(data))], tiny_tokenizer(eos="<|endoftext|>"), get_template("chatml"), {"max_len": 64}
        ),
    }
    data.write_text(TINY_SFT.read_text().replace("four", "five", 1))
    changed["contents"] = cache_key([DatasetSpec(str(data))], tok, get_template("chatml"), {"max_len": 64})
    assert all(key != base for key in changed.values()), changed
    assert len(set(changed.values())) == len(changed)


def test_a_hub_dataset_without_a_revision_is_not_cached():
    tok = tiny_tokenizer()
    assert cache_key([DatasetSpec("someone/data")], tok, get_template("chatml"), {}) is None
    assert cache_key([DatasetSpec("someone/data", revision="abc123")], tok, get_template("chatml"), {}) is not None


def test_dpo_pairs_are_cached_too(tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go."}) + "\n")
    build = cached(build_preference_dataset, tmp_path / "cache", "dpo", PreferenceData, lambda d: DPOSummary(**d))
    args = dict(template=get_template("chatml"), tokenizer=tiny_tokenizer(), max_len=64, max_prompt_len=16)
    first, second = build(str(data), **args), build(str(data), **args)
    assert [p.name.startswith("dpo-") for p in (tmp_path / "cache").iterdir()] == [True]
    assert second.dataset.to_dict() == first.dataset.to_dict() and second.summary == first.summary


def test_the_tokenizer_key_ignores_call_state_but_not_special_tokens():
    from component.data.cache import tokenizer_digest

    tok = tiny_tokenizer()
    before = tokenizer_digest(tok)
    tok(["a b", "a"], padding=True, truncation=True, max_length=4)  # leaves padding/truncation state behind
    assert tokenizer_digest(tok) == before
    tok.bos_token = "<|im_start|>"
    assert tokenizer_digest(tok) != before
