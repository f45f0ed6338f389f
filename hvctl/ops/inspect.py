"""Read-only views: list, show, and drift between the ledger (what was asked) and libvirt (what runs)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any
from xml.etree import ElementTree as ET

from hvctl.context import Context
from hvctl.domain import Tuning
from hvctl.domain.tuning import LiveTuning
from hvctl.enforcement import Enforced, QemuCgroups, find_qemu_pid, libvirt_mismatches, mismatches
from hvctl.errors import HostUnreachable
from hvctl.host import DomainState
from hvctl.ledger import Event, OperationRecord, SnapshotRecord, VMRecord, VMState
from hvctl.ops.intent import holder_alive

# Ledger state → the libvirt states that agree with it.
_AGREES = {
    VMState.RUNNING: {DomainState.RUNNING},
    VMState.PAUSED: {DomainState.PAUSED},
    VMState.STOPPED: {DomainState.SHUTOFF},
}


@dataclass(frozen=True)
class Drift:
    vm: str
    host: str
    problem: str

    def as_dict(self) -> dict[str, str]:
        return {"vm": self.vm, "host": self.host, "problem": self.problem}


@dataclass(frozen=True)
class VMView:
    record: VMRecord
    actual: DomainState | None  # None: the host could not be reached.
    drift: str | None

    def as_dict(self) -> dict[str, Any]:
        data = self.record.as_dict()
        data["actual"] = self.actual.value if self.actual else "unreachable"
        data["drift"] = self.drift
        return data


def describe_drift(record: VMRecord, actual: DomainState) -> str | None:
    if record.state in (VMState.CREATING, VMState.DESTROYING):
        verb = "create" if record.state is VMState.CREATING else "destroy"
        return f"an interrupted {verb} left it half-done (libvirt: {actual.value})"
    if actual is DomainState.MISSING:
        return "in the ledger but libvirt has no such domain"
    if actual not in _AGREES.get(record.state, {actual}):
        if record.state == VMState.RUNNING and actual in (DomainState.SHUTOFF, DomainState.CRASHED):
            return f"the guest powered off or crashed outside hvctl (libvirt: {actual.value})"
        return f"ledger says {record.state}, libvirt says {actual.value}"
    return None


def list_vms(ctx: Context) -> tuple[list[VMView], list[Drift], list[Drift]]:
    """Every VM in the ledger with its live state; domains hvctl made that the ledger has forgotten; and the
    hosts that could not be asked."""
    views: list[VMView] = []
    orphans: list[Drift] = []
    unreachable: list[Drift] = []
    records = ctx.ledger.vms.all()
    operations = {op.vm: op for op in ctx.ledger.operations.all()}

    def drift(record: VMRecord, actual: DomainState) -> str | None:
        op = operations.get(record.name)
        if op is None:
            return describe_drift(record, actual)
        if holder_alive(op.holder, op.updated_at):
            return None  # in flight: what libvirt and the ledger say differs for a moment, by design
        return f"an interrupted {op.kind} (step {op.step}): `hvctl doctor --repair` finishes or undoes it"

    # Every registered host, not only those the ledger has VMs on: an orphan may be alone on its host.
    for host_name in sorted({r.host for r in records} | {h.name for h in ctx.ledger.hosts.all()} | {ctx.host_name}):
        try:
            host = ctx.host(host_name)
            states = host.domain_states()
            # The ledger's own VMs of this host are hvctl's whatever the domain says; only the others are asked.
            ours = host.hvctl_domains(skip=frozenset(r.name for r in records if r.host == host_name))
        except HostUnreachable as exc:
            views += [VMView(r, None, "host unreachable") for r in records if r.host == host_name]
            unreachable.append(Drift("", host_name, exc.message))
            continue
        for record in (r for r in records if r.host == host_name):
            actual = states.get(record.name, DomainState.MISSING)
            views.append(VMView(record, actual, drift(record, actual)))
        here = {r.name for r in records if r.host == host_name}
        where = {r.name: r.host for r in records}
        for n in sorted(ours - here):
            if n not in where:
                orphans.append(Drift(n, host_name, "domain made by hvctl but absent from the ledger: "
                                                   f"`hvctl adopt {n} --host {host_name}` takes it back, "
                                                   f"`hvctl destroy {n} --orphan --host {host_name}` removes it"))
            elif n not in operations or not holder_alive(operations[n].holder, operations[n].updated_at):
                # Not in flight (a migration's target has the domain until it commits): a second copy, or the
                # VM itself left here by an interrupted operation.
                orphans.append(Drift(n, host_name, f"a domain of {n}, which the ledger puts on {where[n]}: "
                                                   "`hvctl doctor --repair` if an operation was interrupted"))
    return sorted(views, key=lambda v: v.record.name), orphans, unreachable


def drift_report(ctx: Context) -> list[Drift]:
    views, orphans, unreachable = list_vms(ctx)
    return [Drift(v.record.name, v.record.host, v.drift) for v in views if v.drift] + orphans + unreachable


@dataclass(frozen=True)
class EnforcementReport:
    """A running VM's configured tuning next to what its host's libvirt reports applied, and on this machine what
    its QEMU process's cgroups enforce (``pid``/``enforced``, or ``error`` when no QEMU process was found)."""

    configured: Tuning
    live: LiveTuning
    mismatches: tuple[str, ...]
    pid: int | None = None
    enforced: Enforced | None = None
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return ({"configured": dict(self.configured.__dict__), "libvirt": self.live.as_dict(),
                 "mismatches": list(self.mismatches)}
                | ({"error": self.error} if self.error else {})
                | ({"pid": self.pid, "enforced": self.enforced.as_dict()} if self.enforced else {}))


def enforcement_report(ctx: Context, record: VMRecord) -> EnforcementReport | None:
    """For a running VM on any host: its enforcement report; None when it is not running."""
    guest = ctx.host(record.host).find_guest(record.name)
    if guest is None or guest.state() is not DomainState.RUNNING:
        return None
    configured = Tuning.from_xml(ET.fromstring(guest.xml()))  # only the tuning: any domain has one, or none
    live = guest.live_tuning()
    report = EnforcementReport(configured, live, tuple(libvirt_mismatches(configured, live)))
    if not ctx.is_this_machine(record.host):
        return report
    pid = find_qemu_pid(record.name)
    if pid is None:
        return dataclasses.replace(report, error="no local QEMU process found for this domain")
    enforced = QemuCgroups(pid).enforced()
    return dataclasses.replace(report, pid=pid, enforced=enforced,
                               mismatches=(*report.mismatches, *mismatches(configured, enforced)))


@dataclass(frozen=True)
class VMDetail:
    """Everything hvctl knows about one VM (`hvctl show`)."""

    view: VMView
    events: tuple[Event, ...]
    enforcement: EnforcementReport | None
    last_migration: dict[str, Any] | None  # the migration.completed event's data, as the migration recorded it
    snapshots: tuple[SnapshotRecord, ...]
    network: str | None  # the production network, in words
    operation: OperationRecord | None

    @property
    def record(self) -> VMRecord:
        return self.view.record

    def as_json(self) -> dict[str, Any]:
        op = self.operation
        return self.view.as_dict() | {
            "events": [{"ts": e.ts, "kind": e.kind, "message": e.message} for e in self.events],
            "enforcement": self.enforcement.as_json() if self.enforcement else None,
            "last_migration": self.last_migration,
            "snapshots": [s.as_dict() for s in self.snapshots],
            "network": self.network,
            "operation": None if op is None else {"kind": op.kind, "step": op.step, "target": op.target,
                                                  "started_at": op.started_at, "progress": op.progress},
        }


def show_vm(ctx: Context, name: str) -> VMDetail:
    """One VM: its ledger record, libvirt's state and any drift between them, its last events, enforcement, last
    migration, snapshots, production network and operation in progress."""
    record = ctx.ledger.vms.get(name)
    actual = ctx.host(record.host).state(name)
    net = record.spec.network
    return VMDetail(
        view=VMView(record, actual, describe_drift(record, actual)),
        events=tuple(ctx.ledger.events.recent(name, 20)),
        enforcement=enforcement_report(ctx, record),
        last_migration=ctx.ledger.events.last_data(name, "migration.completed"),
        snapshots=tuple(ctx.ledger.snapshots.all(name)),
        network=None if net is None else (
            f"tenant network {net.tenant_network}, {net.address}" if net.tenant_network else
            f"{'bridge ' + net.bridge if net.bridge else 'libvirt network ' + str(net.network)}, "
            f"{net.address or 'address by the guest'}"),
        operation=next((op for op in ctx.ledger.operations.all() if op.vm == name), None),
    )
