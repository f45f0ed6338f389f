"""hvctl serve / generate: the resident model server inside a VM, driven through its agent (guest/serving).

The server is the guest's: it runs in the VM, its models are directories in the VM (``--model tiny-llm`` names one
baked into the image under /opt/hvctl/models), and its API listens on the guest's loopback. A tenant reaches it
through an SSH port forward, printed ready to paste (``forward_command``); hvctl itself reaches it through the
agent channel (``generate``), so neither side imports torch. Starting waits, with progress, until every model asked
for is ready; a start that fails stops the server it started, so nothing is left behind.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path, PurePosixPath

from pydantic import ValidationError

from guest import rpc
from guest.validation import describe
from hvctl.access import openssh_command, route_for, write_pin
from hvctl.agent_client import AgentClient, AgentError
from hvctl.context import Context
from hvctl.errors import HvctlError, InvalidSpec, NotFound
from hvctl.ledger import VMRecord
from hvctl.ops import Say, quiet
from hvctl.ops.run import agent_for, guest_model_dir

DEFAULT_WAIT_S = 1800.0  # importing torch and loading a model under TCG take minutes; on KVM, seconds
POLL_S = 0.5


class ServeFailed(HvctlError):
    exit_code = 20


def served(model: str, name: str | None) -> rpc.ServedModel:
    directory = guest_model_dir(model)
    try:
        return rpc.ServedModel(name=name or PurePosixPath(directory).name, dir=directory)
    except ValueError as exc:
        raise InvalidSpec(f"bad model name {name or PurePosixPath(directory).name!r}: use letters, digits, '.', "
                          f"'_' and '-' (at most 64)") from exc


def _call(client: AgentClient, method: str, params: rpc.Model | None = None,
          timeout: float | None = None) -> rpc.ServeStatus:
    try:
        return client.typed(method, rpc.ServeStatus, params, timeout=timeout)
    except AgentError as exc:
        raise _refusal(exc) from None


def _refusal(exc: AgentError) -> HvctlError:
    """The agent's refusal as the CLI's error: a bad request is the caller's to fix, not the agent's failure."""
    if exc.code == rpc.ErrorCode.BAD_PARAMS:
        return InvalidSpec(exc.message)
    if exc.code == rpc.ErrorCode.NOT_FOUND:
        return NotFound(exc.message)
    if exc.code == rpc.ErrorCode.FAILED:
        return ServeFailed(exc.message)
    return exc


def status(ctx: Context, record: VMRecord) -> rpc.ServeStatus:
    return _call(agent_for(ctx, record), "serve.status")


def wait_models(client: AgentClient, names: list[str], wait_s: float, say: Say,
                min_version: dict[str, int] | None = None) -> rpc.ServeStatus:
    """Poll until each of ``names`` is ready (at ``min_version`` or later) or has failed; raises on failure."""
    deadline = time.monotonic() + wait_s
    started = time.monotonic()
    while True:
        now = _call(client, "serve.status")
        if now.state == "exited":
            raise ServeFailed(f"the model server exited: {now.error}")
        if now.state == "stopped":
            raise ServeFailed("the model server is not running (stopped by another command?)")
        models = {m.name: m for m in now.models}
        for name in names:
            entry = models.get(name)
            if entry is not None and entry.state == "failed":
                raise ServeFailed(f"model {name} failed to load: {entry.error}")
            if entry is not None and entry.pending is None and entry.error and min_version:
                raise ServeFailed(f"model {name}: {entry.error}")  # a reload that failed; the old weights serve on
        pending = [n for n in names if n not in models or models[n].state != "ready"
                   or models[n].version < (min_version or {}).get(n, 1)]
        if not pending:
            return now
        if time.monotonic() > deadline:
            raise ServeFailed(f"model(s) {', '.join(pending)} not ready after {wait_s:.0f} s",
                              hint="`hvctl serve NAME status` shows how far they got")
        what = "starting the server (Python imports torch)" if now.state == "starting" else \
            f"loading {', '.join(pending)}"
        say(f"{what}: {time.monotonic() - started:.0f} s")
        time.sleep(POLL_S)


def start(ctx: Context, record: VMRecord, models: list[rpc.ServedModel], *, port: int, max_seqs: int,
          max_tokens: int | None, backend: str = "cb", wait_s: float = DEFAULT_WAIT_S,
          say: Say = quiet) -> rpc.ServeStatus:
    client = agent_for(ctx, record)
    before = _call(client, "serve.status")
    fresh = before.state not in ("running", "starting")
    try:
        params = rpc.ServeStartParams(models=models, port=port, max_seqs=max_seqs, max_tokens=max_tokens,
                                      backend=backend)
    except ValidationError as exc:
        raise InvalidSpec(f"bad serve options: {describe(exc)}") from None
    _call(client, "serve.start", params)
    try:
        now = wait_models(client, [m.name for m in models], wait_s, say)
    except BaseException:
        if fresh:  # leave nothing behind: the server this command started goes with it
            with contextlib.suppress(HvctlError):
                _call(client, "serve.stop")
        else:
            for model in models:
                with contextlib.suppress(HvctlError):
                    client.typed("serve.unload", rpc.ServeStatus, rpc.ServeModelRef(name=model.name))
        raise
    ctx.ledger.events.log(record.name, record.host, "serve.started",
                         f"serving {', '.join(m.name for m in models)} on port {now.port}",
                         {"models": [m.model_dump() for m in models], "port": now.port})
    return now


def reload(ctx: Context, record: VMRecord, model: rpc.ServedModel, wait_s: float = DEFAULT_WAIT_S,
           say: Say = quiet) -> rpc.ServeStatus:
    client = agent_for(ctx, record)
    before = {m.name: m for m in _call(client, "serve.status").models}
    version = before[model.name].version if model.name in before else 0
    _call(client, "serve.reload", model)
    now = wait_models(client, [model.name], wait_s, say, min_version={model.name: version + 1})
    ctx.ledger.events.log(record.name, record.host, "serve.reloaded", f"model {model.name} now serves {model.dir}",
                         {"model": model.name, "dir": model.dir, "version": version + 1})
    return now


def unload(ctx: Context, record: VMRecord, name: str) -> rpc.ServeStatus:
    return _call(agent_for(ctx, record), "serve.unload", rpc.ServeModelRef(name=name))


def stop(ctx: Context, record: VMRecord) -> rpc.ServeStatus:
    client = agent_for(ctx, record)
    was = _call(client, "serve.status")
    now = _call(client, "serve.stop", timeout=90)
    if was.state != "stopped":
        ctx.ledger.events.log(record.name, record.host, "serve.stopped", "model server stopped", {})
    return now


def generate(ctx: Context, record: VMRecord, model: str, prompt: str, max_tokens: int,
             timeout_s: float = 300.0) -> rpc.ServeGenerated:
    client = agent_for(ctx, record)
    try:
        params = rpc.ServeGenerateParams(model=model, prompt=prompt, max_tokens=max_tokens, timeout_s=timeout_s)
    except ValidationError as exc:
        raise InvalidSpec(f"bad generate request: {describe(exc)}") from None
    try:
        return client.typed("serve.generate", rpc.ServeGenerated, params, timeout=timeout_s + 30)
    except AgentError as exc:
        raise _refusal(exc) from None


def forward_command(ctx: Context, record: VMRecord, port: int, local_port: int, identity: Path) -> list[str]:
    """The OpenSSH command a tenant runs to reach the server's API at http://127.0.0.1:LOCAL_PORT: the VM's SSH
    (through its host when it is on another one) with its pinned host key, and a forward to the guest's port."""
    known_hosts = ctx.paths.root / "known_hosts"
    write_pin(known_hosts, record)
    argv = openssh_command(record, route_for(ctx, record), identity, "root", known_hosts)
    return [*argv[:-1], "-N", "-L", f"{local_port}:127.0.0.1:{port}", argv[-1]]
