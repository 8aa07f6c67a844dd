"""Property-based tests: random and malformed configs and data only ever raise our errors.

The config parser (JSON file + CLI flags) and the data reader (JSONL + the
conversation check) get random input; whatever they get, they must either accept
it or raise a `UserError` subclass with a message. Anything else (TypeError,
RecursionError, UnicodeError, ...) is a bug that would show a user a traceback.
Each property runs 500 generated cases; no model is loaded.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from component.config.parse import CONFIG_FILE_FLAG, _field_table
from component.data.jsonl import read_jsonl
from component.data.sft import check_conversation, read_conversations
from component.errors import UserError
from component.training.setup import training_arguments
from tests.runs import load_config, load_values

CASES = 500
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")  # big reprs of big inputs
FUZZ = settings(
    max_examples=CASES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
KNOWN_KEYS = sorted(_field_table())
# Keys where random values reach the deepest checks (model, data, lengths, LoRA, precision, resume).
INTERESTING_KEYS = [
    "output_dir",
    "model_name_or_path",
    "train_file",
    "template_name",
    "data_format",
    "task_type",
    "train_mode",
    "max_seq_length",
    "max_prompt_length",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "fp16",
    "bf16",
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "seed",
    "deepspeed",
    "resume_from_checkpoint",
    "max_nonfinite_steps",
    "allow_pickle_weights",
    "lr_scheduler_type",
    "optim",
    "report_to",
    "hub_token",
    "save_steps",
    "logging_steps",
    "eval_file",
    "skip_invalid_examples",
    "gradient_accumulation_steps",
    "per_device_train_batch_size",
    "warmup_steps",
    "save_total_limit",
]
VALID = {
    "output_dir": "/nonexistent/fuzz-out",
    "model_name_or_path": "/nonexistent/model",
    "train_file": "/nonexistent/train.jsonl",
    "template_name": "chatml",
    "task_type": "sft",
    "train_mode": "lora",
    "max_seq_length": 64,
    "max_prompt_length": 32,
    "report_to": "none",
}

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["true", "false", "none", "chatml", "lora", "qlora", "full", "sft", "dpo", "1e-4", "-1", "0", ""])
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
keys = st.sampled_from(KNOWN_KEYS) | st.sampled_from(INTERESTING_KEYS) | st.text(max_size=14)


@st.composite
def config_files(draw) -> dict:
    """A valid config with a few keys replaced or added, or a random dict."""
    if draw(st.booleans()):
        values = dict(VALID)
        for key in draw(st.lists(st.sampled_from(INTERESTING_KEYS) | keys, min_size=1, max_size=3)):
            values[key] = draw(json_values)
        for key in draw(st.lists(st.sampled_from(sorted(VALID)), max_size=1)):
            values.pop(key, None)
        return values
    return draw(st.dictionaries(keys, json_values, max_size=8))


cli_tokens = st.lists(
    st.sampled_from([f"--{k}" for k in INTERESTING_KEYS])
    | st.text(alphabet=string.printable, max_size=10)
    | st.sampled_from(["--", "-", "--=", "--max_steps=abc", "[1,", '["a"]', "nan", "inf", "None", "{", '{"a": 1}']),
    max_size=6,
)


def assert_only_user_errors(call) -> None:
    try:
        call()
    except UserError as exc:
        assert str(exc).strip(), "a UserError must carry a message"


@pytest.fixture
def config_path(tmp_path) -> Path:
    return tmp_path / "fuzz.json"


@FUZZ
@given(values=config_files(), argv=cli_tokens)
@example(values={"lora_target_modules": "q"}, argv=["--lora_target_modules", "[" * 5000])
@example(values=VALID, argv=["--lora_target_modules", "[" + "9" * 5000 + "]"])
@example(values={**VALID, "learning_rate": float("nan")}, argv=[])
@example(values={**VALID, "seed": -1}, argv=[])
@example(values={**VALID, "resume_from_checkpoint": True}, argv=["--resume_from_checkpoint", "false"])
def test_config_parser_only_raises_user_errors(config_path, values, argv):
    config_path.write_text(json.dumps(values))
    argv = [CONFIG_FILE_FLAG, str(config_path), *argv]
    assert_only_user_errors(lambda: load_values(argv))
    # The runner's first step builds TrainingArguments from it: its refusals are user errors too.
    assert_only_user_errors(lambda: training_arguments(load_config(argv)))


@FUZZ
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
@example(raw=b"[" * 100_000)
@example(raw=b'{"a": ' + b"9" * 5000 + b"}")
@example(raw=b"\xff\xfe{}")
@example(raw=b"")
def test_config_file_bytes_only_raise_user_errors(config_path, raw):
    config_path.write_bytes(raw)
    assert_only_user_errors(lambda: load_config([CONFIG_FILE_FLAG, str(config_path)]))


# ---------------------------------------------------------------- data

texts = st.text(max_size=20) | st.sampled_from(["", " ", "\n", "\ud800", "ok", "\x00"])
turn_values = texts | json_values
turns = st.dictionaries(
    st.sampled_from(["human", "assistant", "user", "gpt"]) | st.text(max_size=5), turn_values, max_size=3
)
records = st.fixed_dictionaries(
    {},
    optional={
        "conversation": st.lists(turns | json_values, max_size=3) | json_values,
        "system": texts | json_values,
        "id": json_values,
        "extra": json_values,
    },
)
lines = (
    records.map(lambda r: json.dumps(r).encode("utf-8", "surrogatepass"))
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.binary(max_size=40)
    | st.sampled_from([b"[" * 50_000, b"9" * 5000, b'{"conversation": [', b"\xc3\x28", b"\ufeff{}".decode().encode()])
)


@FUZZ
@given(file_lines=st.lists(lines, max_size=6), newline=st.sampled_from([b"\n", b"\r\n"]))
def test_data_reader_only_raises_user_errors(tmp_path, file_lines, newline):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(newline.join(file_lines))
    try:
        result = read_jsonl(str(path), check_conversation)
    except UserError:
        return
    for record in result.records:  # what passes the check is what the tokenizer may rely on
        assert isinstance(record["conversation"], list) and record["conversation"]
        for turn in record["conversation"]:
            for key in ("human", "assistant"):
                assert isinstance(turn[key], str) and turn[key].strip()
                turn[key].encode("utf-8")  # no lone surrogates reach the tokenizer
        assert record["system"] is None or isinstance(record["system"], str)
    for problem in result.problems:
        assert str(problem).startswith(f"{path}:{problem.line}: ")
    assert_only_user_errors(lambda: read_conversations(str(path)))
    assert_only_user_errors(lambda: read_conversations(str(path), skip_invalid=True))


@FUZZ
@given(obj=records | json_values)
@example(obj={"conversation": [{"human": "\ud800", "assistant": "x"}]})
def test_conversation_check_returns_record_or_message(obj):
    result = check_conversation(obj)
    assert isinstance(result, (dict, str))
    if isinstance(result, str):
        assert result
