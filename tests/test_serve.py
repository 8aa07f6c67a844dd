"""The server (component/inference/server/) with the official openai client, raw HTTP for malformed requests,
script/serve.py, and a small run of bench/serve_load.py."""

from __future__ import annotations

import hmac
import http.client
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import openai
import pytest
import torch
import uvicorn
from loguru import logger
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

from component.cli import main_train
from component.data.template import Message, generation_prompt
from component.errors import ConfigError
from component.inference.generation import ModelSource, generate, load_for_inference
from component.inference.server.app import (
    API_KEY_ENV,
    ServerSettings,
    api_key_from,
    create_app,
    exposure_warning,
    serve,
)
from component.inference.server.service import RowSampling, Service, context_length, generate_batch
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
def running(service: Service, **app_options):
    """The app on a free loopback port in a thread of this process; stopped, with its service, on exit."""
    port = free_port()
    app = create_app(service, **app_options)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, "the server to start")
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        service.close()
    assert not thread.is_alive()


def post(port: int, body, path: str = "/v1/chat/completions", method: str = "POST", headers=None, **kwargs):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})}, **kwargs)
    resp = conn.getresponse()
    status, ctype, data = resp.status, resp.getheader("Content-Type"), resp.read()
    conn.close()
    return status, ctype, data


def openai_error(status: int, data: bytes) -> dict:
    """The error object of an answer in OpenAI's shape, with exactly its four fields."""
    body = json.loads(data)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, (status, body)
    return body["error"]


def token_id(loaded, text: str) -> int:
    return loaded.tokenizer(text, add_special_tokens=False)["input_ids"][0]


def load_bench():
    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "bench" / "serve_load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


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


def direct(loaded, max_new_tokens: int, stop=None, prompt=PROMPT) -> str:
    messages = [Message(m["role"], m["content"]) for m in prompt]
    return "".join(generate(loaded, messages, max_new_tokens=max_new_tokens, temperature=0.0, stop=stop))


def test_models(server, client):
    service = server[1]
    assert [(m.id, m.created) for m in client.models.list().data] == [("tiny", service.created)]
    assert time.time() - 600 < service.created <= time.time()  # loaded by this module's fixture
    assert client.models.retrieve("tiny").created == service.created
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")


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


def test_unknown_model_gets_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=PROMPT, max_tokens=2)
    assert caught.value.code == "model_not_found" and "gpt-4o" in caught.value.message


TOOL = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"tools": [TOOL]}, "tools"),
        ({"functions": [TOOL["function"]]}, "functions"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logprobs": True}, "logprobs"),
    ],
)
def test_what_the_server_cannot_honour_is_refused(server, client, extra, param):
    if param == "tools":  # the way clients send it
        with pytest.raises(openai.BadRequestError, match="tool calling is not supported by this server yet"):
            client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=2, tools=[TOOL])
    status, _, data = post(server[0], json.dumps({"messages": PROMPT, **extra}))
    error = openai_error(status, data)
    assert status == 400 and error["param"] == param and error["code"] == "unsupported_parameter"


def test_waiting_requests_run_as_one_batch_each_as_if_alone(base_model):
    """Greedy prompts of three lengths, left-padded into one batch with a sampled one, get the replies they
    get alone."""
    hold, held = threading.Event(), threading.Event()

    def first_batch_held(loaded, rows):
        if not held.is_set():
            held.set()
            assert hold.wait(60)
        generate_batch(loaded, rows)

    prompts = [[{"role": "user", "content": text}] for text in ("hi", "hello there, how are you today?", "2+2?")]
    service = Service(base_model, "tiny", 512, batch_fn=first_batch_held, max_batch=4)
    replies = {}
    with running(service) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)

        def ask(i, prompt, temperature=0.0):
            stream = i == 1
            out = client.chat.completions.create(
                model="tiny", messages=prompt, max_tokens=6, temperature=temperature, stream=stream
            )
            replies[i] = (
                "".join(c.choices[0].delta.content or "" for c in out) if stream else out.choices[0].message.content
            )

        threads = [threading.Thread(target=ask, args=(-1, PROMPT))]
        threads[0].start()
        assert held.wait(60)
        threads += [threading.Thread(target=ask, args=(i, p)) for i, p in enumerate(prompts)]
        threads.append(threading.Thread(target=ask, args=(3, PROMPT, 1.0)))  # sampled: the batch samples
        for t in threads[1:]:
            t.start()
        wait_until(lambda: service.counters()["waiting"] == 4, "four requests to wait")
        hold.set()
        for t in threads:
            t.join(timeout=60)
        assert service.scheduler.counts == {"batches": 2, "max_running": 4}
    assert [replies[i] for i in range(3)] == [direct(base_model, 6, prompt=p) for p in prompts]
    assert isinstance(replies[3], str)


def test_a_failed_batch_answers_500_and_the_server_goes_on(base_model):
    failures = [RuntimeError("out of memory")]

    def fails_once(loaded, rows):
        if failures:
            raise failures.pop()
        generate_batch(loaded, rows)

    service = Service(base_model, "tiny", 512, batch_fn=fails_once)
    with running(service) as port:
        status, _, data = post(port, json.dumps({"messages": PROMPT, "max_tokens": 2}))
        assert status == 500 and openai_error(status, data)["type"] == "server_error"
        assert "out of memory" not in data.decode()  # the log has it, the client does not
        failures.append(RuntimeError("again"))
        status, _, data = post(port, json.dumps({"messages": PROMPT, "max_tokens": 2, "stream": True}))
        events = [e for e in data.decode().split("\n\n") if e]
        assert status == 200 and '"server_error"' in events[-1]
        assert post(port, json.dumps({"messages": PROMPT, "max_tokens": 2}))[0] == 200
        assert service.counters()["failed"] == 2


def test_row_sampling_is_each_rows_own_warpers():
    """Batched sampling settings equal transformers' temperature and top-p warpers applied to each row alone."""
    torch.manual_seed(0)
    scores = torch.randn(4, 64) * 3
    temperatures, top_ps = [0.7, 1.3, 0.0, 1.0], [0.9, 0.5, 1.0, 1.0]
    out = RowSampling(temperatures, top_ps)(None, scores.clone())
    for i, (t, p) in enumerate(zip(temperatures, top_ps, strict=True)):
        row = scores[i : i + 1]
        if t == 0:
            assert torch.isfinite(out[i]).nonzero().flatten().tolist() == [row.argmax().item()]
            continue
        expected = TemperatureLogitsWarper(t)(None, row.clone())
        expected = TopPLogitsWarper(p)(None, expected) if p < 1 else expected
        torch.testing.assert_close(out[i : i + 1], expected)
    assert torch.isinf(out[1]).sum() > 0  # top_p 0.5 dropped some tokens


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_stops_generation(base_model, stream):
    started = threading.Event()
    piece = token_id(base_model, "first")

    def endless(loaded, rows):
        """One token every 50 ms until the client leaves (a real model would stop at max_tokens)."""
        started.set()
        while not rows[0].cancel.is_set():
            rows[0].tokens.put(piece)
            time.sleep(0.05)

    service = Service(base_model, "tiny", 512, batch_fn=endless)
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
        wait_until(lambda: service.counters()["cancelled"] == 1, "the generation to stop")
        wait_until(lambda: service.counters()["running"] == 0, "the batch to end")


def held_batches(loaded, release: threading.Event):
    """A batch function that gives each row one token, "x", then holds the model until `release`."""
    x = token_id(loaded, "x")

    def held(loaded, rows):
        for row in rows:
            row.tokens.put(x)
        assert release.wait(60)

    return held


def test_a_full_queue_gets_429(base_model):
    release = threading.Event()
    service = Service(base_model, "tiny", 512, batch_fn=held_batches(base_model, release), max_batch=1, max_queue=1)
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
        wait_until(lambda: service.counters()["waiting"] == 1, "the second request to queue")
        status, _, data = post(port, json.dumps({"messages": PROMPT}))
        assert status == 429 and openai_error(status, data)["code"] == "server_busy"
        release.set()
        assert first_resp.read().rstrip().endswith(b"data: [DONE]")
        first.close()
        second.join(timeout=60)
        assert waiting[0][0] == 200 and json.loads(waiting[0][2])["choices"][0]["message"]["content"] == "x"
        assert service.counters()["rejected"] == 1


def test_a_request_whose_client_left_while_waiting_never_runs(base_model):
    release = threading.Event()
    service = Service(base_model, "tiny", 512, batch_fn=held_batches(base_model, release), max_batch=1)
    with running(service) as port:
        holder = threading.Thread(target=post, args=(port, json.dumps({"messages": PROMPT})))
        holder.start()
        wait_until(lambda: service.counters()["running"] == 1, "the first request to run")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request(
            "POST", "/v1/chat/completions", json.dumps({"messages": PROMPT}), {"Content-Type": "application/json"}
        )
        wait_until(lambda: service.counters()["waiting"] == 1, "the second request to queue")
        conn.sock.close()
        wait_until(lambda: service.counters()["cancelled"] == 1, "the waiting request to be cancelled")
        release.set()
        holder.join(timeout=60)
        wait_until(lambda: service.counters()["waiting"] == 0, "the queue to empty")
        assert service.scheduler.counts["batches"] == 1


# ---------------------------------------------------------------- sharing it: the key, the body limit, the log


def test_api_key_is_required_and_compared_in_constant_time(base_model, monkeypatch):
    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append(a) or real(a, b))
    service = Service(base_model, "tiny", 512)
    with running(service, api_key="s3cret") as port:
        url = f"http://127.0.0.1:{port}/v1"
        for key in ("wrong", "s3cret-and-more"):
            with pytest.raises(openai.AuthenticationError) as caught:
                openai.OpenAI(base_url=url, api_key=key, max_retries=0).models.list()
            assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
        status, _, data = post(port, json.dumps({"messages": PROMPT, "max_tokens": 1}))  # no header at all
        assert status == 401 and "API key" in openai_error(status, data)["message"]
        assert post(port, b"", path="/v1/nothing", method="GET")[0] == 401  # no probing for paths either
        assert post(port, b"", path="/health", method="GET")[0] == 200  # open, for health checks
        client = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0, timeout=60)
        out = client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=2, temperature=0)
        assert out.choices[0].message.content == direct(base_model, 2)
        headers = {"Authorization": "bearer s3cret"}  # the scheme is case-insensitive
        assert post(port, json.dumps({"messages": PROMPT, "max_tokens": 1}), headers=headers)[0] == 200
    assert b"wrong" in compared and b"s3cret" in compared


def test_api_key_from_flag_or_environment(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert api_key_from(None) == "from-env" and api_key_from("flag") == "flag"
    monkeypatch.setenv(API_KEY_ENV, "")
    assert api_key_from(None) is None


@pytest.mark.parametrize(
    "host, key, warned",
    [("127.0.0.1", None, False), ("::1", None, False), ("localhost", None, False), ("0.0.0.0", "k", False)]
    + [("0.0.0.0", None, True), ("192.168.1.5", None, True), ("my-host", None, True)],
)
def test_binding_beyond_loopback_without_a_key_warns(host, key, warned):
    warning = exposure_warning(host, key)
    assert (warning is not None) == warned
    assert warning is None or (host in warning and API_KEY_ENV in warning)


def test_serve_checks_flags_and_warns_before_loading(tmp_path):
    messages = []
    sink = logger.add(lambda m: messages.append(str(m)), level="WARNING", format="{message}")
    missing = ModelSource(str(tmp_path / "no-model"), template="chatml")
    try:
        with pytest.raises(ConfigError) as caught:
            serve(missing, ServerSettings(max_batch=0, max_queue=-1, max_body_bytes=0))
        assert all(flag in str(caught.value) for flag in ("--max_batch", "--max_queue", "--max_body_bytes"))
        assert not messages
        with pytest.raises(Exception, match="no-model"):  # the warning comes first, then the load fails
            serve(missing, ServerSettings(host="0.0.0.0"))
    finally:
        logger.remove(sink)
    assert len(messages) == 1 and "without an API key" in messages[0]


def test_a_body_over_the_limit_gets_413(base_model):
    service = Service(base_model, "tiny", 512)
    small = json.dumps({"messages": PROMPT, "max_tokens": 1})
    big = json.dumps({"messages": [{"role": "user", "content": "a" * 2000}], "max_tokens": 1}).encode()
    with running(service, max_body_bytes=1000) as port:
        assert post(port, small)[0] == 200
        status, _, data = post(port, big)  # Content-Length says it at once
        assert status == 413 and openai_error(status, data)["code"] == "request_too_large"
        chunks = (big[i : i + 300] for i in range(0, len(big), 300))  # no length: counted as it arrives
        status, _, data = post(port, chunks, encode_chunked=True, headers={"Transfer-Encoding": "chunked"})
        assert status == 413 and openai_error(status, data)["code"] == "request_too_large"
        assert post(port, small)[0] == 200


def test_one_access_log_line_per_request(server, client):
    lines = []
    sink = logger.add(lambda m: lines.append(str(m).strip()), level="INFO", format="{message}")
    try:
        raw = client.chat.completions.with_raw_response.create(model="tiny", messages=PROMPT, max_tokens=3)
        out, request_id = raw.parse(), raw.headers["x-request-id"]
        client.models.list()
        post(server[0], b"{not json")
        wait_until(lambda: len([line for line in lines if line.startswith("req-")]) == 3, "three log lines")
    finally:
        logger.remove(sink)
    chat = [line for line in lines if line.startswith(request_id + " ")]
    assert len(chat) == 1 and out.id == "chatcmpl-" + request_id.removeprefix("req-")
    usage = out.usage
    assert re.fullmatch(
        rf"{request_id} POST /v1/chat/completions 200 tokens in={usage.prompt_tokens} "
        rf"out={usage.completion_tokens} \d+\.\d{{3}}s completed",
        chat[0],
    )
    assert any(" GET /v1/models 200 " in line for line in lines)
    assert any(" POST /v1/chat/completions 400 " in line for line in lines)


def test_load_of_concurrent_streams_all_answered_then_still_serving(base_model):
    """bench/serve_load.py's load, smaller: 16 streaming clients at once; each gets 200 or 429, none an error."""
    bench = load_bench()
    service = Service(base_model, "tiny", 512, max_batch=4, max_queue=4)
    with running(service, api_key="k") as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=120)
        _, answers = bench.load(client, "tiny", clients=16, tokens=8, concurrent=True)
        assert [a.error for a in answers if a.error] == []
        assert {a.status for a in answers} <= {200, 429} and any(a.status == 200 for a in answers)
        assert client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=2).choices
        counts = service.counters()
    answered = sum(a.status == 200 for a in answers)
    assert counts["completed"] == answered + 1 and counts["rejected"] == 16 - answered and counts["failed"] == 0
    assert counts["max_running"] <= 4


def test_cli_serves_a_trained_adapter_on_loopback_with_a_key(tmp_path, tiny_llama_dir):
    values = base_config(tiny_llama_dir, tmp_path / "run", max_steps=2, max_prompt_length=64)
    assert main_train(["--train_args_file", str(write_config(tmp_path / "c.json", **values))]) == 0
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "script" / "serve.py"), "--model", str(tmp_path / "run"), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,  # another folder, no PYTHONPATH: the installed package is found on its own
        env={**os.environ, API_KEY_ENV: "cli-key"},
    )
    try:

        def up():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                return post(port, b"", path="/health", method="GET")[0] == 200
            except OSError:
                return False

        wait_until(up, "serve.py to answer")
        assert post(port, b"", path="/v1/models", method="GET")[0] == 401
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="cli-key", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["run"]
        out = client.chat.completions.create(model="run", messages=PROMPT, max_tokens=4, temperature=0)
        assert isinstance(out.choices[0].message.content, str)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = (tmp_path / "serve.log").read_text()
    assert f"http://127.0.0.1:{port}" in text and "template chatml" in text and "Bearer" in text
    assert re.search(r"req-\w+ POST /v1/chat/completions 200 tokens in=\d+ out=\d+ ", text)
    assert "without an API key" not in text
