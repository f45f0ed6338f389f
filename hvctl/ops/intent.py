"""Durable intents and per-VM operation locks: what makes an operation killed at any step recoverable.

An operation that changes the world (create, destroy, start, stop, a live migration) first writes a row in the
ledger's ``operations`` table: the VM, the hosts, the domain's UUID, and who holds it (this machine, boot and
process). The row is the VM's operation lock, so two mutating commands on one VM never interleave; it records each
step reached and what exists so far; and it goes away when the operation ends, whether it finished or rolled back.
A row left behind means the holder died mid-way. Then ``reconcile`` asks the hosts where the domain with that UUID
really runs (libvirt is the truth for what runs) and finishes the operation or rolls it back: at ``hvctl doctor
--repair``, or when the next command on that VM finds the lock held by a dead process.

``HVCTL_CRASH_AFTER=KIND.STEP`` makes hvctl SIGKILL itself right after recording that step: how the tests crash
every step on purpose, with no timing involved. ``HVCTL_FAIL_AFTER=KIND.STEP`` raises :class:`InjectedFault` there
instead, so the operation's own error path (its undo) runs: how the tests make an operation fail at a chosen step
without depending on how fast the machine is.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvctl.context import Context
from hvctl.errors import HostUnreachable, HvctlError
from hvctl.ledger import OperationRecord
from hvctl.ops import Say

CRASH_ENV = "HVCTL_CRASH_AFTER"
FAIL_ENV = "HVCTL_FAIL_AFTER"
# A holder on another controller machine cannot be checked for life from here: its lock is trusted until it has
# not recorded a step for this long.
LEASE_S = 900.0
# How often a command waiting (--wait) for another's lock asks again.
WAIT_POLL_S = 0.25


class OperationBusy(HvctlError):
    """Another command is operating on this VM right now."""

    exit_code = 16


class InjectedFault(HvctlError):
    """The failure a test asked for with ``HVCTL_FAIL_AFTER``."""


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> str:
    """The process's start time (field 22 of /proc/PID/stat): a pid reused by another process has another one."""
    stat = _read(f"/proc/{pid}/stat")
    return stat.rsplit(")", 1)[1].split()[19] if ")" in stat else ""


def this_holder() -> str:
    """Who this process is, for a lock: machine, boot, pid and the pid's start time."""
    pid = os.getpid()
    return f"{_read('/etc/machine-id') or 'unknown'}/{_read('/proc/sys/kernel/random/boot_id')}/{pid}/" \
           f"{_start_ticks(pid)}"


def holder_alive(holder: str, updated_at: float) -> bool:
    """Whether the process that wrote ``holder`` still runs. On this machine that is checked exactly (same boot,
    same pid with the same start time); a holder on another machine is trusted until its lease runs out."""
    machine, boot, pid, ticks = (holder.split("/") + ["", "", "", ""])[:4]
    if machine != (_read("/etc/machine-id") or "unknown"):
        return time.time() - updated_at < LEASE_S
    if boot != _read("/proc/sys/kernel/random/boot_id") or not pid.isdigit():
        return False
    return _start_ticks(int(pid)) == ticks


def describe(op: OperationRecord) -> str:
    source = op.source or op.data.get("source")
    where = (f" from {source}" if source else "") + (f" to {op.target}" if op.target else "")
    return f"{op.kind} of {op.vm}{where} (step {op.step}, started {time.ctime(op.started_at)})"


@dataclass
class Operation:
    ctx: Context
    vm: str
    kind: str
    holder: str

    def step(self, name: str, **data: Any) -> None:
        """Record that ``name`` is done and what it made; then the crash hook may fire."""
        self.ctx.ledger.operations.step(self.vm, self.holder, name, data)
        here = f"{self.kind}.{name}"
        if os.environ.get(CRASH_ENV) == here:
            os.kill(os.getpid(), signal.SIGKILL)
        if os.environ.get(FAIL_ENV) == here:
            raise InjectedFault(f"fault injected after step {name} ({FAIL_ENV}={here})")


    def progress(self, data: dict[str, Any]) -> None:
        """How far the current step has got (a migration's bytes), for other shells to see; the step stays."""
        self.ctx.ledger.operations.progress(self.vm, self.holder, data)


@contextmanager
def operation(ctx: Context, vm: str, kind: str, *, source: str | None = None, target: str | None = None,
              data: dict[str, Any] | None = None, say: Say | None = None) -> Iterator[Operation]:
    """Hold VM ``vm``'s operation lock for the block, with its intent row. A lock left by a dead holder is
    reconciled first; one held by a live process refuses with who holds it. The row goes when the block ends,
    however it ends: the caller has finished or rolled back by then. Only a crash leaves it."""
    holder = this_holder()
    held = ctx.ledger.operations.begin(vm, kind, holder, source, target, data or {})
    deadline = time.monotonic() + ctx.lock_wait_s
    if held is not None and holder_alive(held.holder, held.updated_at) and ctx.lock_wait_s > 0 and say:
        say(f"waiting up to {ctx.lock_wait_s:g} s for the {describe(held)} to end")
    while held is not None and holder_alive(held.holder, held.updated_at) and time.monotonic() < deadline:
        time.sleep(min(WAIT_POLL_S, max(deadline - time.monotonic(), 0.0)))
        held = ctx.ledger.operations.begin(vm, kind, holder, source, target, data or {})
    if held is not None:
        if holder_alive(held.holder, held.updated_at):
            raise OperationBusy(f"{vm} is busy: {describe(held)} is in progress",
                                hint="wait for it to finish (`hvctl --wait SECONDS …` waits), then try again")
        if say:
            say(f"an interrupted {describe(held)} is reconciled first")
        outcome = reconcile(ctx, held)
        held = ctx.ledger.operations.begin(vm, kind, holder, source, target, data or {})
        if held is not None:
            raise OperationBusy(f"{vm}: an interrupted {describe(held)} could not be reconciled: {outcome}",
                                hint="`hvctl doctor --repair` once every host involved answers")
    try:
        yield Operation(ctx, vm, kind, holder)
    finally:
        ctx.ledger.operations.end(vm, holder)


def reconcile(ctx: Context, op: OperationRecord) -> str:
    """Finish or roll back one interrupted operation. Returns what was done; the row is removed when decided,
    and kept (with the reason returned) when a host involved cannot be asked or the outcome is not yet known.
    Each kind's reconciler is imported here: those modules run their operations under ``operation`` from this one."""
    try:
        if op.kind == "migrate":
            from hvctl.ops.migrate import reconcile_migration

            return reconcile_migration(ctx, op)
        if op.kind == "migrate-checkpoint":
            from hvctl.ops.ckpt_migrate import reconcile_checkpoint_migration

            return reconcile_checkpoint_migration(ctx, op)
        if op.kind == "rotate-token":
            from hvctl.ops.keys import reconcile_rotation

            return reconcile_rotation(ctx, op)
        if op.kind == "create":
            from hvctl.ops.create import reconcile_create

            return reconcile_create(ctx, op)
        if op.kind in ("start", "stop", "restart", "pause", "resume"):
            from hvctl.ops.lifecycle import reconcile_power

            return reconcile_power(ctx, op)
        if op.kind == "resize":
            from hvctl.ops.resize import reconcile_resize

            return reconcile_resize(ctx, op)
        if op.kind == "snapshot":
            from hvctl.ops.snapshot import reconcile_snapshot

            return reconcile_snapshot(ctx, op)
        if op.kind == "destroy":
            from hvctl.ops.lifecycle import reconcile_destroy

            return reconcile_destroy(ctx, op)
        if op.kind == "destroy-orphan":
            ctx.ledger.operations.end(op.vm)  # nothing the ledger tracks: running it again finishes the job
            return "no ledger state to mend; `hvctl destroy --orphan` again removes what is left"
        if op.kind == "adopt":
            ctx.ledger.operations.end(op.vm)  # its one write is a single transaction: done or not at all
            return "nothing to mend: the VM was adopted, or is still an orphan that `hvctl adopt` can take"
    except HostUnreachable as exc:
        return f"undecided: {exc.message}"
    return f"undecided: hvctl does not know how to reconcile a {op.kind}"


def interrupted(ctx: Context) -> list[OperationRecord]:
    """Operations whose holder is dead: what `doctor` reports and `doctor --repair` reconciles."""
    return [op for op in ctx.ledger.operations.all() if not holder_alive(op.holder, op.updated_at)]
