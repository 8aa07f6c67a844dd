"""Serve a trained model over an OpenAI-compatible HTTP API.

    python script/serve.py --model DIR [--adapter DIR] [--host 127.0.0.1] [--port 8000]
    FINETUNE_API_KEY=SECRET python script/serve.py --model DIR --host 0.0.0.0

Endpoints: `POST /v1/chat/completions` (plain JSON, or server-sent events with
`"stream": true`, ending with `data: [DONE]`), `GET /v1/models`,
`GET /v1/models/NAME`, and `GET /health` (counters). Any OpenAI client works
against `http://HOST:PORT/v1`.

- With an API key (`--api_key`, or better the FINETUNE_API_KEY environment
  variable, which `ps` does not show), every request but /health must carry
  `Authorization: Bearer KEY`, else 401. Binding beyond loopback without a key
  logs a warning.
- The run's saved chat template renders the messages (`--template` for a
  folder without training metadata). `max_tokens` (or `max_completion_tokens`),
  `temperature` (0 is greedy; default 1 as in OpenAI's API), `top_p` and `stop`
  are honoured; `usage` counts prompt and reply tokens. `tools`, `functions`,
  a non-text `response_format` and `logprobs` are refused (400), never ignored.
- Errors come as OpenAI's JSON, never a traceback: 400 for a malformed
  request, 401, 404 for another model's name, 413 for a body over
  --max_body_bytes, 429 beyond --max_queue waiting requests.
- Requests are generated together in batches of up to --max_batch; one that
  arrives while a batch runs waits for the next. A client that disconnects
  stops its generation, streaming or not. One log line per request: id,
  status, tokens in and out, latency.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from component.cli import add_model_arguments, model_source, run_main
from component.inference.server.app import API_KEY_ENV, ServerSettings, api_key_from, serve

DEFAULTS = ServerSettings()


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--host", default=DEFAULTS.host, help="address to bind; 0.0.0.0 exposes it to the network")
    p.add_argument("--port", type=int, default=DEFAULTS.port)
    p.add_argument("--model_id", help="name shown by /v1/models and checked in requests; default: the folder's name")
    p.add_argument("--context_length", type=int, help="default: the model config's maximum positions")
    p.add_argument("--max_batch", type=int, default=DEFAULTS.max_batch, help="requests generated together")
    p.add_argument("--max_queue", type=int, default=DEFAULTS.max_queue, help="waiting requests before 429")
    p.add_argument("--max_body_bytes", type=int, default=DEFAULTS.max_body_bytes, help="larger bodies get 413")
    p.add_argument("--api_key", help=f"require `Authorization: Bearer KEY`; default: ${API_KEY_ENV} (preferred)")
    return p.parse_args(argv)


def settings(a: argparse.Namespace) -> ServerSettings:
    return ServerSettings(
        host=a.host,
        port=a.port,
        model_id=a.model_id,
        context_length=a.context_length,
        max_batch=a.max_batch,
        max_queue=a.max_queue,
        max_body_bytes=a.max_body_bytes,
        api_key=api_key_from(a.api_key),
    )


def main(argv: Optional[list[str]] = None) -> int:
    a = parse_args(argv)
    return run_main(lambda: serve(model_source(a), settings(a)), verbose=a.verbose)


if __name__ == "__main__":
    sys.exit(main())
