"""The OpenAI-compatible API (guest/serving/api.py) on the host, over real HTTP to a real server thread, with a
tiny seeded Llama and its tokenizer: completions and chat (streamed as server-sent events and not) give the
engine's greedy tokens; every bad request gets its status and a clear message, and the server stays up."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from guest.serving.api import MAX_BODY, Model, make_server
from guest.serving.engine import Engine
from guest.workloads.assets import make_tiny_llm


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    torch.set_num_threads(1)
    directory = make_tiny_llm(Path(tmp_path_factory.mktemp("tiny")) / "llm")
    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert tokenizer.chat_template  # make_tiny_llm gives it one, as a real model's tokenizer has
    engine = Engine(model, max_queue=8).start()
    server = make_server({"tiny": Model("tiny", engine, tokenizer)}, ("127.0.0.1", 0))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"port": server.server_address[1], "model": model, "tokenizer": tokenizer, "engine": engine}
    server.shutdown()
    server.server_close()
    engine.stop()


def request(port: int, method: str, path: str, body: Any = None, raw: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    payload = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=payload, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, dict(response.getheaders()), data


def greedy(model: Any, ids: list[int], new: int) -> list[int]:
    config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
    with torch.inference_mode():
        return model.generate(torch.tensor([ids]), generation_config=config)[0, len(ids):].tolist()


def events(data: bytes) -> list[Any]:
    lines = [line.removeprefix("data: ") for line in data.decode().split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_completions_plain_and_streamed_give_the_greedy_tokens(served: dict[str, Any]) -> None:
    port, tok = served["port"], served["tokenizer"]
    status, _, data = request(port, "POST", "/v1/completions",
                              {"model": "tiny", "prompt": "The river runs", "max_tokens": 6})
    assert status == 200, data
    body = json.loads(data)
    ids = tok("The river runs")["input_ids"]
    expected = greedy(served["model"], ids, 6)
    (choice,) = body["choices"]
    assert choice["token_ids"] == expected and choice["finish_reason"] == "length"
    assert choice["text"] == tok.decode(expected, skip_special_tokens=True)
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 6, "total_tokens": len(ids) + 6}
    status, headers, data = request(port, "POST", "/v1/completions",
                                    {"model": "tiny", "prompt": "The river runs", "max_tokens": 6, "stream": True})
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    chunks = events(data)
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_completions_use_the_tokenizers_template_streamed_or_not(served: dict[str, Any]) -> None:
    port, tok = served["port"], served["tokenizer"]
    messages = [{"role": "user", "content": "hello there"}]
    status, _, data = request(port, "POST", "/v1/chat/completions",
                              {"model": "tiny", "messages": messages, "max_tokens": 5})
    assert status == 200, data
    (choice,) = json.loads(data)["choices"]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert choice["token_ids"] == greedy(served["model"], ids, 5)
    assert choice["message"]["role"] == "assistant"
    status, _, data = request(port, "POST", "/v1/chat/completions",
                              {"model": "tiny", "messages": messages, "max_tokens": 5, "stream": True})
    chunks = events(data)
    assert status == 200 and chunks[0]["object"] == "chat.completion.chunk"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == choice["message"]["content"]


def test_bad_requests_get_their_status_and_the_server_stays_up(served: dict[str, Any]) -> None:
    port = served["port"]
    cases = [
        (dict(body={"model": "nope", "prompt": "x"}), 404, "no model 'nope'"),
        (dict(raw=b"{not json"), 400, "not JSON"),
        (dict(body=["a list"]), 400, "must be a JSON object"),
        (dict(body={"model": "tiny", "prompt": "x " * 300, "max_tokens": 8}), 400, "exceed the model's context"),
        (dict(body={"model": "tiny", "prompt": "x", "max_tokens": 0}), 400, "max_tokens must be at least 1"),
        (dict(body={"model": "tiny", "prompt": "x", "max_tokens": "many"}), 400, "max_tokens must be an integer"),
        (dict(body={"model": "tiny", "messages": []}, path="/v1/chat/completions"), 400, "messages must be"),
        (dict(raw=b"{}", headers={"Content-Length": str(500 * 2**20)}), 413, f"at most {MAX_BODY}"),
    ]
    for kwargs, status, why in cases:
        path = kwargs.pop("path", "/v1/completions")
        got, _, data = request(port, "POST", path, **kwargs)  # type: ignore[arg-type]
        assert got == status and why in json.loads(data)["error"]["message"], (status, data)
    assert request(port, "GET", "/nowhere")[0] == 404
    status, _, data = request(port, "GET", "/health")
    assert status == 200 and json.loads(data) == {"status": "ok", "models": ["tiny"]}
    assert json.loads(request(port, "GET", "/v1/models")[2])["data"][0]["id"] == "tiny"
    metrics = request(port, "GET", "/metrics")[2].decode()
    assert 'hvctl_serve_running_sequences{model="tiny"} 0' in metrics
    assert "hvctl_serve_generated_tokens_total" in metrics
    assert 'hvctl_serve_queue_depth{model="tiny"} 0' in metrics and "hvctl_serve_tokens_per_second " in metrics


def test_a_full_engine_answers_429_with_retry_after(served: dict[str, Any]) -> None:
    """A one-slot server whose engine has not started decoding holds a request directly submitted, so the HTTP
    request finds no room whatever the machine's speed; once the slot is free it is served."""
    engine = Engine(served["model"], max_queue=1)
    server = make_server({"tiny": Model("tiny", engine, served["tokenizer"])}, ("127.0.0.1", 0))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        held = engine.submit([5, 6, 7], 4)
        status, headers, data = request(port, "POST", "/v1/completions",
                                        {"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert status == 429 and headers["Retry-After"] == "1"
        assert "1 requests in flight" in json.loads(data)["error"]["message"]
        assert "hvctl_serve_refused_total 1" in request(port, "GET", "/metrics")[2].decode()
        engine.start()
        assert held.result() == greedy(served["model"], [5, 6, 7], 4)
        status, _, _ = request(port, "POST", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert status == 200
    finally:
        server.shutdown()
        server.server_close()
        engine.stop()


def test_a_client_that_goes_away_mid_stream_has_its_request_cancelled(served: dict[str, Any]) -> None:
    """The client resets its connection once the stream's headers came and before any token was made (the engine
    starts decoding only then), so the server finds out at its first writes, whatever the machine's speed: the
    request is cancelled after a token or two of its 240, and its slot is free."""
    import re
    import socket
    import time

    engine = Engine(served["model"], max_queue=2)
    cancelled: list[str] = []
    cancel = engine._cancel  # noqa: SLF001 - counted, so that a request that merely ran out cannot pass
    engine._cancel = lambda stream: (cancelled.append(stream.request_id), cancel(stream))[1]  # type: ignore[method-assign]
    server = make_server({"tiny": Model("tiny", engine, served["tokenizer"])}, ("127.0.0.1", 0))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    body = json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 240, "stream": True}).encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as client:
            client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            seen = b""
            while b"\r\n\r\n" not in seen:  # the response has begun: the request is in the engine
                chunk = client.recv(65536)
                assert chunk, seen
                seen += chunk
            assert b"text/event-stream" in seen and engine.in_flight == 1
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
        engine.start()
        deadline = time.monotonic() + 60  # a hang guard
        while engine.in_flight:
            assert time.monotonic() < deadline, "the abandoned request was never cancelled"
            time.sleep(0.05)
        metrics = request(port, "GET", "/metrics")[2].decode()
        sent = int(re.search(r"hvctl_serve_generated_tokens_total (\d+)", metrics).group(1))  # type: ignore[union-attr]
        assert cancelled == ["r0"] and 1 <= sent < 240, (cancelled, metrics)  # cut short by the cancel
        assert request(port, "POST", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2})[0] == 200
    finally:
        server.shutdown()
        server.server_close()
        engine.stop()


def test_tokens_per_second_is_over_the_last_ten_seconds() -> None:
    from guest.serving.api import Metrics

    now = [100.0]
    metrics = Metrics(clock=lambda: now[0])
    metrics.count_tokens(50)
    now[0] = 105.0
    metrics.count_tokens(30)
    now[0] = 106.0
    assert "hvctl_serve_tokens_per_second 8.000" in metrics.text({})
    now[0] = 112.0  # the first 50 are out of the window
    assert "hvctl_serve_tokens_per_second 3.000" in metrics.text({})
    assert "hvctl_serve_generated_tokens_total 80" in metrics.text({})
