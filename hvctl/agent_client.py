"""The controller's side of the agent RPC: a unix-socket client for the VM's virtio-serial channel.

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
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from guest import rpc
from hvctl.errors import HvctlError

ResultT = TypeVar("ResultT", bound=BaseModel)


class AgentError(HvctlError):
    """The agent answered with an error, or could not be reached."""

    exit_code = 10

    def __init__(self, message: str, code: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code


class AgentClient:
    def __init__(self, socket_path: Path, token: str, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.token = token
        self.timeout = timeout

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
            raise AgentError(f"agent sent an invalid {method} result: {exc.errors()[0]['msg']}") from None

    def typed(self, method: str, result_type: type[ResultT], params: BaseModel | None = None,
              timeout: float | None = None) -> ResultT:
        result = self.call(method, params, timeout)
        assert isinstance(result, result_type)
        return result

    def _roundtrip(self, request: rpc.Request, timeout: float) -> rpc.Reply:
        # One total deadline for the whole call: connect, send and every recv share it, so a guest that trickles
        # bytes (or floods lines that are not our reply) cannot stretch a call past its timeout.
        deadline = time.monotonic() + timeout
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(str(self.socket_path))
                sock.settimeout(_remaining(deadline))
                sock.sendall(b"\n" + request.model_dump_json().encode() + b"\n")
                return _read_reply(sock, request.id, deadline)
        except TimeoutError:
            raise AgentError(f"the agent did not answer {request.method} within {timeout:.1f} s") from None
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise AgentError(f"cannot connect to the agent channel {self.socket_path}: {exc.strerror}",
                             hint="is the VM running?") from None
        except OSError as exc:
            # A reset, a broken pipe or anything else the transport raises: one clean error, never a traceback.
            raise AgentError(f"the agent channel {self.socket_path} failed: {exc.strerror or exc}",
                             hint="is the VM running?") from None

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


def _read_reply(sock: socket.socket, request_id: int, deadline: float) -> rpc.Reply:
    """Read lines until the reply to ``request_id``. The buffer never holds more than one line of at most
    ``MAX_MESSAGE_BYTES``, and each byte is scanned for a newline once, so splitting stays linear."""
    buf = bytearray()
    while True:
        sock.settimeout(_remaining(deadline))
        chunk = sock.recv(65536)
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
