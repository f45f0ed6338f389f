"""hvctl run / workloads / cancel / logs / checkpoint / restore: workloads inside a VM, driven through its agent.

The agent runs each workload as a child process (`python -m guest.workloads run KIND ... --json`); this module
starts it, follows its output through workload.logs, and returns the final status with the workload's JSON result.
Models live in the image (guest.kinds.MODELS_DIR, baked at build time); media files for perception are copied in over
SFTP first.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from guest import rpc
from guest.kinds import DEFAULT_LLM, MODELS_DIR, PERCEPTION_MODEL
from hvctl.access import copy, route_for
from hvctl.agent_client import AgentClient, AgentError
from hvctl.context import Context
from hvctl.errors import HvctlError, InvalidSpec, NotFound
from hvctl.ledger import VMRecord
from hvctl.limits import DEFAULT_MAX_DOWNLOAD_BYTES
from hvctl.seed import operator_key

CHECKPOINTS = "/var/lib/hvctl-agent/checkpoints"
OBJECTIVES = ("ssl", "rl", "seed-rl")
# The training workload's checkpoint names (guest/workloads/checkpoint.py): the only names hvctl accepts from a guest.
_CHECKPOINT_NAME = re.compile(r"ckpt-(\d{8})\.pt")


class WorkloadFailed(HvctlError):
    exit_code = 14


def operator_identity(ctx: Context, record: VMRecord) -> Path:
    """hvctl's own SSH key, for the copies hvctl makes into and out of a VM; refused for a VM that declined it."""
    if not record.spec.operator_key:
        raise InvalidSpec(f"{record.name} was created with --no-operator-key, so hvctl cannot copy files in or out "
                          "of it", hint="the tenant can: `hvctl cp -i THEIR_KEY`")
    return operator_key(ctx.paths.keys)


def agent_for(ctx: Context, record: VMRecord) -> AgentClient:
    if not record.agent_token:
        raise InvalidSpec(f"VM {record.name} has no agent (its image was built without one)")
    return ctx.agent(record.host, record.name, record.agent_token, timeout=60)


def workloads(client: AgentClient) -> list[rpc.WorkloadStatus]:
    """Every workload the VM's agent started since it booted (a checkpoint migration's restarts included), oldest
    first."""
    return sorted(client.typed("workload.list", rpc.WorkloadList).workloads, key=lambda w: int(w.id[1:]))


def latest_workload(client: AgentClient, name: str) -> str:
    known = workloads(client)
    if not known:
        raise NotFound(f"{name} has run no workload since it booted")
    return known[-1].id


def cancel(clients: dict[str, AgentClient], wid: str | None = None) -> list[tuple[str, rpc.WorkloadStatus]]:
    """Cancel, on each VM, workload ``wid`` or (None) every one still running: all signalled before any is waited
    for, so that the members of a distributed job go together instead of re-forming without each other. Returns
    (vm, status after) for each one cancelled; a ``wid`` a VM does not know is refused before any is touched."""
    targets: list[tuple[str, str]] = []
    for vm, client in clients.items():
        known = {w.id: w for w in workloads(client)}
        if wid is not None and wid not in known:
            raise NotFound(f"{vm} has no workload {wid}", hint=f"`hvctl workloads {vm}` lists them")
        targets += [(vm, w.id) for w in known.values() if (wid is None or w.id == wid) and w.state == "running"]
    with ThreadPoolExecutor(max_workers=max(len(targets), 1)) as pool:
        done = list(pool.map(lambda t: clients[t[0]].typed("workload.cancel", rpc.WorkloadStatus,
                                                           rpc.WorkloadRef(id=t[1])), targets))
    return [(vm, status) for (vm, _), status in zip(targets, done, strict=True)]


LLM_BACKENDS = ("eager", "fast", "onnx")
LLM_WEIGHTS = ("native", "int8")


def llm_args(prompts: list[str], max_new_tokens: int, stream: bool, temperature: float | None,
             top_p: float | None, seed: int | None, model: str | None, backend: str = "eager",
             weights: str = "native") -> list[str]:
    if not prompts:
        raise InvalidSpec("llm needs at least one --prompt")
    if backend not in LLM_BACKENDS:
        raise InvalidSpec(f"unknown llm backend {backend!r}; use {', '.join(LLM_BACKENDS)}")
    if weights not in LLM_WEIGHTS:
        raise InvalidSpec(f"unknown weight format {weights!r}; use {', '.join(LLM_WEIGHTS)}")
    if weights != "native" and backend != "fast":
        raise InvalidSpec(f"--weights {weights} runs on --backend fast only")
    args = ["--model", guest_model_dir(model), "--max-new-tokens", str(max_new_tokens),
            "--backend", backend, "--weights", weights]
    for prompt in prompts:
        args += ["--prompt", prompt]
    if stream:
        args.append("--stream")
    for flag, value in (("--temperature", temperature), ("--top-p", top_p), ("--seed", seed)):
        if value is not None:
            args += [flag, str(value)]
    return args


def perception_args(ctx: Context, record: VMRecord, text: str | None, image: Path | None,
                    audio: Path | None) -> list[str]:
    """Copy the media into the guest and point the workload at the copies."""
    if not (text or image or audio):
        raise InvalidSpec("perception needs at least one of --text, --image, --audio")
    args = ["--model", f"{MODELS_DIR}/{PERCEPTION_MODEL}"]
    if text:
        args += ["--text", text]
    remote_dir = f"/tmp/hvctl-run-{secrets.token_hex(4)}"
    key = operator_identity(ctx, record)
    for flag, local in (("--image", image), ("--audio", audio)):
        if local is None:
            continue
        if not local.is_file():
            raise InvalidSpec(f"{flag.lstrip('-')} file {local} does not exist")
        made = agent_for(ctx, record).typed("exec", rpc.ExecResult,
                                            rpc.ExecParams(argv=["mkdir", "-p", remote_dir]))
        if made.exit_code != 0:
            raise HvctlError(f"cannot create {remote_dir} in {record.name}: {made.stderr.strip()}")
        remote = f"{remote_dir}/{local.name}"
        copy(record, key, str(local), remote, upload=True, route=route_for(ctx, record))
        args += [flag, remote]
    return args


def guest_model_dir(model: str | None) -> str:
    """A model directory in the guest: an absolute path as given, or the name of a model baked into the image
    (the tiny LLM when None)."""
    if model is None:
        return f"{MODELS_DIR}/{DEFAULT_LLM}"
    if model.startswith("/"):
        return model
    if "/" in model or model in (".", ".."):
        raise InvalidSpec(f"--model {model!r}: give an absolute path in the guest, or the name of a model in the "
                          f"image (under {MODELS_DIR})")
    return f"{MODELS_DIR}/{model}"


def train_args(objective: str, steps: int, checkpoint_every: int, model: str | None = None,
               export: str | None = None) -> list[str]:
    args = ["--objective", check_objective(objective), "--steps", str(steps),
            "--checkpoint-every", str(checkpoint_every), "--checkpoint-dir", f"{CHECKPOINTS}/{objective}"]
    if objective == "ssl":
        args += ["--model", guest_model_dir(model)]
    elif model is not None or export is not None:
        raise InvalidSpec(f"--model and --export are for ssl training (a language model), not {objective}")
    if export is not None:
        if not export.startswith("/"):
            raise InvalidSpec(f"--export {export!r}: give an absolute directory in the guest")
        args += ["--export", export]
    return args


def start_workload(ctx: Context, record: VMRecord, kind: str, args: list[str]) -> rpc.WorkloadStatus:
    """Start workload ``kind`` in the VM and return at once (`hvctl run --detach`); the event log records it."""
    status = agent_for(ctx, record).typed("workload.start", rpc.WorkloadStatus,
                                          rpc.WorkloadStartParams(kind=kind, args=args))
    ctx.ledger.events.log(record.name, record.host, "workload.started", f"{kind} {status.id} started",
                         {"id": status.id, "kind": kind})
    return status


def run_workload(ctx: Context, record: VMRecord, kind: str, args: list[str], on_output: Callable[[str], None],
                 timeout: float | None = None, poll: float = 0.3) -> rpc.WorkloadStatus:
    """Run workload ``kind`` in the VM to its end, passing its output to ``on_output`` as it comes; the event log
    records how it ended. A timeout, or Ctrl-C, cancels it."""
    client = agent_for(ctx, record)
    status = client.typed("workload.start", rpc.WorkloadStatus, rpc.WorkloadStartParams(kind=kind, args=args))
    offset = 0
    started = time.monotonic()
    try:
        while True:
            logs = client.typed("workload.logs", rpc.WorkloadLogs,
                                rpc.WorkloadLogsParams(id=status.id, offset=offset))
            if logs.data:
                on_output(logs.data)
                offset = logs.next_offset
            status = client.typed("workload.status", rpc.WorkloadStatus, rpc.WorkloadRef(id=status.id))
            if status.state != "running" and logs.eof:
                ctx.ledger.events.log(record.name, record.host, "workload.finished",
                                     f"{kind} {status.id} {status.state}", {"id": status.id, "kind": kind})
                return status
            if timeout is not None and time.monotonic() - started > timeout:
                raise WorkloadFailed(f"workload {status.id} ran past {timeout:.0f} s; cancelled")
            time.sleep(poll)
    except (KeyboardInterrupt, WorkloadFailed):
        # Leave nothing running behind a client that went away.
        with contextlib.suppress(AgentError):
            client.call("workload.cancel", rpc.WorkloadRef(id=status.id))
        raise


def stream_text(chunk: str) -> list[str]:
    """Token texts from the workload's JSON-lines stream; other lines (the final result) are skipped."""
    texts = []
    for line in chunk.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and "token_id" in event:
            texts.append(str(event.get("text", "")))
    return texts


def check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise InvalidSpec(f"unknown objective {objective!r}; use {', '.join(OBJECTIVES)}")
    return objective


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint file name as the training workload writes it, or None for any other name."""
    match = _CHECKPOINT_NAME.fullmatch(name)
    return int(match[1]) if match else None


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}.pt"


def latest_checkpoint(ctx: Context, record: VMRecord, objective: str) -> tuple[str, int] | None:
    """The newest checkpoint's path in the guest and its step. The guest only lists its directory (an argv, no
    shell); hvctl keeps names that parse as a step and spells the path itself."""
    directory = f"{CHECKPOINTS}/{check_objective(objective)}"
    listed = agent_for(ctx, record).typed("exec", rpc.ExecResult, rpc.ExecParams(argv=["ls", "-1", directory]))
    steps = [step for line in listed.stdout.splitlines() if (step := checkpoint_step(line)) is not None]
    if not steps:
        return None
    return f"{directory}/{checkpoint_name(max(steps))}", max(steps)


def fetch_checkpoint(ctx: Context, record: VMRecord, objective: str, dest_dir: Path, force: bool = False,
                     max_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES) -> Path:
    key = operator_identity(ctx, record)
    latest = latest_checkpoint(ctx, record, objective)
    if latest is None:
        raise HvctlError(f"{record.name} has no {objective} checkpoint yet",
                         hint="run `hvctl run NAME train --checkpoint-every K` first")
    remote, step = latest
    try:
        dest_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidSpec(f"cannot create {dest_dir}: {exc.strerror}") from None
    local = dest_dir / checkpoint_name(step)
    copy(record, key, remote, str(local), upload=False, route=route_for(ctx, record), max_bytes=max_bytes,
         overwrite=force)
    return local


def push_checkpoint(ctx: Context, record: VMRecord, objective: str, checkpoint: Path) -> str:
    target_dir = f"{CHECKPOINTS}/{check_objective(objective)}"
    if not checkpoint.is_file():
        raise InvalidSpec(f"checkpoint {checkpoint} does not exist")
    step = checkpoint_step(checkpoint.name)
    if step is None:
        raise InvalidSpec(f"checkpoint {checkpoint.name}: the training workload resumes only from files named "
                          "ckpt-NNNNNNNN.pt", hint="keep the name `hvctl checkpoint` gave it")
    key = operator_identity(ctx, record)
    made = agent_for(ctx, record).typed("exec", rpc.ExecResult, rpc.ExecParams(argv=["mkdir", "-p", target_dir]))
    if made.exit_code != 0:
        raise HvctlError(f"cannot create {target_dir} in {record.name}: {made.stderr.strip()}")
    remote = f"{target_dir}/{checkpoint_name(step)}"
    copy(record, key, str(checkpoint), remote, upload=True, route=route_for(ctx, record))
    return remote
