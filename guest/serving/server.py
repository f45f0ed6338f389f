"""The resident model server process: the OpenAI-compatible API, its models, and an admin socket for the agent.

``python -m guest.serving serve --state-dir DIR --port P --model NAME=DIR ...`` binds the API on 127.0.0.1:P and
the admin API on ``DIR/admin.sock`` (a unix socket only root reaches) at once, before torch is imported, and loads
its models in the background: a model is ``loading``, then ``ready`` (or ``failed``, with the reason). The agent
starts it in its own session, so it outlives the agent, and drives it through the admin socket:

- ``GET /status``: the server and each model (state, version, directory, memory, sequences in flight);
- ``POST /load {"name", "dir"}``: load another model beside the others;
- ``POST /reload {"name", "dir"}``: load new weights beside the old and switch atomically once they are ready:
  requests already admitted finish on the old weights, later ones get the new, none fails; the old engine stops
  when its last request is done;
- ``POST /unload {"name"}``.

Every load is checked against the VM's available memory first (``guest.serving.memory``) and refused with the
numbers when it would not fit.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from guest.serving import api, memory

BACKENDS = ("cb",)  # transformers' continuous batching (guest/serving/engine.py)
DEFAULT_MAX_SEQS = 16
ADMIN_SOCKET = "admin.sock"


class AdminError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Entry:
    name: str
    dir: str
    state: str = "loading"  # loading, ready, failed
    version: int = 0
    footprint_mib: int = 0
    loaded_at: float | None = None
    error: str | None = None
    pending: str | None = None  # a reload's directory while its weights load beside the served ones


@dataclass
class Registry:
    """The models the API serves (``models``, the dict the HTTP handlers read) and their lifecycle."""

    max_seqs: int
    max_tokens: int | None
    meminfo: Path = Path("/proc/meminfo")
    models: dict[str, api.Model] = field(default_factory=dict)
    entries: dict[str, Entry] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _reserved_mib: int = 0  # loads under way: counted before their memory shows up as used
    _threads: list[threading.Thread] = field(default_factory=list)

    def load(self, name: str, directory: str, *, replace: bool = False) -> Entry:
        """Check and start loading (in the background); returns the entry as it is now. Refusals raise
        AdminError at once: an unknown or taken name, a bad directory, memory that is not there."""
        path = Path(directory)
        try:
            needed = memory.footprint(path, self.max_seqs, self.max_tokens)
        except memory.BadModelDir as exc:
            raise AdminError(400, str(exc)) from None
        with self._lock:
            entry = self.entries.get(name)
            if replace and (entry is None or entry.state != "ready"):
                raise AdminError(409, f"no model {name} is being served, so there is nothing to reload; load it")
            if not replace and entry is not None and entry.state != "failed":
                raise AdminError(409, f"model {name} is already {entry.state}; reload swaps its weights")
            if replace and entry is not None and entry.pending:
                raise AdminError(409, f"model {name} is already reloading from {entry.pending}")
            try:
                memory.check_fits(name, needed, runtime=False, meminfo=self.meminfo, reserved_mib=self._reserved_mib)
            except memory.DoesNotFit as exc:
                raise AdminError(507, str(exc)) from None
            self._reserved_mib += needed.mib
            if replace:
                assert entry is not None
                entry.pending = directory
            else:
                entry = self.entries[name] = Entry(name, directory, footprint_mib=needed.mib)
            snapshot = Entry(**entry.__dict__)
        thread = threading.Thread(target=self._load, args=(name, path, needed, replace), name=f"load-{name}",
                                  daemon=True)
        self._threads.append(thread)
        thread.start()
        return snapshot

    def _load(self, name: str, path: Path, needed: memory.Footprint, replace: bool) -> None:
        try:
            loaded = _load_model(name, path, self.max_seqs, needed.context)
        except Exception as exc:  # noqa: BLE001 - a model that fails to load must not take the server with it
            with self._lock:
                self._reserved_mib -= needed.mib
                entry = self.entries[name]
                if replace:
                    entry.pending = None
                    entry.error = f"reload from {path} failed: {type(exc).__name__}: {exc}"
                else:
                    entry.state, entry.error = "failed", f"{type(exc).__name__}: {exc}"
            return
        with self._lock:
            self._reserved_mib -= needed.mib
            entry = self.entries[name]
            old = self.models.get(name)
            self.models[name] = loaded  # the switch: the next request's lookup finds the new weights
            entry.state, entry.dir, entry.version = "ready", str(path), entry.version + 1
            entry.footprint_mib, entry.loaded_at, entry.error, entry.pending = needed.mib, time.time(), None, None
        if old is not None:
            _retire(old)

    def unload(self, name: str) -> None:
        with self._lock:
            entry = self.entries.get(name)
            if entry is None:
                raise AdminError(404, f"no model {name}")
            if entry.state == "loading" or entry.pending:
                raise AdminError(409, f"model {name} is still loading; unload it once it is ready or failed")
            del self.entries[name]
            old = self.models.pop(name, None)
        if old is not None:
            _retire(old)

    def states(self) -> dict[str, str]:
        """Each model asked for, by name: loading, ready or failed."""
        with self._lock:
            return {name: entry.state for name, entry in self.entries.items()}

    def status(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = []
            for entry in self.entries.values():
                served = self.models.get(entry.name)
                rows.append(entry.__dict__ | {"in_flight": served.engine.in_flight if served else 0,
                                              "context": served.engine.context if served else None})
            return rows

    def stop(self) -> None:
        with self._lock:
            served, self.models = list(self.models.values()), {}
        for model in served:
            model.engine.stop()


def _retire(old: api.Model) -> None:
    """No new request reaches ``old`` (``Engine.retire``); it stops once the requests it admitted are done."""
    old.engine.retire()

    def drain() -> None:
        while old.engine.in_flight:
            time.sleep(0.05)
        old.engine.stop()

    threading.Thread(target=drain, name=f"drain-{old.name}", daemon=True).start()


def _load_model(name: str, path: Path, max_seqs: int, context: int) -> api.Model:
    # torch and transformers load with the first model: the server answers /health and its control socket before.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from guest.serving.engine import Engine

    tokenizer = AutoTokenizer.from_pretrained(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else "auto"
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model = model.to(device).eval()
    eos = tokenizer.eos_token_id if isinstance(tokenizer.eos_token_id, int) else None
    engine = Engine(model, max_queue=max_seqs, eos_token_id=eos, max_context=context).start()
    return api.Model(name, engine, tokenizer)


# -- the admin socket --------------------------------------------------------------------------------------------


class UnixHTTPServer(ThreadingHTTPServer):
    address_family = socket.AF_UNIX

    def server_bind(self) -> None:
        # HTTPServer.server_bind would look the path up as a host name.
        self.socket.bind(self.server_address)
        self.server_name, self.server_port = "localhost", 0


def make_admin(registry: Registry, path: Path, info: dict[str, Any]) -> UnixHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass

        def do_GET(self) -> None:  # noqa: N802 - the base class's name
            if self.path == "/status":
                self._reply(200, info | {"models": registry.status()})
            else:
                self._reply(404, {"error": f"no such path {self.path}"})

        def do_POST(self) -> None:  # noqa: N802 - the base class's name
            try:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(min(length, 1 << 16)) or b"{}")
                if not isinstance(body, dict) or not isinstance(body.get("name"), str):
                    raise AdminError(400, "the body must be a JSON object with a string name")
                if self.path in ("/load", "/reload"):
                    if not isinstance(body.get("dir"), str):
                        raise AdminError(400, "dir must be a string")
                    entry = registry.load(body["name"], body["dir"], replace=self.path == "/reload")
                    self._reply(202, entry.__dict__)
                elif self.path == "/unload":
                    registry.unload(body["name"])
                    self._reply(200, {"unloaded": body["name"]})
                else:
                    raise AdminError(404, f"no such path {self.path}")
            except AdminError as exc:
                self._reply(exc.status, {"error": exc.message})
            except ValueError as exc:
                self._reply(400, {"error": f"the body is not JSON: {exc}"})

        def _reply(self, status: int, data: dict[str, Any]) -> None:
            payload = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    path.unlink(missing_ok=True)
    old_umask = os.umask(0o077)  # the socket is root's alone
    try:
        return UnixHTTPServer(str(path), Handler)  # type: ignore[arg-type]
    finally:
        os.umask(old_umask)


class UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTP client connection over a unix socket (the agent's side of the admin API)."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


def admin_call(path: Path, method: str, url: str, body: dict[str, Any] | None = None,
               timeout: float = 10.0) -> tuple[int, dict[str, Any]]:
    conn = UnixHTTPConnection(str(path), timeout=timeout)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        conn.request(method, url, body=payload, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


# -- the process -------------------------------------------------------------------------------------------------


def parse_model(value: str) -> tuple[str, str]:
    name, sep, directory = value.partition("=")
    if not sep or not name or not directory:
        raise argparse.ArgumentTypeError(f"--model takes NAME=DIR, not {value!r}")
    return name, directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m guest.serving", description="hvctl's resident model server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--state-dir", type=Path, required=True)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--model", type=parse_model, action="append", default=[])
    serve.add_argument("--max-seqs", type=int, default=DEFAULT_MAX_SEQS)
    serve.add_argument("--max-tokens", type=int, default=None)
    serve.add_argument("--backend", choices=BACKENDS, default="cb")
    args = parser.parse_args(argv)

    args.state_dir.mkdir(parents=True, exist_ok=True)
    registry = Registry(args.max_seqs, args.max_tokens)
    try:
        http_server = api.make_server(registry.models, (args.host, args.port), registry.states)
    except OSError as exc:
        print(f"serve: error: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 2
    info = {"pid": os.getpid(), "host": args.host, "port": http_server.server_address[1], "backend": args.backend,
            "max_seqs": args.max_seqs, "max_tokens": args.max_tokens, "started_at": time.time()}
    admin = make_admin(registry, args.state_dir / ADMIN_SOCKET, info)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    threads = [threading.Thread(target=s.serve_forever, name=n, daemon=True)
               for s, n in ((http_server, "api"), (admin, "admin"))]
    for thread in threads:
        thread.start()
    print(json.dumps({"listening": info}), flush=True)
    for name, directory in args.model:
        try:
            registry.load(name, directory)
        except AdminError as exc:
            print(f"serve: model {name}: {exc.message}", file=sys.stderr, flush=True)
    stopping.wait()
    print("serve: stopping", file=sys.stderr, flush=True)
    http_server.shutdown()
    admin.shutdown()
    registry.stop()
    http_server.server_close()
    admin.server_close()
    (args.state_dir / ADMIN_SOCKET).unlink(missing_ok=True)
    return 0
