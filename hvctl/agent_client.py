"""The controller's side of the agent RPC, over any byte pipe: the VM's virtio-serial channel opened through its
host's libvirt connection (``Host.open_channel``, the same over the local socket, ``qemu+ssh`` or ``qemu+tls``), or
a unix socket for the agent's development mode (``hvctl-agent serve --socket``).

The guest is untrusted: every call has one total deadline however the guest paces its bytes, the read buffer is
bounded by one message, and every transport failure becomes an ``AgentError``.

The channel is a byte pipe with no connection semantics on the guest side. Two consequences are handled here:
a previous client may have died mid-line, so every connection starts with a bare newline that ends any partial
line (the agent ignores empty lines); and replies meant for that earlier client may still be queued, so replies
are matched to requests by a random id and the others are discarded.
"""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from guest import rpc
from guest.validation import describe
from hvctl.errors import HvctlError

if TYPE_CHECKING:
    from hvctl.host import Host

ResultT = TypeVar("ResultT", bound=BaseModel)
# How long a call waits for another client (another hvctl command) to let go of the channel; libvirt refuses a
# second client at once instead of queueing it.
BUSY_GRACE_S = 10.0


class AgentError(HvctlError):
    """The agent answered with an error, or could not be reached."""

    exit_code = 10

    def __init__(self, message: str, code: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code


class Transport(Protocol):
    """A byte pipe to the agent. ``recv`` returns b"" at its end and raises TimeoutError past ``deadline``."""

    def send(self, data: bytes, deadline: float) -> None: ...

    def recv(self, deadline: float) -> bytes: ...

    def close(self) -> None: ...


class UnixTransport:
    def __init__(self, path: Path, deadline: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            while True:
                self.sock.settimeout(_remaining(deadline))
                try:
                    self.sock.connect(str(path))
                    break
                except BlockingIOError:
                    # A unix socket whose listener's backlog is full answers EAGAIN at once instead of blocking
                    # (a busy listener, not a dead one): try again until the deadline.
                    time.sleep(0.01)
        except BaseException:
            self.sock.close()
            raise

    def send(self, data: bytes, deadline: float) -> None:
        self.sock.settimeout(_remaining(deadline))
        self.sock.sendall(data)

    def recv(self, deadline: float) -> bytes:
        self.sock.settimeout(_remaining(deadline))
        return self.sock.recv(65536)

    def close(self) -> None:
        self.sock.close()


Opener = Callable[[float], Transport]


class AgentClient:
    def __init__(self, opener: Opener, token: str, timeout: float = 30.0, name: str = "the agent channel") -> None:
        self.opener = opener
        self.token = token
        self.timeout = timeout
        self.name = name

    @classmethod
    def over_socket(cls, path: Path, token: str, timeout: float = 30.0) -> AgentClient:
        """The agent's development transport: its own unix socket."""
        return cls(lambda deadline: UnixTransport(path, deadline), token, timeout, name=f"the agent channel {path}")

    @classmethod
    def over_channel(cls, host: Host, vm: str, token: str, timeout: float = 30.0) -> AgentClient:
        """The VM's virtio-serial channel through its host's libvirt connection."""
        return cls(lambda deadline: _open_channel(host, vm, rpc.AGENT_CHANNEL, deadline), token, timeout,
                   name=f"the agent channel of {vm}")

    def call(self, method: str, params: BaseModel | None = None, timeout: float | None = None) -> BaseModel:
        if method not in rpc.METHODS:
            raise AgentError(f"unknown agent method {method!r}")
        params_model, result_model = rpc.METHODS[method]
        checked = params_model.model_validate((params or params_model()).model_dump())
        request = rpc.Request(v=rpc.PROTOCOL_VERSION, id=secrets.randbelow(2**62), token=self.token, method=method,
                              params=checked.model_dump(mode="json"))
        reply = self._roundtrip(request, timeout or self.timeout)
        if not reply.ok:
            error = reply.error or rpc.ErrorBody(code=rpc.ErrorCode.FAILED, message="no error body")
            raise AgentError(f"agent refused {method}: {error.message}", code=error.code.value)
        try:
            return result_model.model_validate(reply.result or {})
        except ValidationError as exc:
            raise AgentError(f"agent sent an invalid {method} result: {describe(exc)}") from None

    def typed(self, method: str, result_type: type[ResultT], params: BaseModel | None = None,
              timeout: float | None = None) -> ResultT:
        result = self.call(method, params, timeout)
        assert isinstance(result, result_type)
        return result

    def _roundtrip(self, request: rpc.Request, timeout: float) -> rpc.Reply:
        # One total deadline for the whole call: open, send and every recv share it, so a guest that trickles bytes
        # (or floods lines that are not our reply) cannot stretch a call past its timeout.
        deadline = time.monotonic() + timeout
        transport: Transport | None = None
        try:
            transport = self.opener(deadline)
            transport.send(b"\n" + request.model_dump_json().encode() + b"\n", deadline)
            return _read_reply(transport, request.id, deadline)
        except TimeoutError:
            raise AgentError(f"the agent did not answer {request.method} within {timeout:.1f} s") from None
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise AgentError(f"cannot connect to {self.name}: {exc.strerror}", hint="is the VM running?") from None
        except OSError as exc:
            # A reset, a broken pipe or anything else the transport raises: one clean error, never a traceback.
            raise AgentError(f"{self.name} failed: {exc.strerror or exc}", hint="is the VM running?") from None
        except AgentError:
            raise
        except HvctlError as exc:  # the host layer's: a lost connection, a domain that is not running
            raise AgentError(f"{self.name} failed: {exc.message}", hint=exc.hint or "is the VM running?") from None
        finally:
            if transport is not None:
                transport.close()

    def wait_ready(self, timeout: float, poll: float = 0.25) -> tuple[rpc.PingResult, float]:
        """Ping until the agent answers; returns its reply and the seconds waited."""
        started = time.monotonic()
        last: Exception | None = None
        while time.monotonic() - started < timeout:
            try:
                remaining = max(timeout - (time.monotonic() - started), 0.5)
                return self.typed("ping", rpc.PingResult, timeout=min(2.0, remaining)), time.monotonic() - started
            except AgentError as exc:
                if exc.code == rpc.ErrorCode.UNAUTHORIZED:
                    raise
                last = exc
            time.sleep(poll)
        raise AgentError(f"the agent did not answer within {timeout:.0f} s ({last})")


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _open_channel(host: Host, vm: str, channel: str, deadline: float) -> Transport:
    """Open the channel, waiting out another client that holds it (never past ``deadline``, nor BUSY_GRACE_S)."""
    from hvctl.host import ChannelBusy  # libvirt loads when a channel is first opened, not with this module

    busy_until = min(deadline, time.monotonic() + BUSY_GRACE_S)
    while True:
        try:
            return host.guest(vm).open_channel(channel)
        except ChannelBusy as exc:
            if time.monotonic() >= busy_until:
                raise AgentError(exc.message, hint="another hvctl command is talking to this agent; try again") \
                    from None
            time.sleep(0.05)


def _read_reply(transport: Transport, request_id: int, deadline: float) -> rpc.Reply:
    """Read lines until the reply to ``request_id``. The buffer never holds more than one line of at most
    ``MAX_MESSAGE_BYTES``, and each byte is scanned for a newline once, so splitting stays linear."""
    buf = bytearray()
    while True:
        _remaining(deadline)
        chunk = transport.recv(deadline)
        if not chunk:
            raise AgentError("the agent channel closed before a reply arrived")
        scan_from = len(buf)
        buf += chunk
        start = 0
        newline = buf.find(b"\n", scan_from)
        while newline >= 0:
            reply = _parse_reply(bytes(buf[start:newline]))
            if reply is not None and reply.id == request_id:
                return reply
            start = newline + 1
            newline = buf.find(b"\n", start)
        del buf[:start]
        if len(buf) > rpc.MAX_MESSAGE_BYTES:
            raise AgentError(f"the agent sent a line over {rpc.MAX_MESSAGE_BYTES} bytes; the channel was dropped")


def _parse_reply(line: bytes) -> rpc.Reply | None:
    if not line.strip():
        return None
    try:
        return rpc.Reply.model_validate_json(line)
    except ValidationError:
        # Stale or garbled bytes from an earlier client's exchange; the reply we want is identified by id.
        return None
