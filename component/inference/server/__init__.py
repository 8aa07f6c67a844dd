"""An OpenAI-compatible HTTP server for a trained model (script/serve.py).

Endpoints: `POST /v1/chat/completions` (plain JSON, or server-sent events with
`"stream": true`, ending with `data: [DONE]`), `GET /v1/models`, and
`GET /health` (counters). Any OpenAI client works against
`http://HOST:PORT/v1`; the API key is not checked.

- `schema`: the request fields we honour, and errors as OpenAI gives them.
- `service`: the model, request checks and limits, one generation at a time.
- `app`: the routes, streaming and disconnects, and `serve` (uvicorn).
"""
