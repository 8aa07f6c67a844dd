"""Serve a trained model over an OpenAI-compatible HTTP API.

    python script/serve.py --model DIR [--adapter DIR] [--host 127.0.0.1] [--port 8000]

Endpoints: `POST /v1/chat/completions` (plain JSON, or server-sent events with
`"stream": true`, ending with `data: [DONE]`), `GET /v1/models`, and
`GET /health` (counters). Any OpenAI client works against
`http://HOST:PORT/v1`; the API key is not checked.

- The run's saved chat template renders the messages (`--template` for a
  folder without training metadata). `max_tokens` (or `max_completion_tokens`),
  `temperature` (0 is greedy; default 1 as in OpenAI's API), `top_p` and `stop`
  are honoured; `usage` counts prompt and reply tokens.
- Bad requests get OpenAI-style JSON errors with a 4xx status, never a
  traceback: a body that is not JSON, missing or malformed fields, unknown
  roles, a conversation the template cannot render, a prompt that does not
  fit the context.
- One generation runs at a time; others wait their turn on a first-come lock
  (beyond --max_queue waiting requests: 429). A client that disconnects stops
  its generation, streaming or not.
- Binds to 127.0.0.1 unless told otherwise: there is no authentication.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from component.cli import add_model_arguments, model_source, run_main
from component.inference.server.app import DEFAULT_HOST, DEFAULT_MAX_QUEUE, DEFAULT_PORT, serve


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--host", default=DEFAULT_HOST, help="address to bind; 0.0.0.0 exposes it to the network")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--model_id", help="name shown by /v1/models; default: the folder's name")
    p.add_argument("--context_length", type=int, help="default: the model config's maximum positions")
    p.add_argument("--max_queue", type=int, default=DEFAULT_MAX_QUEUE, help="waiting requests before 429")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    a = parse_args(argv)
    return run_main(lambda: serve(model_source(a), a.host, a.port, a.model_id, a.context_length, a.max_queue))


if __name__ == "__main__":
    sys.exit(main())
