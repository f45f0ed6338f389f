"""A hostile guest against the controller's agent client: a stand-in agent on a real unix socket that floods,
trickles, stalls, resets, sends garbage and a 100 MB line, and quotes markup and terminal escapes. The controller
must return one clean ``AgentError`` within the call's own deadline, with bounded memory, however the guest behaves.

No assertion here measures speed: a stand-in that never stops on its own proves that the client returned because of
its deadline (or its buffer bound), not because the guest went quiet.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import short_tempdir

from guest import rpc
from hvctl.agent_client import AgentClient, AgentError
from hvctl.cli.common import fail

TOKEN = "t0ken"
# The stand-in gives up after this long, so a broken client fails its test instead of hanging the suite.
GIVE_UP_S = 60.0

Behaviour = Callable[[socket.socket, int], None]


class HostileAgent:
    def __init__(self, path: Path, behaviour: Behaviour, read_request: bool = True) -> None:
        self.path = path
        self.read_request = read_request
        self.behaviour = behaviour
        self.sent = 0
        self.still_sending_when_client_left = False
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            conn.settimeout(GIVE_UP_S)
            if not self.read_request:
                return
            request_id = _read_request_id(conn)
            try:
                self.behaviour(conn, request_id)
            except (BrokenPipeError, ConnectionResetError):
                # The client hung up while the guest still had more to say: what each test wants to see.
                self.still_sending_when_client_left = True

    def send(self, conn: socket.socket, data: bytes) -> None:
        conn.sendall(data)
        self.sent += len(data)

    def close(self) -> None:
        self.server.close()
        self.thread.join(timeout=GIVE_UP_S + 5)


def _read_request_id(conn: socket.socket) -> int:
    buf = b""
    while True:
        buf += conn.recv(65536)
        for line in buf.split(b"\n"):
            if line.strip():
                try:
                    return int(json.loads(line)["id"])
                except (ValueError, KeyError):
                    continue


def reply(request_id: int, **fields: object) -> bytes:
    body = {"v": rpc.PROTOCOL_VERSION, "id": request_id, "ok": True, "result": {}} | fields
    return json.dumps(body).encode() + b"\n"


@pytest.fixture
def hostile() -> Iterator[Callable[[Behaviour], HostileAgent]]:
    root = short_tempdir("hvc-hostile-")
    agents: list[HostileAgent] = []

    def start(behaviour: Behaviour, read_request: bool = True) -> HostileAgent:
        agent = HostileAgent(root / f"agent{len(agents)}.sock", behaviour, read_request)
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        agent.close()
    for path in root.iterdir():
        path.unlink()
    root.rmdir()


def client(agent: HostileAgent) -> AgentClient:
    return AgentClient.over_socket(agent.path, TOKEN, timeout=0.5)


def test_a_flood_of_other_replies_cannot_stretch_the_deadline(hostile: Callable[[Behaviour], HostileAgent]) -> None:
    """Well-formed lines that are never our reply, sent for as long as anyone listens."""
    def flood(conn: socket.socket, request_id: int) -> None:
        line = reply(request_id + 1)
        end = time.monotonic() + GIVE_UP_S
        while time.monotonic() < end:
            agent.send(conn, line * 16384)

    agent = hostile(flood)
    with pytest.raises(AgentError, match="did not answer ping within 0.5 s"):
        client(agent).call("ping")
    agent.close()
    assert agent.still_sending_when_client_left


def test_a_trickle_without_newlines_cannot_stretch_the_deadline(hostile: Callable[[Behaviour], HostileAgent]) -> None:
    def trickle(conn: socket.socket, request_id: int) -> None:
        end = time.monotonic() + GIVE_UP_S
        while time.monotonic() < end:
            agent.send(conn, b"x")
            time.sleep(0.01)

    agent = hostile(trickle)
    with pytest.raises(AgentError, match="did not answer"):
        client(agent).call("ping")
    agent.close()
    assert agent.still_sending_when_client_left


def test_a_stalled_agent_is_a_clean_timeout(hostile: Callable[[Behaviour], HostileAgent]) -> None:
    stop = threading.Event()
    agent = hostile(lambda conn, request_id: stop.wait(GIVE_UP_S) and None)
    with pytest.raises(AgentError, match="did not answer"):
        client(agent).call("ping")
    stop.set()


def test_a_100_mb_line_is_dropped_at_the_message_bound(hostile: Callable[[Behaviour], HostileAgent]) -> None:
    def huge(conn: socket.socket, request_id: int) -> None:
        chunk = b"A" * (1 << 20)
        for _ in range(100):
            agent.send(conn, chunk)
        agent.send(conn, b"\n" + reply(request_id))

    agent = hostile(huge)
    with pytest.raises(AgentError, match=f"a line over {rpc.MAX_MESSAGE_BYTES} bytes"):
        AgentClient.over_socket(agent.path, TOKEN, timeout=GIVE_UP_S).call("ping")
    agent.close()
    # The client stopped reading a little past one message (plus what the kernel's socket buffers held).
    assert agent.still_sending_when_client_left and agent.sent < 16 * rpc.MAX_MESSAGE_BYTES


def test_garbage_before_the_reply_is_skipped(hostile: Callable[[Behaviour], HostileAgent]) -> None:
    def garbage(conn: socket.socket, request_id: int) -> None:
        agent.send(conn, b"\x00\xff not json\n{\"id\": \"x\"}\n[1,2]\n\n" + b"{" * 1000 + b"\n")
        agent.send(conn, reply(request_id, result={"pong": True, "agent_version": "1", "uptime_s": 1.0}))

    agent = hostile(garbage)
    assert client(agent).typed("ping", rpc.PingResult).pong


def test_a_reset_is_an_agent_error_not_a_traceback(hostile: Callable[..., HostileAgent]) -> None:
    # A unix socket closed with the request unread resets the connection: the client's recv raises
    # ConnectionResetError (or its send raises BrokenPipeError, if the close came first).
    agent = hostile(lambda conn, request_id: None, read_request=False)
    with pytest.raises(AgentError, match="agent channel .* failed"):
        client(agent).call("ping")


def test_guest_markup_and_escapes_in_a_refusal_render_as_plain_text(
        hostile: Callable[[Behaviour], HostileAgent], capsys: pytest.CaptureFixture[str]) -> None:
    evil = "[/] [bold red]pwned[/] \x1b[2J\x1b]0;title\x07\rspoof"

    def refuse(conn: socket.socket, request_id: int) -> None:
        agent.send(conn, reply(request_id, ok=False, result=None, error={"code": "failed", "message": evil}))

    agent = hostile(refuse)
    with pytest.raises(AgentError) as caught:
        client(agent).call("ping")
    with pytest.raises(SystemExit):
        fail(caught.value.message, caught.value.exit_code)
    stderr = capsys.readouterr().err
    assert "[/] [bold red]pwned[/]" in stderr, "markup must be printed literally, not interpreted"
    assert "\x1b" not in stderr and "\r" not in stderr and "\x07" not in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_a_stored_event_quoting_a_guest_renders_as_plain_text() -> None:
    """`hvctl show` prints the VM's events; one that quotes a guest must not crash it (rich markup) nor reach the
    terminal as escape sequences."""
    import io

    from rich.console import Console

    from hvctl.cli.vms import render_events
    from hvctl.ledger import Event

    events = [Event(1, 0.0, "vm", "local", "workload.finished", "w1 failed: [/] [bold]x\x1b]0;pwned\x07\x1b[2J")]
    buffer = io.StringIO()
    Console(file=buffer, width=200).print(render_events(events))
    printed = buffer.getvalue()
    assert "[/] [bold]x" in printed and "\x1b" not in printed and "\x07" not in printed
