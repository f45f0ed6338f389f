"""hvctl doctor: is this host able to run hvctl's VMs, and does the ledger agree with libvirt?"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from hvctl import passthrough
from hvctl.context import Context, can_limit_memory
from hvctl.errors import HostUnreachable, HvctlError, HypervisorError, LedgerError
from hvctl.host import libvirt_version
from hvctl.ledger import OperationRecord
from hvctl.ledger.core import open_store
from hvctl.ops.inspect import drift_report, enforcement_report
from hvctl.ops.intent import describe, interrupted, reconcile
from hvctl.ops.networks import repair_vxlan, vxlan_gaps
from vfio import host_checks


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    hint: str | None = None
    # A warning does not fail the doctor: the host works, but a capability (such as GPU passthrough) is absent.
    warning: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "warning": self.warning, "detail": self.detail, "hint": self.hint}


def run_checks(ctx: Context) -> list[Check]:
    """Every check, in order. Without a usable state dir or an answering libvirtd the rest cannot run."""
    checks, usable = _state_checks(ctx)
    if not usable:
        return checks
    checks.append(_libvirtd_check(ctx))
    if not checks[-1].ok:
        return checks
    checks += [_hosts_check(ctx), _images_check(ctx), _accelerator_check(ctx), *_passthrough_checks(),
               *_memory_limit_checks(ctx), _enforcement_check(ctx), _vxlan_check(ctx), _gpu_bindings_check(ctx),
               _gpu_health_check(ctx)]
    stopped = interrupted(ctx)
    checks += [_operations_check(stopped), _drift_check(ctx, bool(stopped))]
    return checks


def _ledger_check(ctx: Context) -> tuple[Check, bool]:
    """The ledger's backend, its version and, on PostgreSQL, whether it is a standby and what replicates from it;
    and whether the ledger could be opened at all (the other checks need it)."""
    try:
        info = ctx.ledger.store.describe()
    except LedgerError as exc:
        return _unusable_ledger(ctx, exc), False
    detail = f"{info.location} ({info.backend} {info.version}, schema v{info.schema}"
    if info.backend == "postgresql":
        replicas = ", ".join(f"{r.name} {r.state}/{r.sync}" for r in info.replicas) or "none"
        detail += f"; {'a standby' if info.standby else 'primary'}, replicas: {replicas}"
    if info.standby:
        return Check("ledger", False, detail + ")", "a standby is read-only: point --ledger at the primary"), True
    if info.backend == "postgresql":
        # Every controller reads the hosts' URIs from the one ledger: one without a host name means each
        # controller's own machine, a different host for each.
        local = [h.name for h in ctx.ledger.hosts.all() if not urlsplit(h.uri).hostname]
        if local:
            return Check("ledger", True, detail + f"); host(s) {', '.join(local)} have machine-local URIs, which "
                         "name a different machine for each controller sharing this ledger",
                         "register hosts by an address every controller reaches (qemu+ssh://…, qemu+tls://…)",
                         warning=True), True
    return Check("ledger", True, detail + ")"), True


def _unusable_ledger(ctx: Context, exc: LedgerError) -> Check:
    """Why the ledger cannot be used: a standby (read-only) is named as one; anything else as it was reported."""
    try:
        store = open_store(ctx.ledger_url or ctx.paths.ledger)
        try:
            standby = store.describe().standby
        finally:
            store.close()
    except HvctlError:
        standby = False
    if standby:
        return Check("ledger", False, f"{ctx.ledger_location} is a standby (read-only): {exc.message}",
                     "a standby is read-only: point --ledger at the primary")
    return Check("ledger", False, exc.message, exc.hint)


def _state_checks(ctx: Context) -> tuple[list[Check], bool]:
    """The state dir and the ledger in it, and whether the other checks can run."""
    checks: list[Check] = []
    try:
        ctx.paths.ensure()
        writable = os.access(ctx.paths.root, os.W_OK)
        checks.append(Check("state dir", writable, str(ctx.paths.root),
                            None if writable else "run as root or pass --state-dir"))
        ledger, usable = _ledger_check(ctx)
        checks.append(ledger)
        if not usable:  # nothing else can run without it
            return checks, False
    except HvctlError as exc:
        return [*checks, Check("state dir", False, exc.message, exc.hint)], False
    return checks, True


def _libvirtd_check(ctx: Context) -> Check:
    try:
        facts = ctx.host().facts()
        return Check("libvirtd", True, f"{ctx.connected_uri}: libvirt {libvirt_version()}, {facts.cpus} CPUs, "
                                       f"{facts.memory_mib} MiB")
    except HvctlError as exc:
        return Check("libvirtd", False, exc.message, exc.hint or "start libvirtd (`make daemons`)")


def _images_check(ctx: Context) -> Check:
    images = ctx.images.list()
    damaged = []
    for image in images:
        try:
            image.verify()
        except HvctlError as exc:
            damaged.append(exc.message)
    if not images:
        return Check("images", False, "no images built", "run `hvctl image build minimal`")
    names = ", ".join(f"{i.name}@{i.content_hash[:8]}" for i in images)
    return Check("images", not damaged, "; ".join(damaged) or names,
                 "rebuild with `hvctl image build NAME --force`" if damaged else None)


def _accelerator_check(ctx: Context) -> Check:
    try:
        caps = ctx.capabilities()
    except HvctlError as exc:
        return Check("accelerator", False, exc.message, exc.hint)
    detail = "KVM (hardware virtualisation)" if caps.accel.value == "kvm" else \
        "TCG (software emulation): KVM is absent or could not boot a probe kernel"
    return Check("accelerator", True, detail, warning=caps.accel.value != "kvm")


def _passthrough_checks() -> list[Check]:
    """IOMMU and vfio-pci on this machine: warnings, since a host without them still runs VMs (without GPUs)."""
    return [Check(vc.name, True, "present" if vc.ok else "missing: GPU passthrough unavailable",
                  None if vc.ok else vc.hint, warning=not vc.ok) for vc in host_checks("/sys")]


def _memory_limit_checks(ctx: Context) -> list[Check]:
    if ctx.is_this_machine() and not can_limit_memory():
        return [Check("memory limits", True, "no CAP_SYS_RESOURCE: libvirt cannot set memtune hard limits here, "
                      "so VMs get none", "run hvctl and libvirtd with CAP_SYS_RESOURCE", warning=True)]
    return []


def _enforcement_check(ctx: Context) -> Check:
    problems = []
    for record in ctx.ledger.vms.all():
        try:
            report = enforcement_report(ctx, record)
        except HostUnreachable:
            continue  # the hosts check says so; enforcement of another host is not read from here anyway
        if report:
            problems += [f"{record.name}: {p}" for p in report.mismatches]
    return Check("enforcement", not problems,
                 "; ".join(problems) or "libvirt reports applied what was configured (and cgroups enforce it here)",
                 "check that libvirt's cgroup controllers are mounted and delegated" if problems else None)


def _vxlan_check(ctx: Context) -> Check:
    gaps = vxlan_gaps(ctx)
    return Check("tenant networks", not gaps,
                 "; ".join(f"{n.name}: host {h} runs its VMs but has no VXLAN device {n.vxlan}" for n, h in gaps)
                 or "every network that spans hosts has its VXLAN device on each of them",
                 "`hvctl doctor --repair` sets them up again (a host reboot drops them)" if gaps else None)


def _gpu_bindings_check(ctx: Context) -> Check:
    stranded = passthrough.stranded_gpus(ctx)
    return Check("gpu bindings", not stranded,
                 "; ".join(f"{r.address} ({r.state} for {r.vm or 'no VM'})" for r in stranded)
                 or "every device hvctl bound belongs to a VM it has (running or stopped)",
                 "`hvctl doctor --repair` returns them to their host drivers" if stranded else None)


def _gpu_health_check(ctx: Context) -> Check:
    dead = [(h.name, a, v) for h in ctx.ledger.hosts.all() for a, v in ctx.ledger.gpus.health(h.name).items()]
    return Check("gpu health", not dead,
                 "; ".join(f"{a} on {h}: {v.state} since {time.ctime(v.since)}" for h, a, v in dead)
                 or "every device hvctl released still answers on the bus",
                 "reboot the host; then `hvctl doctor --repair` places them again" if dead else None)


def _operations_check(stopped: list[OperationRecord]) -> Check:
    return Check("operations", not stopped, "; ".join(f"interrupted {describe(op)}" for op in stopped)
                 or "no operation was interrupted",
                 "`hvctl doctor --repair` finishes or rolls back each one, by where its domain runs"
                 if stopped else None)


def _drift_check(ctx: Context, interrupted_first: bool) -> Check:
    drift = drift_report(ctx)
    return Check("drift", not drift, "; ".join(f"{d.vm}@{d.host}: {d.problem}" for d in drift)
                 or "ledger and libvirt agree",
                 ("`hvctl doctor --repair` first, for the interrupted operations above; then " if interrupted_first
                  else "") + "inspect with `hvctl show NAME`; `hvctl destroy NAME` removes a VM you mean to "
                 "delete, and refuses while any host runs its domain" if drift else None)


def _hosts_check(ctx: Context) -> Check:
    """Every registered host answers. One that does not is named, and the rest of the doctor goes on."""
    down = []
    hosts = ctx.ledger.hosts.all()
    for record in hosts:
        try:
            ctx.host(record.name).facts()
        except HostUnreachable as exc:
            down.append(f"{record.name}: {exc.message}")
    return Check("hosts", not down, "; ".join(down) or f"{len(hosts)} registered, all answer",
                 "its VMs show `unreachable` in `hvctl list` until it answers again; `hvctl host rm` "
                 "forgets a host that is gone for good" if down else None)


@dataclass(frozen=True)
class Settled:
    """An interrupted operation and what the repair did with it (finished it, or undid it)."""

    operation: str
    outcome: str


@dataclass(frozen=True)
class Repaired:
    """What `hvctl doctor --repair` did."""

    operations: tuple[Settled, ...]
    gpus_returned: tuple[str, ...]  # to their host drivers
    gpus_revived: tuple[str, ...]  # answer on the bus again after a host reboot, placed again
    gpus_unreachable: dict[str, str]  # host → why its GPUs could not be repaired
    vxlan: tuple[str, ...]  # "NETWORK on HOST", set up again

    @property
    def nothing(self) -> bool:
        return not (self.operations or self.gpus_returned or self.gpus_revived or self.gpus_unreachable
                    or self.vxlan)

    def as_json(self) -> dict[str, Any]:
        return {"gpus_returned": list(self.gpus_returned),
                "operations": [{"operation": o.operation, "outcome": o.outcome} for o in self.operations],
                "gpus_revived": list(self.gpus_revived), "gpus_unreachable": dict(self.gpus_unreachable),
                "vxlan": list(self.vxlan)}


def repair(ctx: Context) -> Repaired:
    """`hvctl doctor --repair`: finish or undo what a crash interrupted. Interrupted operations first (their
    intents; see ``hvctl.ops.intent``); then GPU binding: every device whose VM is not running goes back to its
    original driver, as the ledger's journal recorded it; last, each tenant network's VXLAN device a host lost."""
    operations = tuple(Settled(describe(op), reconcile(ctx, op)) for op in interrupted(ctx))
    returned: list[str] = []
    unreachable: dict[str, str] = {}
    for host in sorted({r.host for r in ctx.ledger.gpus.bindings()}):
        try:
            done = passthrough.repair(ctx, ctx.gpu_env, host, passthrough.gpu_keepers(ctx, host))
        except (HostUnreachable, HypervisorError) as exc:  # a remote host's libvirt: the others are still repaired
            unreachable[host] = exc.message
            continue
        if done:
            ctx.ledger.events.log(None, host, "gpu.repaired", f"returned {', '.join(done)} to their host drivers")
        returned += done
    # Devices marked dead after a release that answer again (the host was rebooted) are placed again. Only this
    # machine's sysfs can be read.
    revived = passthrough.revive(ctx, ctx.gpu_env, ctx.host_name) if ctx.is_this_machine(ctx.host_name) else []
    return Repaired(operations, tuple(returned), tuple(revived), unreachable, tuple(repair_vxlan(ctx)))
