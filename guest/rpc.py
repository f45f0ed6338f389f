"""The agent RPC schema, shared by the in-guest agent and the controller.

JSON lines: one request object per line, one reply object per line. Every request and reply is validated against these
models on both sides. A request names a method; its ``params`` are validated against that method's params model, and
the reply's ``result`` against its result model. Versioned by ``v``: a peer refuses a version it does not speak.
"""

from __future__ import annotations

import enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

PROTOCOL_VERSION = 1
# The virtio-serial port both sides know the agent by: the guest finds its device by this name, and the controller
# opens it through libvirt (virDomain.openChannel).
AGENT_CHANNEL = "org.hvctl.agent.0"
# A line longer than this is refused without being parsed, so a runaway peer cannot exhaust the agent's memory.
MAX_MESSAGE_BYTES = 1 << 20
# Output returned by exec is capped so that a reply always fits in one message.
MAX_OUTPUT_BYTES = 256 << 10


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ErrorCode(enum.StrEnum):
    MALFORMED = "malformed"
    TOO_LARGE = "too-large"
    UNSUPPORTED_VERSION = "unsupported-version"
    UNKNOWN_METHOD = "unknown-method"
    BAD_PARAMS = "bad-params"
    UNAUTHORIZED = "unauthorized"
    FAILED = "failed"
    NOT_FOUND = "not-found"


class Request(Model):
    v: int
    id: int
    token: str = Field(max_length=256)
    method: str = Field(max_length=64)
    params: dict[str, Any] = {}


class ErrorBody(Model):
    code: ErrorCode
    message: str


class Reply(Model):
    v: int = PROTOCOL_VERSION
    id: int | None
    ok: bool
    result: dict[str, Any] | None = None
    error: ErrorBody | None = None


# -- per-method params and results ----------------------------------------------------------------------------


class NoParams(Model):
    pass


class PingResult(Model):
    pong: Literal[True] = True
    agent_version: str
    uptime_s: float


class InfoResult(Model):
    hostname: str
    kernel: str
    cpus: int
    memory_mib: int
    gpus: list[str]
    python: str
    packages: dict[str, str]


class ExecParams(Model):
    argv: list[str] = Field(min_length=1)
    timeout_s: float = Field(default=60.0, gt=0, le=3600)
    stdin: str = ""


class ExecResult(Model):
    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool
    truncated: bool
    duration_s: float


class ShutdownResult(Model):
    accepted: bool


class WorkloadStartParams(Model):
    kind: str = Field(pattern=r"^[a-z][a-z0-9-]{0,31}$")
    args: list[str] = []


class WorkloadRef(Model):
    id: str = Field(pattern=r"^w[0-9]{1,9}$")


class WorkloadLogsParams(Model):
    id: str = Field(pattern=r"^w[0-9]{1,9}$")
    offset: int = Field(default=0, ge=0)


class WorkloadStatus(Model):
    id: str
    kind: str
    args: list[str] = []  # as started, so that a controller can start the same workload elsewhere
    state: Literal["running", "succeeded", "failed", "cancelled"]
    exit_code: int | None
    started_at: float
    ended_at: float | None
    result: dict[str, Any] | None
    error: str | None


class WorkloadList(Model):
    workloads: list[WorkloadStatus]


class WorkloadCheckpointed(Model):
    """workload.checkpoint: the signal was delivered; the workload writes its checkpoint at the next step boundary
    and reports it as a ``{"progress": {..., "requested": true}}`` line in its log, after ``log_offset``."""

    status: WorkloadStatus
    log_offset: int


class WorkloadLogs(Model):
    id: str
    data: str
    next_offset: int
    eof: bool


class TokenRotateParams(Model):
    """The agent's next token; the call itself is authenticated with the current one."""

    token: str = Field(min_length=32, max_length=256, pattern=r"^[A-Za-z0-9_-]+$")


class TokenRotated(Model):
    rotated: bool


# -- the resident model server (guest/serving), run by the agent ------------------------------------------------

MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class ServedModel(Model):
    """A model to serve: its name in the API, and its directory inside the guest (a transformers checkpoint)."""

    name: str = Field(pattern=MODEL_NAME)
    dir: str = Field(min_length=1, max_length=4096, pattern=r"^/")


class ServeStartParams(Model):
    """serve.start: start the server with these models, or load them into the one already running."""

    models: list[ServedModel] = Field(min_length=1, max_length=16)
    port: int = Field(default=8000, ge=1, le=65535)
    max_seqs: int = Field(default=16, ge=1, le=1024)
    max_tokens: int | None = Field(default=None, ge=2, le=1 << 20)
    backend: Literal["cb"] = "cb"


class ServeModelRef(Model):
    name: str = Field(pattern=MODEL_NAME)


class ServeModelStatus(Model):
    name: str
    dir: str
    state: Literal["loading", "ready", "failed"]
    version: int
    footprint_mib: int
    loaded_at: float | None
    error: str | None
    pending: str | None  # a reload's directory, while the new weights load beside the served ones
    in_flight: int
    context: int | None


class ServeStatus(Model):
    state: Literal["stopped", "starting", "running", "exited"]
    pid: int | None = None
    port: int | None = None
    backend: str | None = None
    max_seqs: int | None = None
    max_tokens: int | None = None
    started_at: float | None = None
    models: list[ServeModelStatus] = []
    memory_total_mib: int = 0
    memory_available_mib: int = 0
    error: str | None = None  # why it exited: the last line of its log


class ServeGenerateParams(Model):
    model: str = Field(pattern=MODEL_NAME)
    prompt: str = Field(min_length=1, max_length=1 << 16)
    max_tokens: int = Field(default=16, ge=1, le=4096)
    timeout_s: float = Field(default=300.0, gt=0, le=3600)


class ServeGenerated(Model):
    model: str
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    duration_s: float


METHODS: dict[str, tuple[type[Model], type[Model]]] = {
    "ping": (NoParams, PingResult),
    "info": (NoParams, InfoResult),
    "exec": (ExecParams, ExecResult),
    "shutdown": (NoParams, ShutdownResult),
    "workload.start": (WorkloadStartParams, WorkloadStatus),
    "workload.status": (WorkloadRef, WorkloadStatus),
    "workload.logs": (WorkloadLogsParams, WorkloadLogs),
    "workload.cancel": (WorkloadRef, WorkloadStatus),
    "workload.list": (NoParams, WorkloadList),
    "workload.checkpoint": (WorkloadRef, WorkloadCheckpointed),
    "token.rotate": (TokenRotateParams, TokenRotated),
    "serve.start": (ServeStartParams, ServeStatus),
    "serve.status": (NoParams, ServeStatus),
    "serve.load": (ServedModel, ServeStatus),
    "serve.reload": (ServedModel, ServeStatus),
    "serve.unload": (ServeModelRef, ServeStatus),
    "serve.stop": (NoParams, ServeStatus),
    "serve.generate": (ServeGenerateParams, ServeGenerated),
}
