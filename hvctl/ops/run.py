"""hvctl run / logs / checkpoint / restore: workloads inside a VM, driven through its agent.

The agent runs each workload as a child process (`python -m guest.workloads run KIND ... --json`); this module
starts it, follows its output through workload.logs, and returns the final status with the workload's JSON result.
Models live in the image (/opt/hvctl/models, baked at build time); media files for perception are copied in over
SFTP first.
"""

from __future__ import annotations

import contextlib
import io
import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from guest import rpc
from hvctl.access import copy, run_command
from hvctl.agent_client import AgentClient, AgentError
from hvctl.context import Context
from hvctl.errors import HvctlError, InvalidSpec
from hvctl.ledger import VMRecord
from hvctl.seed import operator_key

MODELS = "/opt/hvctl/models"
CHECKPOINTS = "/var/lib/hvctl-agent/checkpoints"


class WorkloadFailed(HvctlError):
    exit_code = 14


def agent_for(record: VMRecord) -> AgentClient:
    if not record.agent_token:
        raise InvalidSpec(f"VM {record.name} has no agent (its image was built without one)")
    return AgentClient(record.agent_socket, record.agent_token, timeout=60)


def llm_args(prompts: list[str], max_new_tokens: int, stream: bool, temperature: float | None,
             top_p: float | None, seed: int | None, model: str | None) -> list[str]:
    if not prompts:
        raise InvalidSpec("llm needs at least one --prompt")
    args = ["--model", model or f"{MODELS}/tiny-llm", "--max-new-tokens", str(max_new_tokens)]
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
    args = ["--model", f"{MODELS}/perception"]
    if text:
        args += ["--text", text]
    remote_dir = f"/tmp/hvctl-run-{secrets.token_hex(4)}"
    key = operator_key(ctx.paths.keys)
    for flag, local in (("--image", image), ("--audio", audio)):
        if local is None:
            continue
        if not local.is_file():
            raise InvalidSpec(f"{flag.lstrip('-')} file {local} does not exist")
        if run_command(record, key, f"mkdir -p {remote_dir}", io.BytesIO(), io.BytesIO()) != 0:
            raise HvctlError(f"cannot create {remote_dir} in {record.name}")
        remote = f"{remote_dir}/{local.name}"
        copy(record, key, str(local), remote, upload=True)
        args += [flag, remote]
    return args


def train_args(objective: str, steps: int, checkpoint_every: int) -> list[str]:
    args = ["--objective", objective, "--steps", str(steps), "--checkpoint-every", str(checkpoint_every),
            "--checkpoint-dir", f"{CHECKPOINTS}/{objective}"]
    if objective == "ssl":
        args += ["--model", f"{MODELS}/tiny-llm"]
    return args


def run_workload(record: VMRecord, kind: str, args: list[str], on_output: Callable[[str], None],
                 timeout: float | None = None, poll: float = 0.3) -> rpc.WorkloadStatus:
    client = agent_for(record)
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


def train_progress(chunk: str) -> list[dict[str, object]]:
    """The training workload's per-step ``{"progress": ...}`` lines in a chunk of its output."""
    events = []
    for line in chunk.splitlines():
        if line.startswith('{"progress"'):
            try:
                events.append(json.loads(line)["progress"])
            except (ValueError, KeyError):
                continue
    return events


def latest_checkpoint(record: VMRecord, objective: str) -> str | None:
    result = agent_for(record).typed("exec", rpc.ExecResult, rpc.ExecParams(
        argv=["sh", "-c", f"ls -1 {CHECKPOINTS}/{objective} 2>/dev/null | grep ^ckpt- | sort | tail -1"]))
    name = result.stdout.strip()
    return f"{CHECKPOINTS}/{objective}/{name}" if name else None


def fetch_checkpoint(ctx: Context, record: VMRecord, objective: str, dest_dir: Path) -> Path:
    remote = latest_checkpoint(record, objective)
    if remote is None:
        raise HvctlError(f"{record.name} has no {objective} checkpoint yet",
                         hint="run `hvctl run NAME train --checkpoint-every K` first")
    dest_dir.mkdir(parents=True, exist_ok=True)
    local = dest_dir / Path(remote).name
    copy(record, operator_key(ctx.paths.keys), remote, str(local), upload=False)
    return local


def push_checkpoint(ctx: Context, record: VMRecord, objective: str, checkpoint: Path) -> str:
    if not checkpoint.is_file():
        raise InvalidSpec(f"checkpoint {checkpoint} does not exist")
    key = operator_key(ctx.paths.keys)
    target_dir = f"{CHECKPOINTS}/{objective}"
    run_command(record, key, f"mkdir -p {target_dir}", io.BytesIO(), io.BytesIO())
    remote = f"{target_dir}/{checkpoint.name}"
    copy(record, key, str(checkpoint), remote, upload=True)
    return remote
