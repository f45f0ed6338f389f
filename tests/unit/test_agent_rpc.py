"""The agent over a real unix socket, served by the real `hvctl-agent serve` process: schema checks on both sides,
and an agent that keeps serving after malformed, oversized, unauthorised and unknown messages."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest import rpc
from guest.agent import Agent, read_lines
from hvctl.agent_client import AgentClient, AgentError

TOKEN = "s3cret-token"


@pytest.fixture
def agent_socket(tmp_path: Path) -> Iterator[Path]:
    sock = Path("/tmp") / f"hvctl-agent-test-{time.time_ns()}.sock"
    (tmp_path / "token").write_text(TOKEN + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "guest.agent", "serve", "--socket", str(sock),
                             "--token-file", str(tmp_path / "token"), "--workdir", str(tmp_path / "work")])
    deadline = time.monotonic() + 20  # a hang guard; readiness is the agent accepting a connection
    while time.monotonic() < deadline:
        # The socket file appears at bind(), a moment before listen(): until then a connect is refused.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(sock))
                break
            except OSError:
                time.sleep(0.05)
    yield sock
    proc.terminate()
    proc.wait(timeout=10)
    sock.unlink(missing_ok=True)


def raw_exchange(sock_path: Path, payload: bytes) -> list[dict[str, object]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock_path))
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def test_ping_info_exec_roundtrip(agent_socket: Path) -> None:
    client = AgentClient.over_socket(agent_socket, TOKEN)
    pong = client.typed("ping", rpc.PingResult)
    assert pong.pong and pong.agent_version
    info = client.typed("info", rpc.InfoResult)
    assert info.cpus >= 1 and info.memory_mib > 0 and info.python.startswith("3.")
    assert "pydantic" in info.packages
    result = client.typed("exec", rpc.ExecResult, rpc.ExecParams(argv=["sh", "-c", "echo out; echo err >&2; exit 3"]))
    assert (result.exit_code, result.stdout, result.stderr, result.timed_out) == (3, "out\n", "err\n", False)
    slow = client.typed("exec", rpc.ExecResult, rpc.ExecParams(argv=["sleep", "30"], timeout_s=0.5))
    assert slow.timed_out and slow.duration_s < 10


def test_bad_messages_get_error_replies_and_the_agent_keeps_serving(agent_socket: Path) -> None:
    good = rpc.Request(v=1, id=7, token=TOKEN, method="ping").model_dump_json().encode()
    payload = b"\n".join([
        b"this is not json",
        b"[1, 2, 3]",
        json.dumps({"v": 1, "id": 1, "token": "wrong", "method": "ping"}).encode(),
        json.dumps({"v": 1, "id": 2, "method": "ping"}).encode(),
        json.dumps({"v": 9, "id": 3, "token": TOKEN, "method": "ping"}).encode(),
        json.dumps({"v": 1, "id": 4, "token": TOKEN, "method": "format-disk"}).encode(),
        json.dumps({"v": 1, "id": 5, "token": TOKEN, "method": "exec", "params": {"argv": []}}).encode(),
        json.dumps({"v": 1, "id": 6, "token": TOKEN, "method": "exec", "params": {"argv": ["true"], "x": 1}}).encode(),
        b'{"v": 1, "id": 99, "padding": "' + b"A" * (rpc.MAX_MESSAGE_BYTES + 10) + b'"}',
        good,
    ]) + b"\n"
    replies = raw_exchange(agent_socket, payload)
    codes = [(r["id"], r["error"]["code"] if not r["ok"] else "ok") for r in replies]  # type: ignore[index]
    assert codes == [
        (None, "malformed"), (None, "malformed"), (1, "unauthorized"), (2, "malformed"),
        (3, "unsupported-version"), (4, "unknown-method"), (5, "bad-params"), (6, "bad-params"),
        (None, "too-large"), (7, "ok"),
    ]
    # Still serving a fresh connection after all that.
    assert AgentClient.over_socket(agent_socket, TOKEN).typed("ping", rpc.PingResult).pong


def test_wrong_token_is_refused_by_the_client_too(agent_socket: Path) -> None:
    with pytest.raises(AgentError, match="bad or missing agent token"):
        AgentClient.over_socket(agent_socket, "guess").call("ping")
    with pytest.raises(AgentError, match="bad or missing agent token"):
        AgentClient.over_socket(agent_socket, "guess").wait_ready(timeout=5)


def test_client_discards_stale_replies_and_partial_lines(agent_socket: Path) -> None:
    # A client that died mid-line: the agent must not glue its half request onto the next client's request.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(agent_socket))
        s.sendall(b'{"v": 1, "id": 5, "tok')
    assert AgentClient.over_socket(agent_socket, TOKEN).typed("ping", rpc.PingResult).pong


def test_client_validates_params_before_sending(agent_socket: Path) -> None:
    with pytest.raises(AgentError, match="unknown agent method"):
        AgentClient.over_socket(agent_socket, TOKEN).call("reboot-host")
    with pytest.raises(Exception, match="argv"):
        AgentClient.over_socket(agent_socket, TOKEN).call("exec", rpc.ExecParams(argv=[]))


def test_missing_socket_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match="cannot connect to the agent channel"):
        AgentClient.over_socket(tmp_path / "none.sock", TOKEN).call("ping")


def test_workload_dispatch_runs_in_a_child_and_survives_its_crash(tmp_path: Path) -> None:
    """The dispatch table the workloads issue fills, exercised with stand-in commands defined here."""
    script = "import json,sys,time; print('step 1', flush=True); time.sleep(0.2); print(json.dumps({'loss': 1.5}))"
    agent = Agent(token=TOKEN, workdir=tmp_path, workloads={
        "ok": lambda args: [sys.executable, "-c", script],
        "crash": lambda args: [sys.executable, "-c", "import os; print('dying', flush=True); os.abort()"],
        "forever": lambda args: [sys.executable, "-c", "import time; time.sleep(600)"],
    })

    def call(method: str, **params: object) -> dict[str, object]:
        reply = agent.handle_line(json.dumps({"v": 1, "id": 1, "token": TOKEN, "method": method,
                                              "params": params}).encode())
        assert reply.ok, reply.error
        assert reply.result is not None
        return reply.result

    def wait(wid: str) -> dict[str, object]:
        for _ in range(200):
            status = call("workload.status", id=wid)
            if status["state"] != "running":
                return status
            time.sleep(0.05)
        raise AssertionError("workload did not finish")

    ok = wait(str(call("workload.start", kind="ok")["id"]))
    assert ok["state"] == "succeeded" and ok["result"] == {"loss": 1.5}
    assert "step 1" in str(call("workload.logs", id=ok["id"])["data"])
    crashed = wait(str(call("workload.start", kind="crash")["id"]))
    assert crashed["state"] == "failed" and crashed["exit_code"] != 0
    forever = call("workload.start", kind="forever")
    cancelled = call("workload.cancel", id=forever["id"])
    assert cancelled["state"] == "cancelled"
    unknown = agent.handle_line(json.dumps({"v": 1, "id": 2, "token": TOKEN, "method": "workload.start",
                                            "params": {"kind": "mine-bitcoin"}}).encode())
    assert not unknown.ok and unknown.error is not None and "unknown workload kind" in unknown.error.message
    assert call("ping")["pong"] is True


def test_line_splitter_bounds_memory() -> None:
    chunks = [b"a" * 70000] * 20 + [b"\nok\n"]
    it = iter(chunks)
    lines = list(read_lines(lambda n: next(it, b"")))
    assert len(lines[0]) == rpc.MAX_MESSAGE_BYTES + 1 and lines[1:] == [b"ok"]


def test_token_rotation_switches_the_running_agent_and_its_token_file(agent_socket: Path, tmp_path: Path) -> None:
    new = "n" * 43
    old_client = AgentClient.over_socket(agent_socket, TOKEN)
    new_client = AgentClient.over_socket(agent_socket, new)
    with pytest.raises(AgentError, match="bad or missing agent token"):
        new_client.call("ping")
    assert old_client.typed("token.rotate", rpc.TokenRotated, rpc.TokenRotateParams(token=new)).rotated
    assert new_client.typed("ping", rpc.PingResult).pong
    with pytest.raises(AgentError, match="bad or missing agent token"):
        old_client.call("ping")
    assert (tmp_path / "token").read_text() == new + "\n"
    assert (tmp_path / "token").stat().st_mode & 0o777 == 0o600
    with pytest.raises(Exception, match="token"):
        new_client.call("token.rotate", rpc.TokenRotateParams(token="short"))
