"""An OpenAI-compatible HTTP API over serving engines; ``guest.serving.server`` runs it in the resident server.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (the
tokenizer's chat template), both with ``stream: true`` as server-sent events, and ``GET /metrics`` (Prometheus
text). Greedy decoding. Errors are OpenAI-shaped JSON with a clear message: 400 for a bad request (bad JSON, a
prompt longer than the context, a bad ``max_tokens``), 404 for an unknown model or path, 413 for a body over
``MAX_BODY`` (refused from its Content-Length, never read), 429 with ``Retry-After`` when the engine is full. A
client that goes away mid-stream has its request cancelled. The standard library's threading HTTP server: one
thread per connection, the engine does the batching; no web framework is needed in the guest image.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from guest.serving.engine import BadRequest, Engine, Overloaded, Retired, ServingError, Stream

MAX_BODY = 1 << 20  # 1 MiB: far more than any prompt the context can hold


@dataclass
class Model:
    name: str
    engine: Engine
    tokenizer: Any


RATE_WINDOW_S = 10.0  # tokens/s is measured over the last this many seconds


@dataclass
class Metrics:
    requests: int = 0
    refused: int = 0
    tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)
    # (when, how many tokens) for tokens/s over the last RATE_WINDOW_S
    recent: list[tuple[float, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    clock: Callable[[], float] = time.monotonic

    def count_tokens(self, n: int) -> None:
        now = self.clock()
        with self.lock:
            self.tokens += n
            self.recent.append((now, n))
            while self.recent and self.recent[0][0] < now - RATE_WINDOW_S:
                self.recent.pop(0)

    def text(self, models: dict[str, Model]) -> str:
        now = self.clock()
        with self.lock:
            ttft = sorted(self.ttft_s[-1000:])
            rate = sum(n for when, n in self.recent if when >= now - RATE_WINDOW_S) / RATE_WINDOW_S
            lines = [
                "# TYPE hvctl_serve_requests_total counter", f"hvctl_serve_requests_total {self.requests}",
                "# TYPE hvctl_serve_refused_total counter", f"hvctl_serve_refused_total {self.refused}",
                "# TYPE hvctl_serve_generated_tokens_total counter",
                f"hvctl_serve_generated_tokens_total {self.tokens}",
                "# TYPE hvctl_serve_tokens_per_second gauge",
                f"hvctl_serve_tokens_per_second {rate:.3f}",
            ]
        scheduled = {m.name: m.engine.scheduled() for m in models.values()}
        lines.append("# TYPE hvctl_serve_running_sequences gauge")
        lines += [f'hvctl_serve_running_sequences{{model="{m.name}"}} {m.engine.in_flight}' for m in models.values()]
        lines.append("# TYPE hvctl_serve_batch_sequences gauge")
        lines += [f'hvctl_serve_batch_sequences{{model="{name}"}} {s[0]}' for name, s in scheduled.items()]
        lines.append("# TYPE hvctl_serve_queue_depth gauge")
        lines += [f'hvctl_serve_queue_depth{{model="{name}"}} {s[1]}' for name, s in scheduled.items()]
        if ttft:
            lines.append("# TYPE hvctl_serve_time_to_first_token_seconds summary")
            for q in (0.5, 0.99):
                value = ttft[min(len(ttft) - 1, int(q * len(ttft)))]
                lines.append(f'hvctl_serve_time_to_first_token_seconds{{quantile="{q}"}} {value:.6f}')
        return "\n".join(lines) + "\n"


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def make_server(models: dict[str, Model], address: tuple[str, int],
                states: Callable[[], dict[str, str]] | None = None) -> ThreadingHTTPServer:
    """``states``: every model the server was asked for, by name, with its state (loading, ready, failed), for
    /health to say what is still loading and what failed, not only what serves."""
    return _Server(address, models, states)


class _Server(ThreadingHTTPServer):
    # socketserver's default backlog of 5 drops the SYNs of a burst of clients, which then retry a second later:
    # measured as a 1 s time to first token for most of 32 clients arriving at once.
    request_queue_size = 1024
    daemon_threads = True

    def __init__(self, address: tuple[str, int], models: dict[str, Model],
                 states: Callable[[], dict[str, str]] | None) -> None:
        self.models = models  # the caller's own dict: a load or reload changes what this server serves
        self.states = states
        self.metrics = Metrics()
        super().__init__(address, _Handler)

    def health(self) -> dict[str, Any]:
        ready = sorted(self.models)
        if self.states is None:
            return {"status": "ok", "models": ready}
        known = self.states()
        loading = sorted(n for n, state in known.items() if state == "loading")
        failed = sorted(n for n, state in known.items() if state == "failed")
        status = "ok" if ready and not loading else "loading" if loading else "no-model"
        return {"status": status, "models": ready, "loading": loading, "failed": failed}


class _Handler(BaseHTTPRequestHandler):
    """One request of the OpenAI-compatible API, against the models and metrics of its ``_Server``."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # the agent keeps its own log; one line per request would drown it

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        try:
            if self.path == "/health":
                self._json(200, self.server.health())
            elif self.path == "/v1/models":
                self._json(200, {"object": "list", "data": [
                    {"id": name, "object": "model", "owned_by": "hvctl"} for name in sorted(self.server.models)]})
            elif self.path == "/metrics":
                self._send(200, self.server.metrics.text(self.server.models).encode(), "text/plain; version=0.0.4")
            else:
                raise ApiError(404, f"no such path {self.path}")
        except ApiError as exc:
            self._error(exc)

    def do_POST(self) -> None:  # noqa: N802 - the base class's name
        try:
            if self.path not in ("/v1/completions", "/v1/chat/completions"):
                raise ApiError(404, f"no such path {self.path}")
            body = self._body()
            chat = self.path == "/v1/chat/completions"
            max_tokens = body.get("max_tokens", 16)
            if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
                raise ApiError(400, "max_tokens must be an integer")
            model, stream = self._submit(body, chat, max_tokens)
            with self.server.metrics.lock:
                self.server.metrics.requests += 1
            if body.get("stream"):
                self._stream(model, stream, chat)
            else:
                try:
                    self._complete(model, stream, chat)
                except ServingError as exc:  # the engine failed the request (or stopped under it)
                    raise ApiError(500, exc.message) from None
        except ApiError as exc:
            self._error(exc)

    def _submit(self, body: dict[str, Any], chat: bool, max_tokens: int) -> tuple[Model, Stream]:
        """Look the model up and admit the request to its engine. A reload may retire the engine between the
        two: then the lookup is done again and the new weights take the request, so none fails."""
        while True:
            model = self.server.models.get(str(body.get("model", "")))
            if model is None:
                raise ApiError(404, f"no model {body.get('model')!r}; loaded: {', '.join(sorted(self.server.models))}")
            prompt_ids = _chat_ids(model, body) if chat else _prompt_ids(model, body)
            try:
                return model, model.engine.submit(prompt_ids, max_tokens)
            except Retired:
                continue
            except Overloaded as exc:
                with self.server.metrics.lock:
                    self.server.metrics.refused += 1
                raise ApiError(429, exc.message, {"Retry-After": str(exc.retry_after_s)}) from None
            except BadRequest as exc:
                raise ApiError(400, exc.message) from None

    # -- bodies ----------------------------------------------------------------------------------------

    def _body(self) -> dict[str, Any]:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ApiError(411, "a request body needs a Content-Length")
        if int(length) > MAX_BODY:
            self.close_connection = True  # the body is never read: the connection cannot be reused
            raise ApiError(413, f"the body is {int(length)} bytes; at most {MAX_BODY} are accepted")
        try:
            body = json.loads(self.rfile.read(int(length)))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def _complete(self, model: Model, stream: Stream, chat: bool) -> None:
        started = time.monotonic()
        tokens: list[int] = []
        for token in stream:
            if not tokens:
                _first_token(self.server.metrics, started)
            tokens.append(token)
        self.server.metrics.count_tokens(len(tokens))
        text = model.tokenizer.decode(tokens, skip_special_tokens=True)
        finish = "length" if len(tokens) >= stream.max_tokens else "stop"
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "token_ids": tokens}
        choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        self._json(200, {"id": f"cmpl-{uuid.uuid4().hex[:16]}",
                         "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                         "model": model.name, "choices": [choice],
                         "usage": {"prompt_tokens": len(stream.prompt_ids), "completion_tokens": len(tokens),
                                   "total_tokens": len(stream.prompt_ids) + len(tokens)}})

    def _stream(self, model: Model, stream: Stream, chat: bool) -> None:
        """Server-sent events, one per token's text; a client that goes away cancels the request."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        ident, created = f"cmpl-{uuid.uuid4().hex[:16]}", int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"
        started = time.monotonic()
        try:
            for n, delta in enumerate(_text_deltas(model.tokenizer, stream)):
                if n == 0:
                    _first_token(self.server.metrics, started)
                piece = {"delta": {"content": delta}} if chat else {"text": delta}
                self._event({"id": ident, "object": kind, "created": created, "model": model.name,
                             "choices": [{"index": 0, "finish_reason": None, **piece}]})
            finish = "length" if len(stream.tokens) >= stream.max_tokens else "stop"
            end: dict[str, Any] = {"delta": {}} if chat else {"text": ""}
            self._event({"id": ident, "object": kind, "created": created, "model": model.name,
                         "choices": [{"index": 0, "finish_reason": finish, **end}]})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            stream.close()  # the client went away: its sequence is freed at the next step
        except ServingError as exc:  # the engine failed the request mid-stream: say so, then end the stream
            self._event({"error": {"message": exc.message, "type": "server_error", "code": 500}})
        finally:
            self.server.metrics.count_tokens(len(stream.tokens))

    # -- responses -------------------------------------------------------------------------------------

    def _event(self, data: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")
        self.wfile.flush()

    def _json(self, status: int, data: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), "application/json", headers)

    def _send(self, status: int, payload: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(payload)

    def _error(self, exc: ApiError) -> None:
        kind = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
                429: "rate_limit_error"}.get(exc.status, "server_error")
        self._json(exc.status, {"error": {"message": exc.message, "type": kind, "code": exc.status}},
                   exc.headers)


def _first_token(metrics: Metrics, started: float) -> None:
    with metrics.lock:
        metrics.ttft_s.append(time.monotonic() - started)


def _prompt_ids(model: Model, body: dict[str, Any]) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return list(model.tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    raise ApiError(400, "prompt must be a string or a non-empty list of token ids (one prompt per request)")


def _chat_ids(model: Model, body: dict[str, Any]) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects with string values")
    if not getattr(model.tokenizer, "chat_template", None):
        raise ApiError(400, f"model {model.name} has no chat template; use /v1/completions")
    ids = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def _text_deltas(tokenizer: Any, stream: Stream) -> Iterator[str]:
    """The text each new batch of tokens adds. Decoding is incremental, over a window that starts one emission
    back (as vLLM's detokenizer does), so a long completion costs the same per token as a short one, and
    characters that span tokens stay whole: a window that ends in half a character sends nothing yet."""
    ids: list[int] = []
    prefix = read = 0  # ids[prefix:read] is text already sent; decoding from prefix keeps the joins right
    for batch in stream.batches():
        ids.extend(batch)
        before = tokenizer.decode(ids[prefix:read], skip_special_tokens=True)
        text = tokenizer.decode(ids[prefix:], skip_special_tokens=True)
        if text.endswith("\ufffd") or len(text) <= len(before):
            continue  # half a character, or nothing printable yet: wait for more
        yield text[len(before):]
        prefix, read = read, len(ids)
    before = tokenizer.decode(ids[prefix:read], skip_special_tokens=True)
    text = tokenizer.decode(ids[prefix:], skip_special_tokens=True)
    if len(text) > len(before):
        yield text[len(before):]  # the completion ended inside a character: send what it decodes to, as the
        # non-streamed answer does


def serve_forever(models: dict[str, Model], host: str, port: int) -> None:
    """Run the API until the process is stopped; the engines are stopped on the way out."""
    server = make_server(models, (host, port))
    try:
        server.serve_forever()
    finally:
        server.server_close()
        for model in models.values():
            model.engine.stop()


__all__ = ["MAX_BODY", "Model", "ServingError", "make_server", "serve_forever"]
