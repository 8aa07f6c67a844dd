"""The server (component/inference/server/) with the official openai client, raw HTTP for malformed requests,
and script/serve.py."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import openai
import pytest
import uvicorn

from component.cli import main_train
from component.data.template import Message, generation_prompt
from component.inference.generation import generate, load_for_inference
from component.inference.server.app import create_app
from component.inference.server.service import Service, context_length
from tests.conftest import ROOT, base_config, write_config

STARTUP_TIMEOUT_S = 120  # generous: the CPUs are shared; only a guard against hanging forever
PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, what: str, timeout: float = STARTUP_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


@contextmanager
def running(service: Service):
    """The app on a free loopback port in a thread of this process; stopped on exit."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, "the server to start")
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert not thread.is_alive()


def post(port: int, body: bytes | str, path: str = "/v1/chat/completions", method: str = "POST"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    status, ctype, data = resp.status, resp.getheader("Content-Type"), resp.read()
    conn.close()
    return status, ctype, data


@pytest.fixture(scope="module")
def base_model(tiny_llama_dir):
    # The untrained tiny model never says its stop token: replies run to max_tokens.
    return load_for_inference(str(tiny_llama_dir), template_name="chatml")


@pytest.fixture(scope="module")
def server(base_model):
    service = Service(base_model, "tiny", context_length(base_model, None))
    with running(service) as port:
        yield port, service


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server[0]}/v1", api_key="unused", max_retries=0, timeout=60)


def direct(loaded, max_new_tokens: int, stop=None) -> str:
    messages = [Message(m["role"], m["content"]) for m in PROMPT]
    return "".join(generate(loaded, messages, max_new_tokens=max_new_tokens, temperature=0.0, stop=stop))


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_chat_completion(client, base_model):
    out = client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=6, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == direct(base_model, 6) != direct(base_model, 3)
    prompt = generation_prompt(base_model.template, base_model.tokenizer, [Message(**m) for m in PROMPT])
    assert out.usage.prompt_tokens == len(base_model.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert out.usage.completion_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.model == "tiny" and out.id.startswith("chatcmpl-")


def test_streaming(client, base_model):
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=PROMPT,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == direct(base_model, 6)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_stream_ends_with_done(server):
    body = {"messages": PROMPT, "max_tokens": 3, "stream": True, "temperature": 0}
    status, ctype, data = post(server[0], json.dumps(body))
    events = [e for e in data.decode().split("\n\n") if e]
    assert status == 200 and ctype.startswith("text/event-stream")
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_stop_strings(client, base_model):
    full = direct(base_model, 8)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    out = client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=8, temperature=0, stop=[stop])
    assert out.choices[0].message.content == direct(base_model, 8, stop=[stop]) == full[: full.index(stop)]


@pytest.mark.parametrize(
    "body, param",
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (json.dumps({"model": "tiny"}), "messages"),
        (json.dumps({"messages": []}), "messages"),
        (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}), "messages[0].role"),
        (json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}), "messages"),
        (
            json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}),
            "messages",
        ),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}), "temperature"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 2}), "n"),
    ],
)
def test_bad_requests_get_400_json(server, body, param):
    status, ctype, data = post(server[0], body)
    error = json.loads(data)["error"]
    assert status == 400 and ctype == "application/json"
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    assert "Traceback" not in error["message"]


def test_oversized_prompt(server, client):
    long = {"messages": [{"role": "user", "content": "word " * 2000}]}
    status, _, data = post(server[0], json.dumps(long))
    assert status == 400 and json.loads(data)["error"]["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=100_000)


def test_unknown_path_is_json_404(server):
    status, ctype, data = post(server[0], b"", path="/v1/nothing", method="GET")
    assert status == 404 and ctype == "application/json" and "error" in json.loads(data)


def test_twenty_sequential_requests_then_still_answers(server, client):
    before = server[1].stats["completed"]
    for i in range(20):
        out = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"n {i}"}], max_tokens=2, temperature=0.7, top_p=0.9
        )
        assert out.choices[0].finish_reason in ("stop", "length")
    assert server[1].stats["completed"] == before + 20
    assert client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=2).choices


def test_concurrent_requests_take_turns(server, client):
    results = []

    def ask(stream: bool):
        out = client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=4, temperature=0, stream=stream)
        results.append(
            "".join(c.choices[0].delta.content or "" for c in out) if stream else out.choices[0].message.content
        )

    threads = [threading.Thread(target=ask, args=(i % 2 == 0,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 4 and len(set(results)) == 1
    assert server[1].stats["max_active"] == 1


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_stops_generation(base_model, stream):
    started, stopped = threading.Event(), threading.Event()

    def endless(loaded, messages, cancel=None, **kwargs):
        """Yields a piece, then waits for cancellation (a real model would keep going)."""
        started.set()
        yield "first"
        while not cancel.wait(0.05):
            yield ""
        stopped.set()

    service = Service(base_model, "tiny", 512, generate_fn=endless)
    with running(service) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        body = json.dumps({"messages": PROMPT, "stream": stream})
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        if stream:
            resp = conn.getresponse()
            assert resp.status == 200 and resp.readline().startswith(b"data: ")
            resp.close()
        assert started.wait(60)
        conn.sock.close()
        conn.close()
        wait_until(lambda: stopped.is_set() and service.stats["cancelled"] == 1, "the generation to stop")
        # The worker releases the slot just after it records the cancellation.
        wait_until(lambda: service.stats["active"] == 0 and not service.lock.locked(), "the slot to be released")


def test_cli_serves_a_trained_adapter_on_loopback(tmp_path, tiny_llama_dir):
    values = base_config(tiny_llama_dir, tmp_path / "run", max_steps=2, max_prompt_length=64)
    assert main_train(["--train_args_file", str(write_config(tmp_path / "c.json", **values))]) == 0
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "script" / "serve.py"), "--model", str(tmp_path / "run"), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,  # another folder, no PYTHONPATH: the installed package is found on its own
    )
    try:

        def up():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                return post(port, b"", path="/v1/models", method="GET")[0] == 200
            except OSError:
                return False

        wait_until(up, "serve.py to answer")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["run"]
        out = client.chat.completions.create(model="run", messages=PROMPT, max_tokens=4, temperature=0)
        assert isinstance(out.choices[0].message.content, str)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = (tmp_path / "serve.log").read_text()
    assert f"http://127.0.0.1:{port}" in text and "template chatml" in text


def test_a_full_queue_gets_429(base_model):
    release = threading.Event()

    def held(loaded, messages, cancel=None, **kwargs):
        yield "x"
        release.wait(60)

    service = Service(base_model, "tiny", 512, generate_fn=held, max_queue=1)
    with running(service) as port:
        first = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        first.request(
            "POST",
            "/v1/chat/completions",
            body=json.dumps({"messages": PROMPT, "stream": True}),
            headers={"Content-Type": "application/json"},
        )
        first_resp = first.getresponse()
        assert first_resp.readline().startswith(b"data: ")  # holds the model
        waiting = []
        second = threading.Thread(target=lambda: waiting.append(post(port, json.dumps({"messages": PROMPT}))))
        second.start()
        wait_until(lambda: service.stats["waiting"] == 1, "the second request to queue")
        status, _, data = post(port, json.dumps({"messages": PROMPT}))
        assert status == 429 and json.loads(data)["error"]["code"] == "server_busy"
        release.set()
        assert first_resp.read().rstrip().endswith(b"data: [DONE]")
        first.close()
        second.join(timeout=60)
        assert waiting[0][0] == 200 and json.loads(waiting[0][2])["choices"][0]["message"]["content"] == "x"
