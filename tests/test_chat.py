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
import torch
from transformers import GenerationConfig

from component.data.template import Message, generation_prompt, stop_token_ids
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


def _recording_generate(monkeypatch) -> list[dict]:
    """Each call of chat's `generate`: its keyword arguments, and the model's repetition_penalty as it starts."""
    calls: list[dict] = []
    original = chat.generate

    def recording(model, messages, **kw):
        calls.append({**kw, "messages": list(messages)})
        for piece in original(model, messages, **kw):
            calls[-1]["model_penalty"] = model.model.generation_config.repetition_penalty
            yield piece

    monkeypatch.setattr(chat, "generate", recording)
    return calls


def test_an_interrupted_reply_is_not_kept_in_the_history(loaded, monkeypatch):
    calls = _recording_generate(monkeypatch)
    lines = iter(["hello there", "What is two plus two?", "/exit"])
    out = _InterruptingOut()
    out.fired = True  # not on the session's header

    def read(_prompt):
        line = next(lines)
        out.fired = line != "hello there"  # Ctrl-C on this question's first reply text
        return line

    chat.interactive(loaded, ChatSettings(max_new_tokens=8), read=read, out=out)
    # Neither the stopped question nor its partial reply reaches the next turn.
    assert [[m.role for m in c["messages"]] for c in calls] == [["user"], ["user"]]
    assert calls[1]["messages"][0].content == "What is two plus two?"
    assert chat.STOPPED_NOTE in out.getvalue() and chat.NOT_KEPT_NOTE in out.getvalue()


def test_sampling_defaults_come_from_the_generation_config():
    sampling = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, repetition_penalty=1.2)
    got = chat.resolve_sampling(ChatSettings(), sampling)
    assert (got.temperature, got.top_p, got.repetition_penalty) == (0.7, 0.9, 1.2)
    flags = chat.resolve_sampling(ChatSettings(temperature=0.0, repetition_penalty=1.0), sampling)
    assert (flags.temperature, flags.top_p, flags.repetition_penalty) == (0.0, 0.9, 1.0)
    # A model that does not sample is greedy, whatever temperature its config lists.
    for greedy in (GenerationConfig(), GenerationConfig(temperature=0.6, top_p=0.8)):
        got = chat.resolve_sampling(ChatSettings(), greedy)
        assert (got.temperature, got.repetition_penalty) == (0.0, 1.0)
    assert chat.resolve_sampling(ChatSettings(), GenerationConfig(do_sample=True)).temperature == 1.0


def test_a_reply_samples_as_the_model_config_says(loaded, monkeypatch):
    calls = _recording_generate(monkeypatch)
    sampling = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, repetition_penalty=1.2)
    monkeypatch.setattr(loaded.model, "generation_config", sampling)
    out = io.StringIO()
    chat.stream_reply(loaded, [Message("user", "hello there")], ChatSettings(max_new_tokens=4), out)
    chat.stream_reply(loaded, [Message("user", "hello there")], ChatSettings(max_new_tokens=4, top_p=0.5), out)
    assert [(c["temperature"], c["top_p"]) for c in calls] == [(0.7, 0.9), (0.7, 0.5)]
    assert [c.get("model_penalty") for c in calls] == [1.2, 1.2]


def _reference_reply(loaded, messages: list[Message], max_new_tokens: int, **generation) -> str:
    """Greedy decoding by model.generate with `generation` passed explicitly, cut at the first stop token."""
    tok = loaded.tokenizer
    ids = tok(generation_prompt(loaded.template, tok, messages), add_special_tokens=False, return_tensors="pt")
    stops = stop_token_ids(loaded.template, tok)
    with torch.inference_mode():
        new = loaded.model.generate(
            **ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, **generation
        )[0, ids.input_ids.shape[1] :].tolist()
    cut = next((i for i, t in enumerate(new) if t in stops), len(new))
    return tok.decode(new[:cut], skip_special_tokens=False)


def test_repetition_penalty_reaches_the_model(loaded, monkeypatch):
    calls = _recording_generate(monkeypatch)
    messages = [Message("user", "What is two plus two?")]

    def reply(penalty):
        return chat.stream_reply(loaded, messages, ChatSettings(max_new_tokens=MAX_NEW, repetition_penalty=penalty))

    penalised, _ = reply(5.0)
    assert calls[-1]["model_penalty"] == 5.0
    assert penalised == _reference_reply(loaded, messages, MAX_NEW, repetition_penalty=5.0)
    assert penalised != reply(None)[0] == _reference_reply(loaded, messages, MAX_NEW)
    assert loaded.model.generation_config.repetition_penalty is None  # the model's own setting, back


def test_chat_script_sampling_flags():
    args = chat_script.parse_args(["--model", "m", "--repetition_penalty", "1.2", "--top_p", "0.9"])
    assert chat_script.settings(args) == ChatSettings(top_p=0.9, repetition_penalty=1.2)
    with pytest.raises(SystemExit) as exc:
        chat_script.parse_args(["--model", "m", "--repetition_penalty", "0", "--top_p", "1.5"])
    assert exc.value.code == 2


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
