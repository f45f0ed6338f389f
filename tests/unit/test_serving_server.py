"""The resident model server as the agent runs it, on the host: the real `hvctl-agent serve` process over its unix
socket starts the real server process (``python -m guest.serving``), which outlives an agent restart; `generate`
goes agent → server over HTTP; a reload switches the weights under load with no request failed; refusals (memory,
bad directories, names, ports) leave nothing running. Tiny seeded Llamas: each model's greedy tokens are known."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from guest import rpc
from guest.serving import memory
from guest.serving.control import ServeControl, ServeRefused
from guest.serving.server import Registry
from guest.workloads.assets import make_tiny_llm
from hvctl.agent_client import AgentClient, AgentError

TOKEN = "s3cret-token"
PROMPT = "The river runs"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two tiny models that differ only in their seeded weights, and each one's greedy answer to PROMPT."""
    torch.set_num_threads(1)
    root = Path(tmp_path_factory.mktemp("models"))
    found: dict[str, Any] = {}
    for name, seed in (("a", 0), ("b", 1)):
        directory = make_tiny_llm(root / name, seed=seed)
        model = AutoModelForCausalLM.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        ids = tokenizer(PROMPT)["input_ids"]
        config = GenerationConfig(max_new_tokens=8, min_new_tokens=8, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)
        with torch.inference_mode():
            answer = model.generate(torch.tensor([ids]), generation_config=config)[0, len(ids):].tolist()
        found[name] = {"dir": str(directory), "greedy": answer}
    assert found["a"]["greedy"] != found["b"]["greedy"]  # otherwise a reload could not be told from none
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class AgentProcess:
    def __init__(self, workdir: Path, token_file: Path) -> None:
        self.sock = Path("/tmp") / f"hvctl-serve-test-{time.time_ns()}.sock"
        self.proc = subprocess.Popen([sys.executable, "-m", "guest.agent", "serve", "--socket", str(self.sock),
                                      "--token-file", str(token_file), "--workdir", str(workdir)])
        deadline = time.monotonic() + 20  # a hang guard; readiness is the agent accepting a connection
        while time.monotonic() < deadline:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(self.sock))
                    break
                except OSError:
                    time.sleep(0.05)
        self.client = AgentClient.over_socket(self.sock, TOKEN, timeout=120)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.sock.unlink(missing_ok=True)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Callable[[], AgentProcess]]:
    """Starts agents on one workdir (a restart is a second call); whatever server they started is stopped."""
    (tmp_path / "token").write_text(TOKEN + "\n")
    started: list[AgentProcess] = []

    def start() -> AgentProcess:
        started.append(AgentProcess(tmp_path / "work", tmp_path / "token"))
        return started[-1]

    yield start
    ServeControl(tmp_path / "work" / "serve").stop()  # by its recorded pid, as the agent would
    for one in started:
        if one.proc.poll() is None:
            one.kill()


def wait_ready(client: AgentClient, name: str, version: int = 1) -> rpc.ServeStatus:
    deadline = time.monotonic() + 180  # a hang guard: importing torch and loading take seconds here
    while True:
        status = client.typed("serve.status", rpc.ServeStatus)
        served = {m.name: m for m in status.models}
        if name in served and served[name].state == "ready" and served[name].version >= version:
            return status
        assert status.state in ("starting", "running"), status
        assert name not in served or served[name].state != "failed", served[name]
        assert time.monotonic() < deadline, status
        time.sleep(0.2)


def start(client: AgentClient, models: dict[str, Any], port: int, *which: str, **kw: Any) -> rpc.ServeStatus:
    params = rpc.ServeStartParams(models=[rpc.ServedModel(name=w, dir=models[w]["dir"]) for w in which], port=port,
                                  **kw)
    return client.typed("serve.start", rpc.ServeStatus, params)


def generate(client: AgentClient, model: str, max_tokens: int = 8) -> rpc.ServeGenerated:
    return client.typed("serve.generate", rpc.ServeGenerated,
                        rpc.ServeGenerateParams(model=model, prompt=PROMPT, max_tokens=max_tokens))


def completion(port: int, model: str) -> list[int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/completions", body=json.dumps({"model": model, "prompt": PROMPT, "max_tokens": 8}),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    body = json.loads(response.read())
    conn.close()
    assert response.status == 200, body
    return list(body["choices"][0]["token_ids"])


def test_the_agent_starts_a_server_that_outlives_it_and_generate_goes_through_it(
        agent: Callable[[], AgentProcess], models: dict[str, Any]) -> None:
    first = agent()
    port = free_port()
    began = start(first.client, models, port, "a", max_seqs=4, max_tokens=64)
    assert began.state in ("starting", "running") and began.port == port
    status = wait_ready(first.client, "a")
    (served,) = status.models
    assert served.context == 64 and served.footprint_mib >= 1 and status.memory_total_mib > 0
    answer = generate(first.client, "a")
    assert answer.token_ids == models["a"]["greedy"] and answer.finish_reason == "length"
    assert completion(port, "a") == models["a"]["greedy"]  # the same server, over its own API

    first.kill()  # the agent dies (or is upgraded) ...
    second = agent()  # ... and the one started in its place finds the server still serving
    again = second.client.typed("serve.status", rpc.ServeStatus)
    assert again.state == "running" and again.pid == status.pid and again.models[0].state == "ready"
    assert generate(second.client, "a").token_ids == models["a"]["greedy"]

    stopped = second.client.typed("serve.stop", rpc.ServeStatus)
    assert stopped.state == "stopped"
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    with pytest.raises(AgentError, match="no model server is running"):
        generate(second.client, "a")


def test_reload_switches_the_weights_and_a_second_model_loads_beside(agent: Callable[[], AgentProcess],
                                                                     models: dict[str, Any]) -> None:
    client = agent().client
    port = free_port()
    start(client, models, port, "a", max_seqs=4, max_tokens=64)
    wait_ready(client, "a")
    with pytest.raises(AgentError, match="already ready; reload swaps"):
        client.typed("serve.load", rpc.ServeStatus, rpc.ServedModel(name="a", dir=models["b"]["dir"]))
    with pytest.raises(AgentError, match="no model ghost is being served"):
        client.typed("serve.reload", rpc.ServeStatus, rpc.ServedModel(name="ghost", dir=models["b"]["dir"]))
    client.typed("serve.reload", rpc.ServeStatus, rpc.ServedModel(name="a", dir=models["b"]["dir"]))
    status = wait_ready(client, "a", version=2)
    assert status.models[0].dir == models["b"]["dir"]
    assert generate(client, "a").token_ids == models["b"]["greedy"]  # the same name, the new weights

    client.typed("serve.load", rpc.ServeStatus, rpc.ServedModel(name="second", dir=models["a"]["dir"]))
    wait_ready(client, "second")
    assert generate(client, "second").token_ids == models["a"]["greedy"]
    assert generate(client, "a").token_ids == models["b"]["greedy"]
    client.typed("serve.unload", rpc.ServeStatus, rpc.ServeModelRef(name="second"))
    with pytest.raises(AgentError, match="no model 'second'"):
        generate(client, "second")


def test_bad_starts_are_refused_and_leave_no_server(agent: Callable[[], AgentProcess], models: dict[str, Any],
                                                    tmp_path: Path) -> None:
    process = agent()
    client = process.client
    port = free_port()
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (rpc.ServeStartParams(models=[rpc.ServedModel(name="x", dir=str(empty))], port=port), "has no config.json"),
        (rpc.ServeStartParams(models=[rpc.ServedModel(name="x", dir="/nonexistent")], port=port),
         "no model directory /nonexistent"),
        (rpc.ServeStartParams(models=[rpc.ServedModel(name="x", dir=models["a"]["dir"]),
                                      rpc.ServedModel(name="x", dir=models["b"]["dir"])], port=port),
         "model names repeat"),
    ]
    for params, message in cases:
        with pytest.raises(AgentError, match=message):
            client.typed("serve.start", rpc.ServeStatus, params)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        with pytest.raises(AgentError, match=f"port {port} in the guest is taken"):
            start(client, models, port, "a")
    assert client.typed("serve.status", rpc.ServeStatus).state == "stopped"
    # A name or directory the schema refuses, sent raw (the controller's client would not send it at all).
    line = json.dumps({"v": 1, "id": 1, "token": TOKEN, "method": "serve.start",
                       "params": {"models": [{"name": "../x", "dir": "relative"}], "port": port}}).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.settimeout(30)
        raw.connect(str(process.sock))
        raw.sendall(line + b"\n")
        reply = json.loads(raw.makefile("rb").readline())
    assert not reply["ok"] and reply["error"]["code"] == "bad-params", reply
    assert client.typed("serve.status", rpc.ServeStatus).state == "stopped"


def test_a_model_that_would_not_fit_is_refused_with_the_numbers(models: dict[str, Any], tmp_path: Path) -> None:
    """The VM's memory as the agent reads it, from a meminfo file written here (a fake: this machine's own is too
    large to run out of with a tiny model); the check itself is the one the agent runs."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:         524288 kB\nMemFree:          100000 kB\nMemAvailable:     460800 kB\n")
    control = ServeControl(tmp_path / "serve", meminfo=meminfo)
    params = rpc.ServeStartParams(models=[rpc.ServedModel(name="a", dir=models["a"]["dir"])], port=free_port(),
                                  max_seqs=1024, max_tokens=256)
    needed = memory.footprint(Path(models["a"]["dir"]), 1024, 256)
    with pytest.raises(ServeRefused) as refused:
        control.start(params)
    message = refused.value.message
    assert f"needs {needed.describe()} + the server's runtime {memory.RUNTIME_MIB} MiB" in message, message
    assert "the VM has 450 MiB available of 512 MiB" in message and "lower --max-seqs or --max-tokens" in message
    assert control.status().state == "stopped" and not (tmp_path / "serve").exists()
    # The same model with a smaller cache fits.
    small = memory.footprint(Path(models["a"]["dir"]), 4, 64)
    memory.check_fits("a", small, runtime=True, meminfo=meminfo)


def test_a_reload_under_load_fails_no_request_and_switches_exactly_at_the_swap(models: dict[str, Any]) -> None:
    """In-process (the registry the server process runs): requests admitted before the switch finish on the old
    weights, every request admitted after it gets the new ones, and none fails."""
    from guest.serving.api import make_server

    registry = Registry(max_seqs=32, max_tokens=64)
    server = make_server(registry.models, ("127.0.0.1", 0))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        registry.load("m", models["a"]["dir"])
        while not registry.models:
            time.sleep(0.05)
        results: list[tuple[float, float, list[int]]] = []
        failures: list[BaseException] = []
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                began = time.monotonic()
                try:
                    tokens = completion(port, "m")
                except BaseException as exc:  # noqa: BLE001 - counted, and the test fails on any
                    failures.append(exc)
                    return
                results.append((began, time.monotonic(), tokens))

        clients = [threading.Thread(target=client) for _ in range(6)]
        for thread in clients:
            thread.start()
        while len(results) < 6:
            time.sleep(0.05)
        before_reload = time.monotonic()
        registry.load("m", models["b"]["dir"], replace=True)
        while registry.entries["m"].version < 2:
            time.sleep(0.01)
        switched = time.monotonic()
        while sum(began > switched for began, _, _ in results) < 6:
            time.sleep(0.05)
        stop.set()
        for thread in clients:
            thread.join(120)
    finally:
        server.shutdown()
        server.server_close()
        registry.stop()
    assert failures == []
    old, new = models["a"]["greedy"], models["b"]["greedy"]
    assert all(tokens in (old, new) for _, _, tokens in results)
    assert all(tokens == old for _, ended, tokens in results if ended < before_reload)
    assert all(tokens == new for began, _, tokens in results if began > switched)
    assert any(tokens == old for _, _, tokens in results) and any(tokens == new for _, _, tokens in results)


def test_health_says_what_is_still_loading_and_what_failed(models: dict[str, Any], tmp_path: Path) -> None:
    from guest.serving.api import make_server

    registry = Registry(max_seqs=4, max_tokens=64)
    server = make_server(registry.models, ("127.0.0.1", 0), registry.states)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]

    def health() -> dict[str, Any]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", "/health")
        response = connection.getresponse()
        assert response.status == 200
        data: dict[str, Any] = json.loads(response.read())
        connection.close()
        return data

    try:
        assert health() == {"status": "no-model", "models": [], "loading": [], "failed": []}
        # A directory that passes the up-front checks (config, weights' size) and fails to load: its weights are junk.
        import shutil

        broken = tmp_path / "broken"
        shutil.copytree(models["a"]["dir"], broken)
        for weights in broken.glob("*.safetensors"):
            weights.write_bytes(b"\0" * weights.stat().st_size)
        registry.load("broken", str(broken))
        registry.load("m", models["a"]["dir"])
        deadline = time.monotonic() + 120
        while registry.states() != {"broken": "failed", "m": "ready"} and time.monotonic() < deadline:
            # Until both settle, /health names each one as loading, or as what it became.
            seen = health()
            assert set(seen["loading"]) | set(seen["failed"]) | set(seen["models"]) == {"broken", "m"}
            time.sleep(0.05)
        assert health() == {"status": "ok", "models": ["m"], "loading": [], "failed": ["broken"]}
    finally:
        server.shutdown()
        server.server_close()
        registry.stop()
