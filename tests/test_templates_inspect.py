"""script/inspect_data.py (component/data/inspection.py) on a tiny config: marked examples, the report, the dump."""

from __future__ import annotations

import io
import json

import pytest

from component.data.sft import read_conversations
from component.data.template import IGNORE_INDEX
from script import inspect_data
from tests.conftest import TINY_SFT, base_config, write_config


class Tty(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture()
def config_file(tmp_path, tiny_llama_dir):
    return write_config(tmp_path / "c.json", **base_config(tiny_llama_dir, tmp_path / "out"))


def test_marks_supervised_text_and_reports(config_file, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    def no_model(*args, **kwargs):
        raise AssertionError("inspect_data loaded a model")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_model)
    out = io.StringIO()
    dump = tmp_path / "d.jsonl"
    argv = ["--train_args_file", str(config_file), "--index", "1", "--num", "2", "--dump", str(dump)]
    assert inspect_data.main(argv, out) == 0
    text = out.getvalue()
    first = read_conversations(str(TINY_SFT)).records[1]["messages"][1]["content"]
    assert f"[[{first}<|im_end|>]]" in text
    assert "── example 1:" in text and "── example 2:" in text and "── example 3:" not in text
    assert "examples:" in text and "supervised tokens:" in text and "length histogram" in text
    assert "\033[" not in text and not (tmp_path / "out").exists()
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(rows) == len(read_conversations(str(TINY_SFT)).records)
    assert all(len(r["input_ids"]) == len(r["labels"]) for r in rows)
    assert all(any(x != IGNORE_INDEX for x in r["labels"]) for r in rows)


def test_colour_on_a_terminal_and_the_truncation_cut(config_file):
    out = Tty()
    assert inspect_data.main(["--train_args_file", str(config_file), "--num", "8", "--max_seq_length", "20"], out) == 0
    text = out.getvalue()
    assert "\033[32m" in text and "[[" not in text
    assert "✂ cut here" in text and "DROPPED: no supervised token left" in text and "truncated:" in text


def test_user_errors_exit_2_without_traceback(tmp_path, tiny_llama_dir, capsys):
    bad = write_config(tmp_path / "b.json", **base_config(tiny_llama_dir, tmp_path / "out", template_name="phi3"))
    assert inspect_data.main(["--train_args_file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "template 'phi3' does not fit" in err and "Traceback" not in err


def test_a_datasets_list_is_inspected_as_a_mixture(tmp_path, tiny_llama_dir):
    # Two copies of the tiny set, concatenated: every example of both is shown and counted.
    values = base_config(tiny_llama_dir, tmp_path / "out")
    del values["train_file"]
    values["datasets"] = [{"path": str(TINY_SFT)}, {"path": str(TINY_SFT)}]
    out = io.StringIO()
    dump = tmp_path / "d.jsonl"
    argv = ["--train_args_file", str(write_config(tmp_path / "m.json", **values)), "--dump", str(dump)]
    assert inspect_data.main(argv, out) == 0
    assert "examples:" in out.getvalue()
    assert len(dump.read_text().splitlines()) == 2 * len(read_conversations(str(TINY_SFT)).records)


def test_inspect_data_shows_dpo_pairs_with_what_is_learned(tmp_path, tiny_llama_dir):
    from tests.conftest import dpo_config

    pairs = tmp_path / "p.jsonl"
    pairs.write_text(json.dumps({"prompt": "Two plus two?", "chosen": "Four.", "rejected": "Five."}) + "\n")
    config = write_config(tmp_path / "c.json", **dpo_config(tiny_llama_dir, tmp_path / "out", pairs))
    out = io.StringIO()
    assert inspect_data.main(["--train_args_file", str(config), "--color", "never"], out) == 0
    text = out.getvalue()
    assert "── pair 0: prompt" in text and "(not learned)" in text and "Two plus two?" in text
    assert "── chosen:" in text and "[[Four.<|im_end|>]]" in text and "[[Five.<|im_end|>]]" in text
    assert "1 pairs; tokens:" in text
    assert not (tmp_path / "out").exists()


def test_inspect_data_shows_pretrain_blocks_with_document_boundaries(tmp_path, tiny_llama_dir):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["alpha beta", "gamma delta", "epsilon"]))
    values = base_config(
        tiny_llama_dir, tmp_path / "out", task_type="pretrain", train_file=str(docs), max_seq_length=256
    )
    values.pop("template_name")
    out = io.StringIO()
    assert inspect_data.main(["--train_args_file", str(write_config(tmp_path / "c.json", **values))], out) == 0
    text = out.getvalue()
    assert "── block 0:" in text and "3 document piece(s)" in text
    assert text.count("¶") == 2 and "alpha beta" in text and "epsilon" in text
