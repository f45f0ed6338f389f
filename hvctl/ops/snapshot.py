"""hvctl snapshot create|list|revert|rm: libvirt's internal qcow2 snapshots, charged in the ledger.

A snapshot lives inside the VM's overlay (QEMU's internal snapshots), so it needs no file of its own and goes when
the VM does. What libvirt 9.0 (Debian 12) can do decides the shape:

- a stopped VM: a disk snapshot;
- a running or paused VM: only with ``--memory`` (RAM and device state too, QEMU's savevm). libvirt refuses an
  internal disk-only snapshot of a running domain, and cannot revert external ones before 9.9;
- revert to a memory snapshot brings the VM back running as it was; revert to a disk snapshot needs the VM stopped.

Each snapshot counts against its tenant's disk quota and its host's disk (``snapshot_charge``), admitted in the
ledger transaction that records it. A VM with snapshots cannot be migrated: libvirt refuses to migrate a domain
with internal snapshots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hvctl.context import Context
from hvctl.errors import HvctlError, NotFound
from hvctl.host import DomainState
from hvctl.ledger import OperationRecord, SnapshotRecord
from hvctl.names import check_name
from hvctl.ops import Say, quiet
from hvctl.ops.intent import operation
from hvctl.ops.lifecycle import ledger_state
from hvctl.placement import admission_for


def create(ctx: Context, vm: str, name: str, memory: bool = False, say: Say = quiet) -> SnapshotRecord:
    check_name(name, "snapshot name")
    record = ctx.ledger.vms.get(vm)
    with operation(ctx, vm, "snapshot", data={"action": "create", "snapshot": name}, say=say) as op:
        guest = ctx.host(record.host).guest(vm)
        state = guest.state()
        if state in (DomainState.RUNNING, DomainState.PAUSED) and not memory:
            raise HvctlError(f"{vm} is {state.value}: a snapshot of a running VM must hold its memory too "
                             "(libvirt cannot take an internal disk-only snapshot of a running domain)",
                             hint=f"hvctl snapshot create {vm} {name} --memory, or `hvctl stop {vm}` first")
        if state not in (DomainState.RUNNING, DomainState.PAUSED, DomainState.SHUTOFF):
            raise HvctlError(f"{vm} is {state.value}; a snapshot needs it running, paused or stopped")
        if name in guest.snapshot_names():
            raise HvctlError(f"{vm}'s domain already has a snapshot named {name!r} that the ledger does not know",
                             hint=f"virsh snapshot-delete {vm} {name}, if it is not wanted")
        policy = ctx.policy
        admission = admission_for(ctx.ledger, policy, record.tenant, record.host)
        snap = ctx.ledger.snapshots.reserve(vm, name, memory, admission)
        op.step("reserved")
        try:
            say(f"taking snapshot {name}" + (" with the guest's memory (QEMU savevm)" if memory else ""))
            guest.snapshot_create(name, memory)
        except BaseException:
            ctx.ledger.snapshots.delete(vm, name, f"snapshot {name} failed; its charge released")
            raise
        op.step("taken")
        what = "disk and memory" if memory else "disk"
        ctx.ledger.snapshots.set_state(vm, name, "ready",
                                      f"snapshot {name} of {vm} ({what}; {snap.disk_gib:g} GiB charged)")
    return ctx.ledger.snapshots.get(vm, name)


@dataclass(frozen=True)
class SnapshotView:
    """A snapshot as the ledger charges it, and whether the VM's domain has it."""

    record: SnapshotRecord
    in_libvirt: bool

    def as_json(self) -> dict[str, Any]:
        return self.record.as_dict() | {"in_libvirt": self.in_libvirt}


def list_snapshots(ctx: Context, vm: str) -> list[SnapshotView]:
    """The ledger's snapshots of ``vm``."""
    record = ctx.ledger.vms.get(vm)
    guest = ctx.host(record.host).find_guest(vm)
    present = set(guest.snapshot_names()) if guest is not None else set()
    return [SnapshotView(s, s.name in present) for s in ctx.ledger.snapshots.all(vm)]


def revert(ctx: Context, vm: str, name: str, say: Say = quiet) -> str:
    """Returns the VM's state after the revert: running for a memory snapshot, stopped for a disk one."""
    record = ctx.ledger.vms.get(vm)
    snap = ctx.ledger.snapshots.get(vm, name)
    with operation(ctx, vm, "snapshot", data={"action": "revert", "snapshot": name}, say=say) as op:
        guest = ctx.host(record.host).guest(vm)
        in_libvirt = name in guest.snapshot_names()
        if snap.state != "ready" or not in_libvirt:
            raise HvctlError(f"snapshot {name} of {vm} is not usable ({snap.state}; "
                             f"{'in' if in_libvirt else 'missing from'} libvirt)")
        state = guest.state()
        if not snap.memory and state is not DomainState.SHUTOFF:
            raise HvctlError(f"{name} is a disk snapshot and {vm} is {state.value}: reverting its disk under a "
                             "running guest would lose what it has in memory", hint=f"hvctl stop {vm} first")
        say(f"reverting {vm} to {name}")
        guest.snapshot_revert(name)
        op.step("reverted")
        now = ledger_state(guest.state())
        ctx.ledger.vms.set_state(vm, now, f"reverted to snapshot {name}")
    return now


def remove(ctx: Context, vm: str, name: str, say: Say = quiet) -> None:
    record = ctx.ledger.vms.get(vm)
    ctx.ledger.snapshots.get(vm, name)
    with operation(ctx, vm, "snapshot", data={"action": "rm", "snapshot": name}, say=say) as op:
        ctx.ledger.snapshots.set_state(vm, name, "deleting", f"deleting snapshot {name}")
        op.step("marked")
        guest = ctx.host(record.host).guest(vm)
        if name in guest.snapshot_names():
            say(f"deleting snapshot {name}")
            guest.snapshot_delete(name)
        op.step("deleted")
        ctx.ledger.snapshots.delete(vm, name, f"snapshot {name} of {vm} deleted; its charge released")


def reconcile_snapshot(ctx: Context, op: OperationRecord) -> str:
    """An interrupted snapshot operation is settled by what libvirt has: a snapshot the ledger holds as
    'creating' or 'deleting' is kept (ready) if the domain has it and dropped if not; the VM's state follows
    libvirt's after an interrupted revert."""
    vm = op.vm
    try:
        record = ctx.ledger.vms.get(vm)
    except NotFound:
        ctx.ledger.operations.end(vm)
        return "the VM is gone"
    guest = ctx.host(record.host).find_guest(vm)
    present = set(guest.snapshot_names()) if guest is not None else set()
    settled = []
    for snap in ctx.ledger.snapshots.all(vm):
        if snap.state == "ready":
            continue
        if snap.name in present and snap.state == "creating":
            ctx.ledger.snapshots.set_state(vm, snap.name, "ready", f"an interrupted snapshot {snap.name} was made")
            settled.append(f"{snap.name} kept")
        elif snap.name in present:  # deleting: finish it
            assert guest is not None
            guest.snapshot_delete(snap.name)
            ctx.ledger.snapshots.delete(vm, snap.name, f"an interrupted removal of {snap.name} was finished")
            settled.append(f"{snap.name} removed")
        else:
            ctx.ledger.snapshots.delete(vm, snap.name, f"snapshot {snap.name} was never made, or is gone")
            settled.append(f"{snap.name} dropped")
    if guest is not None:
        now = ledger_state(guest.state())
        if record.state != now:
            ctx.ledger.vms.set_state(vm, now, f"after an interrupted snapshot operation libvirt says {now}")
    ctx.ledger.operations.end(vm)
    return ", ".join(settled) or "nothing to settle"
