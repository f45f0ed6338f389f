"""hvctl wait NAME --for agent|ssh|stopped, and hvctl exec over the agent channel."""

from __future__ import annotations

import time

from guest import rpc
from guest.rpc import ExecResult
from hvctl.access import AccessError, HostKeyMismatch, route_for, wait_for_ssh
from hvctl.agent_client import AgentError
from hvctl.context import Context
from hvctl.errors import GuestTimeout, HvctlError
from hvctl.host import DomainState
from hvctl.ledger import VMRecord, VMState
from hvctl.ops.intent import OperationBusy, operation
from hvctl.seed import operator_key

CONDITIONS = ("agent", "ssh", "stopped")
# How often a wait for the domain to stop asks libvirt.
STOP_POLL_S = 0.2


def wait(ctx: Context, name: str, condition: str, timeout: float) -> float:
    """Block until ``condition`` holds for VM ``name``; returns the seconds waited. GuestTimeout past ``timeout``.

    - agent: the agent answered a ping with this VM's token (over the host-only channel);
    - ssh: an authenticated SSH session with the VM's pinned host key succeeded, the way `hvctl ssh` connects;
    - stopped: the domain is shut off. If the guest powered itself off, the ledger records it as stopped.

    No operation lock is held while waiting, so other commands (`hvctl stop` from another shell) go ahead."""
    if condition not in CONDITIONS:
        raise HvctlError(f"unknown condition {condition!r}; use {', '.join(CONDITIONS)}")
    record = ctx.ledger.vms.get(name)
    started = time.monotonic()
    if condition == "agent":
        if not record.agent_token:
            raise HvctlError(f"VM {name} has no agent (image {record.image} was built without one)")
        try:
            ctx.agent(record.host, name, record.agent_token).wait_ready(timeout)
        except AgentError as exc:
            raise GuestTimeout(f"the agent of {name} did not answer within {timeout:g} s: {exc.message}") from None
    elif condition == "ssh":
        if not record.host_pubkey:
            raise HvctlError(f"VM {name} has no SSH (image {record.image} was built without sshd)")
        if not record.spec.operator_key:
            raise HvctlError(f"VM {name} was created with --no-operator-key: only its tenant's keys open it, so hvctl "
                             "cannot tell when SSH is up", hint=f"hvctl wait {name} --for agent")
        try:
            wait_for_ssh(record, operator_key(ctx.paths.keys), timeout, route_for(ctx, record))
        except HostKeyMismatch:
            raise
        except AccessError as exc:
            raise GuestTimeout(exc.message) from None
    else:
        _wait_stopped(ctx, record, timeout)
    return time.monotonic() - started


def _wait_stopped(ctx: Context, record: VMRecord, timeout: float) -> None:
    host = ctx.host(record.host)
    deadline = time.monotonic() + timeout
    while host.state(record.name) not in (DomainState.SHUTOFF, DomainState.MISSING):
        if time.monotonic() >= deadline:
            raise GuestTimeout(f"{record.name} did not stop within {timeout:g} s "
                               f"(libvirt: {host.state(record.name).value})")
        time.sleep(STOP_POLL_S)
    try:
        with operation(ctx, record.name, "wait"):
            now = ctx.ledger.vms.get(record.name)
            if now.state in (VMState.RUNNING, VMState.PAUSED) and host.state(record.name) is DomainState.SHUTOFF:
                ctx.ledger.vms.set_state(record.name, VMState.STOPPED,
                                         f"{record.name} powered off (seen by hvctl wait)")
    except OperationBusy:
        pass  # the command that holds the VM (a stop, a destroy) records what it did itself


def has_ssh_path(ctx: Context, record: VMRecord) -> bool:
    """Whether `hvctl exec` can reach the VM over SSH with the operator key: it has sshd (a pinned host key), the
    operator key was authorised at create, and its forward can be reached from here."""
    if not record.host_pubkey or not record.spec.operator_key:
        return False
    try:
        route_for(ctx, record)
    except AccessError:
        return False
    return True


def exec_over_agent(ctx: Context, record: VMRecord, argv: list[str], timeout: float,
                    stdin: bytes = b"") -> ExecResult:
    """Run ``argv`` in the guest through its agent: no guest network involved. The output comes back whole when the
    command ends (capped at the agent's limit, the end kept); a command past ``timeout`` is killed by the agent."""
    if not record.agent_token:
        raise HvctlError(f"VM {record.name} has no agent (image {record.image} was built without one)")
    limit = rpc.MAX_MESSAGE_BYTES // 2
    if len(stdin) > limit:
        raise HvctlError(f"input of {len(stdin)} bytes is over the agent's {limit} byte limit",
                         hint="copy large inputs in with `hvctl cp`")
    agent = ctx.agent(record.host, record.name, record.agent_token)
    params = rpc.ExecParams(argv=argv, timeout_s=timeout, stdin=stdin.decode(errors="replace"))
    return agent.typed("exec", rpc.ExecResult, params, timeout=timeout + 30)
