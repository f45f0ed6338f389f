"""hvctl doctor: is this host able to run hvctl's VMs, and does the ledger agree with libvirt?"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from hvctl import passthrough
from hvctl.context import Context, can_limit_memory
from hvctl.errors import HostUnreachable, HvctlError, HypervisorError
from hvctl.host import libvirt_version
from hvctl.ops.inspect import drift_report, enforcement_report
from hvctl.ops.intent import describe, interrupted, reconcile
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
    checks: list[Check] = []
    try:
        ctx.paths.ensure()
        writable = os.access(ctx.paths.root, os.W_OK)
        checks.append(Check("state dir", writable, str(ctx.paths.root),
                            None if writable else "run as root or pass --state-dir"))
        checks.append(Check("ledger", True, f"{ctx.paths.ledger} (schema v{ctx.ledger.schema_version})"))
    except HvctlError as exc:
        return [*checks, Check("state dir", False, exc.message, exc.hint)]

    try:
        host = ctx.host()
        facts = host.facts()
        checks.append(Check("libvirtd", True, f"{ctx.connected_uri}: libvirt {libvirt_version()}, {facts.cpus} CPUs, "
                                              f"{facts.memory_mib} MiB"))
    except HvctlError as exc:
        checks.append(Check("libvirtd", False, exc.message, exc.hint or "start libvirtd (`make daemons`)"))
        return checks

    checks.append(_hosts_check(ctx))
    images = ctx.images.list()
    damaged = []
    for image in images:
        try:
            image.verify()
        except HvctlError as exc:
            damaged.append(exc.message)
    if not images:
        checks.append(Check("images", False, "no images built", "run `hvctl image build minimal`"))
    else:
        names = ", ".join(f"{i.name}@{i.content_hash[:8]}" for i in images)
        checks.append(Check("images", not damaged, "; ".join(damaged) or names,
                            "rebuild with `hvctl image build NAME --force`" if damaged else None))

    try:
        caps = ctx.capabilities()
        detail = "KVM (hardware virtualisation)" if caps.accel.value == "kvm" else \
            "TCG (software emulation): KVM is absent or could not boot a probe kernel"
        checks.append(Check("accelerator", True, detail, warning=caps.accel.value != "kvm"))
    except HvctlError as exc:
        checks.append(Check("accelerator", False, exc.message, exc.hint))

    for vc in host_checks("/sys"):
        checks.append(Check(vc.name, True, "present" if vc.ok else "missing: GPU passthrough unavailable",
                            None if vc.ok else vc.hint, warning=not vc.ok))

    if ctx.is_this_machine() and not can_limit_memory():
        checks.append(Check("memory limits", True, "no CAP_SYS_RESOURCE: libvirt cannot set memtune hard limits here, "
                            "so VMs get none", "run hvctl and libvirtd with CAP_SYS_RESOURCE", warning=True))
    problems = []
    for record in ctx.ledger.list_vms():
        try:
            report = enforcement_report(ctx, record)
        except HostUnreachable:
            continue  # the hosts check says so; enforcement of another host is not read from here anyway
        if report:
            problems += [f"{record.name}: {p}" for p in report.get("mismatches", [])]
    checks.append(Check("enforcement", not problems,
                        "; ".join(problems) or "libvirt reports applied what was configured (and cgroups enforce it "
                                               "here)",
                        "check that libvirt's cgroup controllers are mounted and delegated" if problems else None))

    stranded = passthrough.stranded_gpus(ctx)
    checks.append(Check("gpu bindings", not stranded,
                        "; ".join(f"{r['address']} ({r['state']} for {r['vm'] or 'no VM'})" for r in stranded)
                        or "every device hvctl bound belongs to a VM it has (running or stopped)",
                        "`hvctl doctor --repair` returns them to their host drivers" if stranded else None))

    dead = [(h.name, a, v) for h in ctx.ledger.list_hosts() for a, v in ctx.ledger.gpu_health(h.name).items()]
    checks.append(Check("gpu health", not dead,
                        "; ".join(f"{a} on {h}: {v['state']} since {time.ctime(v['since'])}" for h, a, v in dead)
                        or "every device hvctl released still answers on the bus",
                        "reboot the host; then `hvctl doctor --repair` places them again" if dead else None))

    stopped = interrupted(ctx)
    checks.append(Check("operations", not stopped, "; ".join(f"interrupted {describe(op)}" for op in stopped)
                        or "no operation was interrupted",
                        "`hvctl doctor --repair` finishes or rolls back each one, by where its domain runs"
                        if stopped else None))

    drift = drift_report(ctx)
    checks.append(Check("drift", not drift, "; ".join(f"{d.vm}@{d.host}: {d.problem}" for d in drift)
                        or "ledger and libvirt agree",
                        ("`hvctl doctor --repair` first, for the interrupted operations above; then " if stopped
                         else "") + "inspect with `hvctl show NAME`; `hvctl destroy NAME` removes a VM you mean to "
                        "delete, and refuses while any host runs its domain" if drift else None))
    return checks


def _hosts_check(ctx: Context) -> Check:
    """Every registered host answers. One that does not is named, and the rest of the doctor goes on."""
    down = []
    hosts = ctx.ledger.list_hosts()
    for record in hosts:
        try:
            ctx.host(record.name).facts()
        except HostUnreachable as exc:
            down.append(f"{record.name}: {exc.message}")
    return Check("hosts", not down, "; ".join(down) or f"{len(hosts)} registered, all answer",
                 "its VMs show `unreachable` in `hvctl list` until it answers again; `hvctl host rm` "
                 "forgets a host that is gone for good" if down else None)


def repair(ctx: Context) -> dict[str, Any]:
    """`hvctl doctor --repair`: finish or undo what a crash interrupted. Interrupted operations first (their
    intents; see ``hvctl.ops.intent``); then GPU binding: every device whose VM is not running goes back to its
    original driver, as the ledger's journal recorded it."""
    operations = [{"operation": describe(op), "outcome": reconcile(ctx, op)} for op in interrupted(ctx)]
    returned: list[str] = []
    unreachable: dict[str, str] = {}
    for host in sorted({r["host"] for r in ctx.ledger.gpu_bindings()}):
        try:
            done = passthrough.repair(ctx, ctx.gpu_env, host, passthrough.gpu_keepers(ctx, host))
        except (HostUnreachable, HypervisorError) as exc:  # a remote host's libvirt: the others are still repaired
            unreachable[host] = exc.message
            continue
        if done:
            ctx.ledger.log_event(None, host, "gpu.repaired", f"returned {', '.join(done)} to their host drivers")
        returned += done
    # Devices marked dead after a release that answer again (the host was rebooted) are placed again. Only this
    # machine's sysfs can be read.
    revived = passthrough.revive(ctx, ctx.gpu_env, ctx.host_name) if ctx.is_this_machine(ctx.host_name) else []
    return {"gpus_returned": returned, "operations": operations, "gpus_revived": revived,
            "gpus_unreachable": unreachable}
