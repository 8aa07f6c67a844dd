"""Bad data never costs a run: each kind of corrupted file stops before training.

The message lists the first 20 problems as `file:line: what` plus the total count,
exits with the user-error status and creates no output_dir. With
`skip_invalid_examples: true` the run goes on, logs the count and saves the list.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import train
from component.config import CONFIG_FILE_FLAG
from component.data.sft import INVALID_EXAMPLES_FILE
from component.errors import MAX_LISTED_PROBLEMS, USER_ERROR_EXIT_CODE
from tests.conftest import base_config, write_config

GOOD = json.dumps({"conversation": [{"human": "What is two plus two?", "assistant": "Four."}]})


def conv(**record) -> str:
    return json.dumps(record)


# kind -> (file lines as bytes, [(line number, words the problem must name)])
CORRUPTIONS = {
    "invalid_json": ([GOOD, '{"conversation": [', GOOD], [(2, "invalid JSON")]),
    "not_an_object": ([GOOD, "[1, 2]"], [(2, "expected a JSON object, got list")]),
    "no_format_key": ([conv(turns=[])], [(1, "no known SFT data format (keys present: turns)")]),
    "missing_key": ([GOOD, conv(messages=[])], [(2, "missing key 'conversation'")]),
    "unknown_key": (
        # Top-level keys are ignored (id, category, ...), unless they hold data another format reads.
        [conv(conversation=[{"human": "a", "assistant": "b"}], output="x")],
        [(1, "key(s) output not read by this format")],
    ),
    "unknown_turn_key": (
        [conv(conversation=[{"human": "a", "assistant": "b", "answer": "c"}])],
        [(1, "conversation[0]: unknown key(s) answer")],
    ),
    "missing_turn_key": ([conv(conversation=[{"human": "a"}])], [(1, "conversation[0]: missing key 'assistant'")]),
    "wrong_turn_key": ([conv(conversation=[{"user": "a", "assistant": "b"}])], [(1, "missing key 'human'")]),
    "conversation_not_list": ([conv(conversation="hello")], [(1, "'conversation' must be a non-empty list")]),
    "turn_not_object": ([conv(conversation=["hello"])], [(1, "conversation[0]: expected an object, got str")]),
    "text_not_string": (
        [conv(conversation=[{"human": 3, "assistant": "b"}])],
        [(1, "conversation[0].human: expected a string, got int")],
    ),
    "system_not_string": (
        [conv(system=["x"], conversation=[{"human": "a", "assistant": "b"}])],
        [(1, "'system' must be a string, got list")],
    ),
    "empty_conversation": ([conv(conversation=[])], [(1, "'conversation' must be a non-empty list")]),
    "empty_turn": (
        [GOOD, conv(conversation=[{"human": "a", "assistant": "  "}])],
        [(2, "conversation[0].assistant: empty text")],
    ),
    "lone_surrogate": (
        [r'{"conversation": [{"human": "\ud800", "assistant": "b"}]}'],
        [(1, "conversation[0].human: invalid Unicode")],
    ),
    "non_utf8": (
        [GOOD.encode(), b'{"conversation": [{"human": "caf\xe9", "assistant": "b"}]}'],
        [(2, "not UTF-8 text")],
    ),
    "empty_file": ([], [(1, "the file is empty")]),
}


@pytest.fixture
def stderr(capfd):
    """What train.main printed (it sets up its own log sinks, to stderr)."""
    return lambda: capfd.readouterr().err


def write_lines(path: Path, lines: list) -> Path:
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode("utf-8", "surrogatepass") for x in lines))
    return path


def run_train(tmp_path: Path, model_dir: Path, train_file: Path, **overrides) -> tuple[int, Path]:
    out = tmp_path / "out"
    values = base_config(model_dir, out, train_file=str(train_file), max_prompt_length=64, **overrides)
    return train.main([CONFIG_FILE_FLAG, str(write_config(tmp_path / "c.json", **values))]), out


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupted_data_stops_before_output_dir(tmp_path, tiny_llama_dir, stderr, kind):
    lines, expected = CORRUPTIONS[kind]
    data = write_lines(tmp_path / "data.jsonl", lines)
    code, out = run_train(tmp_path, tiny_llama_dir, data)
    assert code == USER_ERROR_EXIT_CODE
    assert not out.exists()
    message = stderr()
    for line, words in expected:
        assert f"{data}:{line}: " in message and words in message, message
    assert f"({len(expected)} problem" in message
    assert "Traceback" not in message


def test_missing_data_file(tmp_path, tiny_llama_dir, stderr):
    code, out = run_train(tmp_path, tiny_llama_dir, tmp_path / "nope.jsonl")
    assert code == USER_ERROR_EXIT_CODE and not out.exists()
    assert f"{tmp_path / 'nope.jsonl'}: data file not found" in stderr()


def test_many_problems_list_twenty_and_the_total(tmp_path, tiny_llama_dir, stderr):
    total = MAX_LISTED_PROBLEMS + 7
    data = write_lines(tmp_path / "data.jsonl", [GOOD] + ["{broken"] * total)
    code, out = run_train(tmp_path, tiny_llama_dir, data)
    assert code == USER_ERROR_EXIT_CODE and not out.exists()
    message = stderr()
    listed = [ln for ln in message.splitlines() if f"{data}:" in ln and "invalid JSON" in ln]
    assert len(listed) == MAX_LISTED_PROBLEMS
    assert f"{data}:2: " in listed[0] and f"{data}:{MAX_LISTED_PROBLEMS + 1}: " in listed[-1]
    assert f"and 7 more ({total} problems in total)" in message
    assert "skip_invalid_examples: true" in message


def test_skip_invalid_examples_trains_and_lists_them(tmp_path, tiny_llama_dir, stderr):
    lines = [GOOD, "{broken", GOOD, conv(conversation=[]), GOOD, b"\xff\xfe", GOOD]
    data = write_lines(tmp_path / "data.jsonl", lines)
    code, out = run_train(tmp_path, tiny_llama_dir, data, skip_invalid_examples=True, max_steps=1)
    assert code == 0
    listed = (out / INVALID_EXAMPLES_FILE).read_text().splitlines()
    assert [ln.split(": ")[0] for ln in listed] == [f"{data}:2", f"{data}:4", f"{data}:6"]
    assert "skipped 3 invalid lines" in stderr()
    assert json.loads((out / "data_summary.json").read_text())["invalid_lines"] == 3


def test_system_prompt_a_template_cannot_render_names_its_line(tmp_path, tiny_llama_dir, stderr):
    # minicpm has no system role: the line with a system prompt is named before anything loads or trains.
    data = write_lines(
        tmp_path / "d.jsonl",
        [GOOD, conv(system="Be brief.", conversation=[{"human": "a", "assistant": "b"}]), GOOD],
    )
    code, out = run_train(tmp_path, tiny_llama_dir, data, template_name="minicpm")
    err = stderr()
    assert code == USER_ERROR_EXIT_CODE
    assert f"{data}:2: 'system': template 'minicpm' has no system role" in err
    assert "Traceback" not in err and not (out / "adapter_model.safetensors").exists()


def test_skipping_invalid_lines_also_skips_a_refused_system_prompt(tmp_path, tiny_llama_dir):
    data = write_lines(
        tmp_path / "d.jsonl",
        [GOOD, conv(system="Be brief.", conversation=[{"human": "a", "assistant": "b"}]), GOOD],
    )
    code, out = run_train(
        tmp_path, tiny_llama_dir, data, template_name="minicpm", skip_invalid_examples=True, max_steps=1
    )
    assert code == 0
    assert ":2: 'system'" in (out / INVALID_EXAMPLES_FILE).read_text()
