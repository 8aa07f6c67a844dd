"""Load check for script/serve.py: concurrent streaming clients against one server, then the same requests
one after another.

    python bench/serve_load.py                      # a tiny random Llama, 32 clients, 16 tokens each
    python bench/serve_load.py --max_batch 1        # one request at a time, for comparison
    python bench/serve_load.py --model output/RUN-merged --clients 64 --max_queue 16

Each client is the official `openai` client streaming one chat completion (`max_tokens` tokens; the tiny
random model never says its stop token, so every reply is that long). The server runs as its own process,
started as a user would start it (with an API key, through FINETUNE_API_KEY), so the RSS reported is the
server's alone: after a warm-up request, the peak during each concurrent round and after each round. A
request answered 429 (beyond --max_queue) counts as answered; any other failure is an error.

The server gets --server_threads torch threads (OMP_NUM_THREADS, default 1). On a small machine the clients
need the CPUs too, and torch's OpenMP threads that wait by spinning then slow every step: on 2 cores, one
serial request of the tiny model took 0.3 s with 2 threads and 0.03 s with 1.
Prints a table, then one JSON line. Nothing is written into the repository.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import openai
import psutil

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "bench-key"
STARTUP_TIMEOUT_S = 300
PROMPT = "Write a short poem about the sea."


@dataclass
class Answer:
    """How one request ended: HTTP status (0: no answer), reply tokens, seconds, and the error if any."""

    status: int
    tokens: int
    seconds: float
    error: str = ""


def ask(client: openai.OpenAI, model: str, i: int, tokens: int) -> Answer:
    """One streaming chat completion; 429 is an answer, anything else that is not 200 an error."""
    start = time.monotonic()
    try:
        chunks = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"{PROMPT} ({i})"}],
            max_tokens=tokens,
            temperature=0.7,
            stream=True,
            stream_options={"include_usage": True},
        )
        usage = [c.usage for c in chunks if c.usage is not None]
        return Answer(200, usage[-1].completion_tokens if usage else 0, time.monotonic() - start)
    except openai.APIStatusError as exc:
        error = "" if exc.status_code == 429 else str(exc)
        return Answer(exc.status_code, 0, time.monotonic() - start, error)
    except Exception as exc:  # a connection error or a broken stream
        return Answer(0, 0, time.monotonic() - start, f"{type(exc).__name__}: {exc}")


def load(client: openai.OpenAI, model: str, clients: int, tokens: int, concurrent: bool) -> tuple[float, list[Answer]]:
    """`clients` requests, all at once (one thread each) or one after another; wall seconds and answers."""
    answers: list[Optional[Answer]] = [None] * clients

    def run(i: int) -> None:
        answers[i] = ask(client, model, i, tokens)

    start = time.monotonic()
    if concurrent:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i in range(clients):
            run(i)
    return time.monotonic() - start, [a or Answer(0, 0, 0.0, "no answer") for a in answers]


class PeakRss:
    """Samples a process's RSS every 20 ms while running; `peak` is the largest seen."""

    def __init__(self, pid: int):
        self.process, self.peak = psutil.Process(pid), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self):
        self.peak = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def tiny_model(folder: Path) -> Path:
    """The tests' tiny random Llama and BPE tokenizer (tests/tiny.py), saved to `folder`."""
    spec = importlib.util.spec_from_file_location("tiny", ROOT / "tests" / "tiny.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    return tiny.save_tiny_model("llama", folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, template: Optional[str], port: int, args: argparse.Namespace, log) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "script" / "serve.py"), "--model", model, "--port", str(port)]
    command += ["--model_id", "bench", "--max_batch", str(args.max_batch), "--max_queue", str(args.max_queue)]
    command += ["--template", template] if template else []
    env = {**os.environ, "FINETUNE_API_KEY": API_KEY, "TOKENIZERS_PARALLELISM": "false"}
    env["OMP_NUM_THREADS"] = str(args.server_threads)
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve.py exited with status {proc.returncode}; see {log.name}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"serve.py did not answer within {STARTUP_TIMEOUT_S}s; see {log.name}")


def summary(name: str, wall: float, answers: list[Answer]) -> dict:
    statuses = Counter(a.status for a in answers)
    ok = [a for a in answers if a.status == 200]
    return {
        "run": name,
        "wall_s": round(wall, 2),
        "answered_200": statuses[200],
        "answered_429": statuses[429],
        "errors": [a.error for a in answers if a.error][:3],
        "error_count": sum(1 for a in answers if a.error),
        "tokens": sum(a.tokens for a in ok),
        "tokens_per_s": round(sum(a.tokens for a in ok) / wall, 1),
        "max_latency_s": round(max((a.seconds for a in ok), default=0.0), 2),
    }


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model folder to serve; default: a tiny random Llama built here")
    p.add_argument("--template", help="chat template, for a folder without training metadata")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--tokens", type=int, default=16, help="max_tokens of each request")
    p.add_argument("--rounds", type=int, default=3, help="concurrent rounds (RSS after each shows it is bounded)")
    p.add_argument("--max_batch", type=int, default=8)
    p.add_argument("--max_queue", type=int, default=32)
    p.add_argument("--server_threads", type=int, default=1, help="the server's torch threads")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(tiny_model(Path(tmp) / "tiny"))
        template = args.template or (None if args.model else "chatml")
        port = free_port()
        with open(Path(tmp) / "serve.log", "w+") as log:
            proc = start_server(model, template, port, args, log)
            try:
                client = openai.OpenAI(
                    base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0, timeout=300
                )
                ask(client, "bench", -1, args.tokens)  # warm-up
                server = psutil.Process(proc.pid)
                rss = {"after_warmup_mb": server.memory_info().rss / 2**20}
                runs = []
                for r in range(args.rounds):
                    with PeakRss(proc.pid) as watch:
                        runs.append(
                            summary(f"concurrent {r + 1}", *load(client, "bench", args.clients, args.tokens, True))
                        )
                    rss[f"peak_round_{r + 1}_mb"] = watch.peak / 2**20
                    rss[f"after_round_{r + 1}_mb"] = server.memory_info().rss / 2**20
                runs.append(summary("serial", *load(client, "bench", args.clients, args.tokens, False)))
                health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30).read())
            finally:
                proc.terminate()
                proc.wait(timeout=60)
            log.seek(0)
            access_lines = sum(1 for line in log if " POST /v1/chat/completions " in line)
    print(
        f"{args.clients} clients x {args.tokens} tokens, --max_batch {args.max_batch} --max_queue {args.max_queue}, "
        f"{args.server_threads} server thread(s), model {args.model or 'tiny random Llama'}"
    )
    print("| run | wall s | 200 | 429 | errors | tokens/s | slowest request s |")
    print("|---|---|---|---|---|---|---|")
    for s in runs:
        print(
            f"| {s['run']} | {s['wall_s']} | {s['answered_200']} | {s['answered_429']} | {s['error_count']} "
            f"| {s['tokens_per_s']} | {s['max_latency_s']} |"
        )
    print("server RSS (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in rss.items()))
    print(f"server counters: {health}; access-log lines for chat requests: {access_lines}")
    serial = runs[-1]["wall_s"]
    print(
        json.dumps(
            {
                "concurrent_wall_s": [s["wall_s"] for s in runs[:-1]],
                "serial_wall_s": serial,
                "speedup": round(serial / min(s["wall_s"] for s in runs[:-1]), 2),
                "errors": sum(s["error_count"] for s in runs),
                "rss_mb": {k: round(v) for k, v in rss.items()},
            }
        )
    )
    return 1 if any(s["error_count"] for s in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
