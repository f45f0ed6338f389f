"""The agent's side of the resident model server: start it, find it again, drive it, stop it. No torch here.

The server runs in its own session (``start_new_session``), so it outlives the agent: an agent restarted in the
same boot finds it again through ``server.json`` in its state directory (pid, the pid's start time, the port), and
a live migration moves it with the rest of the guest's memory. Everything else goes through the server's admin
socket (``guest/serving/server.py``). ``generate`` is an HTTP request to the server's own API on 127.0.0.1, made
here with the standard library, so that `hvctl generate` needs torch neither on the controller nor in the agent.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guest import rpc
from guest.serving import memory
from guest.serving.server import ADMIN_SOCKET, admin_call

STATE_FILE = "server.json"
LOG_FILE = "server.log"
STOP_GRACE_S = 30.0


class ServeRefused(Exception):
    def __init__(self, code: rpc.ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _start_ticks(pid: int) -> str | None:
    """The process's start time, or None when it is gone (or a zombie): a reused pid has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]


@dataclass
class ServeControl:
    state_dir: Path
    meminfo: Path = Path("/proc/meminfo")
    python: str = sys.executable
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    # -- what runs ---------------------------------------------------------------------------------------------

    def _recorded(self) -> dict[str, Any] | None:
        try:
            value = json.loads((self.state_dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def _alive(self, recorded: dict[str, Any]) -> bool:
        if self._proc is not None and self._proc.pid == recorded["pid"]:
            self._proc.poll()  # reap it if it exited, so that its pid reads as gone
        return _start_ticks(int(recorded["pid"])) == recorded.get("ticks")

    def status(self) -> rpc.ServeStatus:
        free, total = memory.available_mib(self.meminfo)
        mem = {"memory_total_mib": total, "memory_available_mib": free}
        recorded = self._recorded()
        if recorded is None:
            return rpc.ServeStatus(state="stopped", **mem)
        base = {k: recorded.get(k) for k in ("pid", "port", "backend", "max_seqs", "max_tokens", "started_at")}
        if not self._alive(recorded):
            return rpc.ServeStatus(state="exited", error=self._log_tail() or "it exited without a word", **base,
                                   **mem)
        try:
            code, data = admin_call(self.state_dir / ADMIN_SOCKET, "GET", "/status")
        except (OSError, http.client.HTTPException, ValueError):
            return rpc.ServeStatus(state="starting", **base, **mem)  # still importing, or binding its sockets
        if code != 200:
            return rpc.ServeStatus(state="starting", **base, **mem)
        models = [rpc.ServeModelStatus.model_validate(m) for m in data.get("models", [])]
        return rpc.ServeStatus(state="running", models=models, **base, **mem)

    def _log_tail(self) -> str:
        try:
            lines = (self.state_dir / LOG_FILE).read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1][:500] if lines else ""

    # -- verbs -------------------------------------------------------------------------------------------------

    def start(self, params: rpc.ServeStartParams) -> rpc.ServeStatus:
        names = [m.name for m in params.models]
        if len(set(names)) != len(names):
            raise ServeRefused(rpc.ErrorCode.BAD_PARAMS, f"model names repeat: {', '.join(names)}")
        current = self.status()
        if current.state in ("running", "starting"):
            if params.port != current.port:
                raise ServeRefused(rpc.ErrorCode.BAD_PARAMS, f"the server already runs on port {current.port}; "
                                                             f"stop it first to move it to {params.port}")
            if current.state == "starting":
                raise ServeRefused(rpc.ErrorCode.FAILED, "the server is still starting; load more models once "
                                                         "it answers")
            for model in params.models:
                self.load(model, replace=False)
            return self.status()
        footprints = [self._footprint(m, params.max_seqs, params.max_tokens) for m in params.models]
        total = memory.Footprint(sum(f.weights_bytes for f in footprints), sum(f.kv_bytes for f in footprints),
                                 max(f.context for f in footprints))
        try:
            memory.check_fits(", ".join(names), total, runtime=True, meminfo=self.meminfo)
        except memory.DoesNotFit as exc:
            raise ServeRefused(rpc.ErrorCode.BAD_PARAMS, str(exc)) from None
        with socket.socket() as probe:  # a port taken is refused now, not found out after the server started
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", params.port))
            except OSError as exc:
                raise ServeRefused(rpc.ErrorCode.BAD_PARAMS, f"port {params.port} in the guest is taken: "
                                                             f"{exc.strerror}") from None
        self.state_dir.mkdir(parents=True, exist_ok=True)
        argv = [self.python, "-m", "guest.serving", "serve", "--state-dir", str(self.state_dir), "--port",
                str(params.port), "--max-seqs", str(params.max_seqs), "--backend", params.backend]
        argv += ["--max-tokens", str(params.max_tokens)] if params.max_tokens else []
        for model in params.models:
            argv += ["--model", f"{model.name}={model.dir}"]
        with (self.state_dir / LOG_FILE).open("wb") as log:
            self._proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True, cwd=self.state_dir)
        recorded = {"pid": self._proc.pid, "ticks": _start_ticks(self._proc.pid), "port": params.port,
                    "backend": params.backend, "max_seqs": params.max_seqs, "max_tokens": params.max_tokens,
                    "started_at": time.time()}
        fresh = self.state_dir / (STATE_FILE + ".new")
        fresh.write_text(json.dumps(recorded))
        os.replace(fresh, self.state_dir / STATE_FILE)
        return self.status()

    def _footprint(self, model: rpc.ServedModel, max_seqs: int, max_tokens: int | None) -> memory.Footprint:
        try:
            return memory.footprint(Path(model.dir), max_seqs, max_tokens)
        except memory.BadModelDir as exc:
            raise ServeRefused(rpc.ErrorCode.BAD_PARAMS, str(exc)) from None

    def _running(self) -> rpc.ServeStatus:
        current = self.status()
        if current.state != "running":
            hint = {"stopped": "start it with `hvctl serve NAME start`",
                    "starting": "it is still starting: try again in a moment",
                    "exited": f"it exited: {current.error}"}[current.state]
            raise ServeRefused(rpc.ErrorCode.FAILED, f"no model server is running ({hint})")
        return current

    def _admin(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        code, data = admin_call(self.state_dir / ADMIN_SOCKET, "POST", url, body)
        if code >= 400:
            kind = rpc.ErrorCode.NOT_FOUND if code == 404 else rpc.ErrorCode.BAD_PARAMS
            raise ServeRefused(kind, str(data.get("error", f"HTTP {code}")))
        return data

    def load(self, model: rpc.ServedModel, replace: bool) -> rpc.ServeStatus:
        self._running()
        self._admin("/reload" if replace else "/load", {"name": model.name, "dir": model.dir})
        return self.status()

    def unload(self, ref: rpc.ServeModelRef) -> rpc.ServeStatus:
        self._running()
        self._admin("/unload", {"name": ref.name})
        return self.status()

    def stop(self) -> rpc.ServeStatus:
        recorded = self._recorded()
        if recorded is not None and self._alive(recorded):
            pid = int(recorded["pid"])
            os.killpg(pid, signal.SIGTERM)  # its own session: the group is the server and anything it spawned
            deadline = time.monotonic() + STOP_GRACE_S
            while self._alive(recorded) and time.monotonic() < deadline:
                time.sleep(0.1)
            if self._alive(recorded):
                os.killpg(pid, signal.SIGKILL)
                while self._alive(recorded):
                    time.sleep(0.05)
        (self.state_dir / STATE_FILE).unlink(missing_ok=True)
        (self.state_dir / ADMIN_SOCKET).unlink(missing_ok=True)
        self._proc = None
        return self.status()

    def generate(self, params: rpc.ServeGenerateParams) -> rpc.ServeGenerated:
        current = self._running()
        assert current.port is not None
        started = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", current.port, timeout=params.timeout_s)
        try:
            conn.request("POST", "/v1/completions", body=json.dumps(
                {"model": params.model, "prompt": params.prompt, "max_tokens": params.max_tokens}).encode(),
                headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            data = json.loads(response.read() or b"{}")
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise ServeRefused(rpc.ErrorCode.FAILED, f"the model server did not answer: {exc}") from None
        finally:
            conn.close()
        if response.status != 200:
            message = str((data.get("error") or {}).get("message", f"HTTP {response.status}"))
            code = rpc.ErrorCode.NOT_FOUND if response.status == 404 else (
                rpc.ErrorCode.BAD_PARAMS if response.status in (400, 429) else rpc.ErrorCode.FAILED)
            raise ServeRefused(code, message)
        (choice,) = data["choices"]
        return rpc.ServeGenerated(model=params.model, text=choice["text"], token_ids=choice["token_ids"],
                                  prompt_tokens=data["usage"]["prompt_tokens"], finish_reason=choice["finish_reason"],
                                  duration_s=round(time.monotonic() - started, 3))
