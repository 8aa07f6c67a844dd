"""script/evaluate.py (component/inference/evaluation.py): loss as training computes it, lower after training,
one reply per prompt."""

from __future__ import annotations

import json

import pytest

from component.cli import main_train
from script import evaluate
from tests.conftest import TINY_SFT, base_config, write_config

MAX_LEN = 128


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, tiny_llama_dir):
    """A LoRA run of a few steps on the tiny file, with the Trainer's eval loss on that same file."""
    tmp = tmp_path_factory.mktemp("eval-run")
    values = base_config(
        tiny_llama_dir,
        tmp / "out",
        max_steps=6,
        max_prompt_length=64,
        max_seq_length=MAX_LEN,
        eval_file=str(TINY_SFT),
        eval_strategy="steps",
        eval_steps=6,
        per_device_eval_batch_size=8,
    )
    assert main_train(["--train_args_file", str(write_config(tmp / "config.json", **values))]) == 0
    return tmp / "out"


def run_evaluate(tmp_path, *argv) -> dict:
    out = tmp_path / "metrics.json"
    assert evaluate.main([*argv, "--output_json", str(out)]) == 0
    return json.loads(out.read_text())


def test_trained_model_has_lower_loss_than_base(tmp_path, tiny_llama_dir, trained_dir):
    base = run_evaluate(
        tmp_path,
        "--model",
        str(tiny_llama_dir),
        "--template",
        "chatml",
        "--max_seq_length",
        str(MAX_LEN),
        "--eval_file",
        str(TINY_SFT),
    )
    tuned = run_evaluate(
        tmp_path,
        "--model",
        str(tiny_llama_dir),
        "--adapter",
        str(trained_dir),
        "--eval_file",
        str(TINY_SFT),
        "--batch_size",
        "3",
    )
    assert tuned["loss"] < base["loss"]
    assert tuned["perplexity"] == pytest.approx(2.718281828 ** tuned["loss"])
    # Same tokens, masks and loss as training: the Trainer's eval loss on this file (one batch of 8).
    data = json.loads((trained_dir / "data_summary.json").read_text())
    report = json.loads((trained_dir / "report.json").read_text())
    assert tuned["examples"] == base["examples"] == data["examples"]
    assert tuned["supervised_tokens"] == data["supervised_tokens"]
    assert tuned["loss"] == pytest.approx(report["final_eval_loss"], abs=1e-4)


def test_generate_to_writes_one_line_per_prompt(tmp_path, trained_dir):
    lines = TINY_SFT.read_text().splitlines()[:3]
    lines.append(json.dumps({"system": "Be brief.", "conversation": [{"human": "Only a prompt here."}]}))
    lines.append(json.dumps({"conversations": ["A LIMA test prompt, GAIR's format."], "source": "lima"}))
    eval_file = tmp_path / "mixed.jsonl"
    eval_file.write_text("\n".join(lines) + "\n")
    gen = tmp_path / "gen" / "replies.jsonl"
    metrics = run_evaluate(
        tmp_path,
        "--model",
        str(trained_dir),
        "--eval_file",
        str(eval_file),
        "--generate_to",
        str(gen),
        "--max_new_tokens",
        "5",
        "--batch_size",
        "2",
    )
    rows = [json.loads(x) for x in gen.read_text().splitlines()]
    assert metrics["generated"] == len(rows) == 5 and metrics["examples"] == 3
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[4]["messages"] == [{"role": "user", "content": "A LIMA test prompt, GAIR's format."}]
    assert rows[0]["prompt"] == "What is two plus two?" and rows[0]["reference"] == "Two plus two is four."
    assert [m["role"] for m in rows[2]["messages"]] == ["user", "assistant", "user"]
    assert rows[3]["reference"] is None and rows[3]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert all(isinstance(r["reply"], str) for r in rows)


def test_bad_line_is_reported_with_its_line(tmp_path, trained_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(TINY_SFT.read_text().splitlines()[0] + '\n{"conversation": [{"assistant": "x"}]}\n')
    assert evaluate.main(["--model", str(trained_dir), "--eval_file", str(bad)]) == 2
    assert f"{bad}:2:" in capsys.readouterr().err


def test_eval_lines_in_every_format_and_prompts_without_replies():
    from component.data.template import Message
    from component.inference.evaluation import eval_line_checker

    reply = {"role": "assistant", "content": "Hi!"}
    cases = {
        "messages": ({"messages": [{"role": "user", "content": "Hello"}, reply]}, True),
        "messages_prompt": ({"messages": [{"role": "user", "content": "Hello"}]}, False),
        "sharegpt_prompt": ({"conversations": [{"from": "human", "value": "Hello"}]}, False),
        "alpaca_prompt": ({"instruction": "Hello"}, False),
        "completion_prompt": ({"prompt": "Hello"}, False),
        "alpaca": ({"instruction": "Hello", "output": "Hi!"}, True),
    }
    for name, (obj, has_reply) in cases.items():
        record = eval_line_checker()(obj)
        assert not isinstance(record, str), (name, record)
        expected = [Message("user", "Hello")] + ([Message("assistant", "Hi!")] if has_reply else [])
        assert (record.messages, record.has_reply) == (expected, has_reply), name
    tool = {
        "messages": [
            {"role": "user", "content": "2+2?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"function": {"name": "add", "arguments": {"a": 2}}}],
            },
            {"role": "tool", "content": "4"},
        ],
        "tools": [{"type": "function", "function": {"name": "add"}}],
    }
    record = eval_line_checker()(tool)
    assert record.has_reply is False and record.messages[-1] == Message("tool", "4") and record.tools


def test_an_eval_line_a_template_cannot_render_names_its_line(tmp_path):
    from component.data.template_registry import get_template
    from component.errors import DataError
    from component.inference.evaluation import read_eval_file
    from tests.tiny import tiny_tokenizer

    path = tmp_path / "e.jsonl"
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    bad = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "reasoning_content": "r"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    assert len(read_eval_file(str(path))) == 2  # before the model loads: the format only
    with pytest.raises(DataError, match=f"{path}:2: template 'chatml' renders plain user/assistant text only"):
        read_eval_file(str(path), get_template("chatml"), tiny_tokenizer())
