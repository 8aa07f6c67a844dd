"""An OpenAI-compatible HTTP server for a trained model (script/serve.py).

Endpoints: `POST /v1/chat/completions` (plain JSON, or server-sent events with
`"stream": true`, ending with `data: [DONE]`), `GET /v1/models`,
`GET /v1/models/NAME`, and `GET /health` (counters). Any OpenAI client works
against `http://HOST:PORT/v1`; with an API key set, every request but /health
must carry `Authorization: Bearer KEY`.

- `schema`: the request fields we honour or refuse, and errors as OpenAI gives them.
- `service`: the model, request checks and limits, and the scheduler that
  generates waiting requests together in batches (429 beyond its queue).
- `app`: the routes, streaming and disconnects, the API key, the body limit,
  the access log, and `serve` (uvicorn).
"""
