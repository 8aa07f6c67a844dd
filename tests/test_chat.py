"""Inference, component/inference/chat.py and script/chat.py: templates from metadata, stop tokens never
shown, clean interruption."""

from __future__ import annotations

import io
import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from component.data.template import Message
from component.inference import chat
from component.inference.chat import ChatSettings
from component.inference.generation import InferenceError, _stream_text, generate, load_for_inference
from component.runner import run
from script import chat as chat_script
from tests.conftest import ROOT, base_config, write_config
from tests.runs import load_config
from tests.tiny import tiny_tokenizer

STOP = "<|im_end|>"  # chatml's stop token
MAX_NEW = 48


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tiny_llama_dir) -> Path:
    """A tiny Llama fully fine-tuned until it answers and ends its turn with the stop token."""
    out = tmp_path_factory.mktemp("chat") / "full"
    values = base_config(
        tiny_llama_dir,
        out,
        train_mode="full",
        max_prompt_length=64,
        max_steps=60,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
    )
    run(load_config(["--train_args_file", str(write_config(out.parent / "c.json", **values))]))
    return out


@pytest.fixture(scope="module")
def loaded(chat_model):
    return load_for_inference(str(chat_model))


def _generate_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "generate" and t.is_alive()]


def test_template_comes_from_training_metadata(loaded):
    assert loaded.template.name == "chatml"


def test_template_flag_overrides_metadata(chat_model):
    assert load_for_inference(str(chat_model), template_name="default").template.name == "default"


def test_folder_without_metadata_needs_a_template(tiny_llama_dir):
    with pytest.raises(InferenceError, match="pass a template"):
        load_for_inference(str(tiny_llama_dir))


def test_reply_ends_at_the_stop_token_which_is_never_shown(loaded):
    tok = loaded.tokenizer
    pieces = list(generate(loaded, [Message("user", "What is two plus two?")], max_new_tokens=MAX_NEW))
    reply = "".join(pieces)
    ids = tok(reply, add_special_tokens=False).input_ids
    assert reply.strip() and STOP not in reply
    assert len(ids) < MAX_NEW  # stopped by the stop token, not by the length limit


def test_one_shot_prints_reply_without_stop_token(chat_model, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "script" / "chat.py"),
            "--model",
            str(chat_model),
            "--prompt",
            "What is two plus two?",
            "--max_new_tokens",
            str(MAX_NEW),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # another folder: the installed package is found without the checkout on sys.path
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and STOP not in proc.stdout


def test_missing_model_exits_2_without_traceback(tmp_path, capsys):
    assert chat_script.main(["--model", str(tmp_path / "nowhere"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "Traceback" not in err


def test_interactive_multi_turn_and_reset(loaded, monkeypatch):
    lines = iter(["What is two plus two?", "hello there", "/reset", "Name a colour.", "/exit"])
    seen: list[list[Message]] = []
    original = chat.generate

    def recording(model, messages, **kw):
        seen.append(list(messages))
        return original(model, messages, **kw)

    out = io.StringIO()
    monkeypatch.setattr(chat, "generate", recording)
    chat.interactive(loaded, ChatSettings(max_new_tokens=8), read=lambda _: next(lines), out=out)
    assert [len(m) for m in seen] == [1, 3, 1]  # second turn sees the first; reset clears it
    assert "history cleared" in out.getvalue()


def test_cancel_stops_generation_and_its_thread(loaded):
    cancel = threading.Event()
    pieces = []
    for piece in generate(loaded, [Message("user", "hello there")], max_new_tokens=200, cancel=cancel):
        pieces.append(piece)
        cancel.set()
    assert len(pieces) == 1
    assert not _generate_threads()


class _InterruptingOut(io.StringIO):
    """Raises KeyboardInterrupt on the first reply text, as Ctrl-C would."""

    def write(self, text):
        if text.strip() and not getattr(self, "fired", False):
            self.fired = True
            raise KeyboardInterrupt
        return super().write(text)


def test_ctrl_c_during_generation_stops_cleanly(loaded):
    out = _InterruptingOut()
    settings = ChatSettings(max_new_tokens=200)
    reply, interrupted = chat.stream_reply(loaded, [Message("user", "hello there")], settings, out)
    assert interrupted and reply == ""  # nothing after the interrupt was shown or kept
    assert chat.STOPPED_NOTE in out.getvalue()
    assert not _generate_threads()
    # the model is still usable afterwards
    assert "".join(generate(loaded, [Message("user", "Name a colour.")], max_new_tokens=MAX_NEW)).strip()


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def _stream(tok, ids: list[int], stop_ids: set[int], stops: list[str]) -> list[str]:
    q: queue.Queue = queue.Queue()
    for i in [*ids, None]:
        q.put(i)
    return list(_stream_text(tok, q, stop_ids, stops, threading.Event(), None))


def test_stop_token_id_ends_the_reply_and_is_not_shown():
    tok = tiny_tokenizer()
    stop_id = tok.convert_tokens_to_ids(STOP)
    pieces = _stream(tok, _ids(tok, "hello there") + [stop_id] + _ids(tok, " after"), {stop_id}, [])
    assert "".join(pieces) == "hello there"


def test_stop_string_split_across_tokens_is_never_shown():
    tok = tiny_tokenizer()
    text_ids = _ids(tok, "the sea is deep") + [tok.convert_tokens_to_ids(t) for t in tok.tokenize(" END more")]
    pieces = _stream(tok, text_ids, set(), [" END"])
    assert "".join(pieces) == "the sea is deep"
    assert all("E" not in p for p in pieces)
