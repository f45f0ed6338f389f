"""hvctl-agent: the in-guest agent. Serves the JSON-lines RPC of ``guest.rpc`` over a virtio-serial port.

In a VM it reads and writes the port's character device; the host side is a unix socket libvirt made for the channel,
so the agent needs no guest network. For development it also serves a unix socket on a host
(``hvctl-agent serve --socket PATH``). Malformed, oversized, unauthorised or unknown messages get an error reply and
the agent keeps serving. Workloads run in child processes, so a workload that crashes or runs out of memory never
takes the agent with it.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError

from guest import rpc, warm
from guest.kinds import CHECKPOINTABLE, KINDS
from guest.serving.control import ServeControl, ServeRefused
from guest.validation import describe

VERSION = "0.2.0"
STARTED = time.monotonic()
AGENT_PORT_NAME = rpc.AGENT_CHANNEL

# Workload kind (guest/kinds.py) → the command that runs it; a kind whose module is missing fails at start with
# Python's own message, reported through workload.status.
WorkloadCommand = Callable[[list[str]], list[str]]


def _ignore_sigusr1() -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _workload_module(kind: str) -> WorkloadCommand:
    def command(args: list[str]) -> list[str]:
        return [sys.executable, "-m", "guest.workloads", "run", kind, *args, "--json"]

    return command


DEFAULT_WORKLOADS: dict[str, WorkloadCommand] = {k: _workload_module(k) for k in KINDS}


class RpcFailure(Exception):
    def __init__(self, code: rpc.ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class WorkloadProcess(Protocol):
    """What the agent asks of a workload's process: a ``subprocess.Popen``, or a forked one (``warm.WarmProcess``)."""

    pid: int

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def send_signal(self, sig: int) -> None: ...


# Kinds never forked from the warm server: train-ddp's launcher imports only torch's elastic agent, and starts its
# workers from a forkserver of its own (guest/workloads/distributed.py).
COLD_KINDS = frozenset({"train-ddp"})


@dataclass
class Workload:
    id: str
    kind: str
    args: list[str]
    proc: WorkloadProcess
    log: Path
    started_at: float
    ended_at: float | None = None
    cancelled: bool = False

    def status(self) -> rpc.WorkloadStatus:
        code = self.proc.poll()
        if code is not None and self.ended_at is None:
            self.ended_at = time.time()
        state = "running" if code is None else "cancelled" if self.cancelled else "succeeded" if code == 0 else "failed"
        result, error = None, None
        if code is not None:
            result = _last_json_object(self.log)
            if code != 0:
                tail = self.log.read_text(errors="replace").strip().splitlines()[-1:] if self.log.exists() else []
                error = tail[0] if tail else f"exit code {code}"
        return rpc.WorkloadStatus(id=self.id, kind=self.kind, args=self.args, state=state, exit_code=code,
                                  started_at=self.started_at, ended_at=self.ended_at, result=result, error=error)


@dataclass
class Agent:
    token: str
    workdir: Path
    allow_poweroff: bool = False
    # Where the token came from: a rotation rewrites it, so an agent restarted in this boot keeps the new token.
    token_file: Path | None = None
    workloads: dict[str, WorkloadCommand] = field(default_factory=lambda: dict(DEFAULT_WORKLOADS))
    _running: dict[str, Workload] = field(default_factory=dict)
    _next_id: int = 1
    shutdown_requested: threading.Event = field(default_factory=threading.Event)
    # The resident model server (guest/serving): its own process, found again by an agent restarted in this boot.
    serving: ServeControl | None = None
    # Workloads forked from a server that imported torch and transformers once (guest/warm.py), where they are
    # installed; the server warms up at the idle scheduling class from the first workload on, and workloads start
    # cold until it is ready. The guest's agent (main) turns it on; False here lets each test choose. (As first
    # built, a warm start waited in workload.start for the server's imports, past the controller's 60 s timeout.)
    warm_starts: bool = False
    _warm: warm.WarmStarter | None = None

    def __post_init__(self) -> None:
        if self.serving is None:
            self.serving = ServeControl(self.workdir / "serve")

    def handle_line(self, line: bytes) -> rpc.Reply:
        """One request line in, one reply out. Never raises: every failure becomes an error reply."""
        request_id: int | None = None
        try:
            if len(line) > rpc.MAX_MESSAGE_BYTES:
                raise RpcFailure(rpc.ErrorCode.TOO_LARGE, f"message of {len(line)} bytes exceeds "
                                                          f"{rpc.MAX_MESSAGE_BYTES}")
            try:
                raw = json.loads(line)
            except (ValueError, UnicodeDecodeError) as exc:
                raise RpcFailure(rpc.ErrorCode.MALFORMED, f"not JSON: {exc}") from None
            if isinstance(raw, dict) and isinstance(raw.get("id"), int):
                request_id = raw["id"]
            try:
                request = rpc.Request.model_validate(raw)
            except ValidationError as exc:
                raise RpcFailure(rpc.ErrorCode.MALFORMED, describe(exc)) from None
            if request.v != rpc.PROTOCOL_VERSION:
                raise RpcFailure(rpc.ErrorCode.UNSUPPORTED_VERSION, f"protocol v{request.v} is not supported; "
                                                                    f"this agent speaks v{rpc.PROTOCOL_VERSION}")
            if not hmac.compare_digest(request.token.encode(), self.token.encode()):
                raise RpcFailure(rpc.ErrorCode.UNAUTHORIZED, "bad or missing agent token")
            if request.method not in rpc.METHODS:
                raise RpcFailure(rpc.ErrorCode.UNKNOWN_METHOD, f"unknown method {request.method!r}")
            params_model, result_model = rpc.METHODS[request.method]
            try:
                params = params_model.model_validate(request.params)
            except ValidationError as exc:
                raise RpcFailure(rpc.ErrorCode.BAD_PARAMS, describe(exc)) from None
            result = getattr(self, "rpc_" + request.method.replace(".", "_"))(params)
            # Validate our own reply too: a reply the controller would reject is our bug, caught here.
            result = result_model.model_validate(result.model_dump())
            return rpc.Reply(id=request.id, ok=True, result=result.model_dump(mode="json"))
        except (RpcFailure, ServeRefused) as exc:
            return rpc.Reply(id=request_id, ok=False, error=rpc.ErrorBody(code=exc.code, message=exc.message))
        except Exception as exc:  # noqa: BLE001 - the agent must keep serving whatever a handler does
            return rpc.Reply(id=request_id, ok=False,
                             error=rpc.ErrorBody(code=rpc.ErrorCode.FAILED, message=f"{type(exc).__name__}: {exc}"))

    # -- methods ------------------------------------------------------------------------------------------------

    def rpc_ping(self, _: rpc.NoParams) -> rpc.PingResult:
        return rpc.PingResult(agent_version=VERSION, uptime_s=round(time.monotonic() - STARTED, 3))

    def rpc_info(self, _: rpc.NoParams) -> rpc.InfoResult:
        return rpc.InfoResult(hostname=socket.gethostname(), kernel=platform.release(), cpus=os.cpu_count() or 1,
                              memory_mib=_memory_mib(), gpus=_gpus(), python=platform.python_version(),
                              packages=_package_versions())

    def rpc_exec(self, params: rpc.ExecParams) -> rpc.ExecResult:
        started = time.monotonic()
        try:
            proc = subprocess.run(params.argv, input=params.stdin.encode(), capture_output=True,
                                  timeout=params.timeout_s)
            code, out, err, timed_out = proc.returncode, proc.stdout, proc.stderr, False
        except subprocess.TimeoutExpired as exc:
            code, out, err, timed_out = -signal.SIGKILL, exc.stdout or b"", exc.stderr or b"", True
        except OSError as exc:
            raise RpcFailure(rpc.ErrorCode.FAILED, f"cannot run {params.argv[0]!r}: {exc.strerror}") from None
        truncated = len(out) > rpc.MAX_OUTPUT_BYTES or len(err) > rpc.MAX_OUTPUT_BYTES
        return rpc.ExecResult(exit_code=code, stdout=out[-rpc.MAX_OUTPUT_BYTES:].decode(errors="replace"),
                              stderr=err[-rpc.MAX_OUTPUT_BYTES:].decode(errors="replace"), timed_out=timed_out,
                              truncated=truncated, duration_s=round(time.monotonic() - started, 3))

    def rpc_token_rotate(self, params: rpc.TokenRotateParams) -> rpc.TokenRotated:
        if self.token_file is not None:
            fresh = self.token_file.with_name(self.token_file.name + ".new")
            fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(params.token + "\n")
            os.replace(fresh, self.token_file)
        # This reply still goes out; every later request must carry the new token.
        self.token = params.token
        return rpc.TokenRotated(rotated=True)

    def rpc_shutdown(self, _: rpc.NoParams) -> rpc.ShutdownResult:
        self.shutdown_requested.set()
        return rpc.ShutdownResult(accepted=True)

    def rpc_workload_start(self, params: rpc.WorkloadStartParams) -> rpc.WorkloadStatus:
        if params.kind not in self.workloads:
            raise RpcFailure(rpc.ErrorCode.BAD_PARAMS, f"unknown workload kind {params.kind!r}; "
                                                       f"known: {', '.join(sorted(self.workloads))}")
        wid = f"w{self._next_id}"
        self._next_id += 1
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.workdir / f"{wid}.log"
        argv = self.workloads[params.kind](params.args)
        forked = warm.workload_args(argv) if params.kind not in COLD_KINDS else None
        proc: WorkloadProcess
        with log.open("wb") as out:
            if forked is not None and (starter := self._warm_starter()) is not None and starter.usable():
                proc = starter.start(forked, log, self.workdir)  # set up as below, in the forked child
            else:
                # A new session: cancel signals the whole process group, including anything the workload spawned.
                # SIGUSR1 starts out ignored: a checkpoint request that arrives before the workload has installed
                # its handler must not kill it (SIGUSR1's default action); the controller retries after the first
                # step.
                proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True, cwd=self.workdir,
                                        preexec_fn=_ignore_sigusr1)  # noqa: PLW1509 - async-signal-safe: one syscall
        self._running[wid] = Workload(wid, params.kind, list(params.args), proc, log, time.time())
        return self._running[wid].status()

    def _warm_starter(self) -> warm.WarmStarter | None:
        """The warm starter, warming up from the first workload on (which, like every one before it is ready,
        starts cold)."""
        if self._warm is None and self.warm_starts and warm.available():
            self._warm = warm.WarmStarter()
            self._warm.warm_up()
        return self._warm

    def _workload(self, wid: str) -> Workload:
        if wid not in self._running:
            raise RpcFailure(rpc.ErrorCode.NOT_FOUND, f"no workload {wid}")
        return self._running[wid]

    def rpc_workload_status(self, params: rpc.WorkloadRef) -> rpc.WorkloadStatus:
        return self._workload(params.id).status()

    def rpc_workload_logs(self, params: rpc.WorkloadLogsParams) -> rpc.WorkloadLogs:
        workload = self._workload(params.id)
        with workload.log.open("rb") as f:
            f.seek(params.offset)
            data = f.read(rpc.MAX_OUTPUT_BYTES)
        return rpc.WorkloadLogs(id=workload.id, data=data.decode(errors="replace"),
                                next_offset=params.offset + len(data),
                                eof=workload.proc.poll() is not None and len(data) < rpc.MAX_OUTPUT_BYTES)

    def rpc_workload_list(self, _: rpc.NoParams) -> rpc.WorkloadList:
        return rpc.WorkloadList(workloads=[w.status() for w in self._running.values()])

    def rpc_workload_checkpoint(self, params: rpc.WorkloadRef) -> rpc.WorkloadCheckpointed:
        """Ask a running training workload for a checkpoint at its next step boundary (SIGUSR1 to the workload's
        own process, not its group). Only training checkpoints; an inference workload is drained instead."""
        workload = self._workload(params.id)
        if workload.kind not in CHECKPOINTABLE:
            raise RpcFailure(rpc.ErrorCode.BAD_PARAMS, f"workload {workload.id} ({workload.kind}) cannot checkpoint; "
                                                       f"only {', '.join(sorted(CHECKPOINTABLE))} can")
        if workload.proc.poll() is not None:
            raise RpcFailure(rpc.ErrorCode.BAD_PARAMS, f"workload {workload.id} is not running")
        offset = workload.log.stat().st_size
        workload.proc.send_signal(signal.SIGUSR1)
        return rpc.WorkloadCheckpointed(status=workload.status(), log_offset=offset)

    def rpc_workload_cancel(self, params: rpc.WorkloadRef) -> rpc.WorkloadStatus:
        workload = self._workload(params.id)
        if workload.proc.poll() is None:
            workload.cancelled = True
            os.killpg(workload.proc.pid, signal.SIGTERM)
            try:
                workload.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(workload.proc.pid, signal.SIGKILL)
                workload.proc.wait()
        return workload.status()

    # -- the resident model server ---------------------------------------------------------------------------

    @property
    def _serve(self) -> ServeControl:
        assert self.serving is not None
        return self.serving

    def rpc_serve_start(self, params: rpc.ServeStartParams) -> rpc.ServeStatus:
        return self._serve.start(params)

    def rpc_serve_status(self, _: rpc.NoParams) -> rpc.ServeStatus:
        return self._serve.status()

    def rpc_serve_load(self, params: rpc.ServedModel) -> rpc.ServeStatus:
        return self._serve.load(params, replace=False)

    def rpc_serve_reload(self, params: rpc.ServedModel) -> rpc.ServeStatus:
        return self._serve.load(params, replace=True)

    def rpc_serve_unload(self, params: rpc.ServeModelRef) -> rpc.ServeStatus:
        return self._serve.unload(params)

    def rpc_serve_stop(self, _: rpc.NoParams) -> rpc.ServeStatus:
        return self._serve.stop()

    def rpc_serve_generate(self, params: rpc.ServeGenerateParams) -> rpc.ServeGenerated:
        return self._serve.generate(params)


# -- transports -------------------------------------------------------------------------------------------------


def read_lines(read: Callable[[int], bytes]) -> Iterator[bytes]:
    """Split a byte stream into lines, yielding an over-long line as a marker-sized chunk rather than buffering it.

    An over-long line is reported once (as a line just over the limit, which the agent refuses) and the rest of it
    is discarded up to its newline, so memory stays bounded whatever the peer sends.
    """
    buf = b""
    discarding = False
    while True:
        chunk = read(65536)
        if not chunk:
            return
        buf += chunk
        while True:
            newline = buf.find(b"\n")
            if newline < 0:
                if len(buf) > rpc.MAX_MESSAGE_BYTES and not discarding:
                    yield buf[: rpc.MAX_MESSAGE_BYTES + 1]
                    discarding = True
                if discarding:
                    buf = b""
                break
            line, buf = buf[:newline], buf[newline + 1:]
            if discarding:
                discarding = False
                continue
            if line.strip():
                yield line


def _send(write: Callable[[bytes], Any], reply: BaseModel) -> None:
    write(reply.model_dump_json().encode() + b"\n")


def serve_port(agent: Agent, path: Path) -> None:
    """Serve the virtio-serial character device. A read returns nothing while no host is connected: poll again."""
    fd = os.open(path, os.O_RDWR)
    try:
        while not agent.shutdown_requested.is_set():
            for line in read_lines(lambda n: os.read(fd, n)):
                _send(lambda b: os.write(fd, b), agent.handle_line(line))
                if agent.shutdown_requested.is_set():
                    break
            time.sleep(0.1)
    finally:
        os.close(fd)


def serve_socket(agent: Agent, path: Path) -> None:
    """Development transport: a unix socket on the host, one client at a time, like the virtio channel."""
    path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    server.settimeout(0.5)
    try:
        while not agent.shutdown_requested.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                for line in read_lines(conn.recv):
                    conn.sendall(agent.handle_line(line).model_dump_json().encode() + b"\n")
                    if agent.shutdown_requested.is_set():
                        break
    finally:
        server.close()
        path.unlink(missing_ok=True)


def find_port(name: str = AGENT_PORT_NAME, sys_root: Path = Path("/sys")) -> Path:
    """The character device of a named virtio port, without relying on udev's /dev/virtio-ports symlinks."""
    for port in sorted((sys_root / "class/virtio-ports").glob("*")):
        try:
            if (port / "name").read_text().strip() == name:
                return Path("/dev") / port.name
        except OSError:
            continue
    raise FileNotFoundError(f"no virtio port named {name}")


# -- helpers ----------------------------------------------------------------------------------------------------


def _memory_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 0


def _gpus() -> list[str]:
    """PCI display and 3D controllers the guest sees (class 0x03xxxx), as 'address vendor:device'."""
    found = []
    for dev in sorted(Path("/sys/bus/pci/devices").glob("*")):
        try:
            if (dev / "class").read_text().startswith("0x03"):
                vendor, device = (dev / "vendor").read_text().strip(), (dev / "device").read_text().strip()
                found.append(f"{dev.name} {vendor[2:]}:{device[2:]}")
        except OSError:
            continue
    return found


def _package_versions() -> dict[str, str]:
    versions = {}
    for name in ("pydantic", "torch", "transformers", "onnxruntime-gpu", "onnxruntime", "numpy", "tokenizers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _last_json_object(log: Path) -> dict[str, Any] | None:
    try:
        lines = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return None
    for line in reversed(lines[-5:]):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hvctl-agent", description="hvctl's in-guest agent")
    parser.add_argument("--version", action="version", version=f"hvctl-agent {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the agent RPC")
    where = serve.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", type=Path, help="listen on a unix socket (development on a host)")
    where.add_argument("--port", type=Path, help="a virtio-serial character device, or 'auto' to find it")
    serve.add_argument("--token-file", type=Path, required=True)
    serve.add_argument("--workdir", type=Path, default=Path("/var/lib/hvctl-agent"))
    serve.add_argument("--allow-poweroff", action="store_true", help="power the machine off on `shutdown` (guest)")
    args = parser.parse_args(argv)

    try:
        token = args.token_file.read_text().strip()
    except OSError as exc:
        print(f"hvctl-agent: error: cannot read token file {args.token_file}: {exc.strerror}", file=sys.stderr)
        return 2
    if not token:
        print(f"hvctl-agent: error: token file {args.token_file} is empty", file=sys.stderr)
        return 2
    agent = Agent(token=token, workdir=args.workdir, allow_poweroff=args.allow_poweroff, token_file=args.token_file,
                  warm_starts=True)
    if args.socket:
        serve_socket(agent, args.socket)
    else:
        port = find_port() if str(args.port) == "auto" else args.port
        print(f"hvctl-agent {VERSION} serving {port}", file=sys.stderr, flush=True)
        serve_port(agent, port)
    if agent.shutdown_requested.is_set() and agent.allow_poweroff:
        power_off()
    return 0


def power_off() -> None:
    """Sync and power off now. Minimal Debian has no `poweroff` without an init system; busybox's works anywhere."""
    os.sync()
    for command in (["poweroff", "-f"], ["busybox", "poweroff", "-f"]):
        if shutil.which(command[0]):
            subprocess.run(command, check=False)
            return
    raise RuntimeError("neither poweroff nor busybox is installed")


if __name__ == "__main__":
    raise SystemExit(main())
