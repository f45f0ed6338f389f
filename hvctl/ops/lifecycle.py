"""hvctl start, stop and destroy."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from xml.etree import ElementTree as ET

from hvctl import passthrough
from hvctl.console import console_size, wait_for_ready
from hvctl.context import Context
from hvctl.domain.model import retarget_ssh_forward
from hvctl.errors import HostUnreachable, HvctlError, HypervisorError, NotFound
from hvctl.host import DomainState, Guest
from hvctl.ledger import OperationRecord, VMRecord, VMState
from hvctl.ops import Say, pooled, quiet
from hvctl.ops.incarnation import DEFAULT_BOOT_TIMEOUT, HOSTFWD_REFUSED, PORT_ATTEMPTS
from hvctl.ops.intent import operation
from hvctl.ops.networks import leave_if_unused, with_current_filter, withdraw_vm_lease
from hvctl.ops.target import bindable_here


def start(ctx: Context, name: str, say: Say = quiet,
          boot_timeout: float = DEFAULT_BOOT_TIMEOUT) -> float:
    """Start a stopped VM and wait until the guest reports ready; returns the seconds it took."""
    ctx.ledger.vms.get(name)
    with operation(ctx, name, "start", say=say) as op:
        record = ctx.ledger.vms.get(name)
        guest = ctx.host(record.host).guest(name)
        if guest.state() is DomainState.RUNNING:
            raise HvctlError(f"VM {name} is already running")
        if guest.state() is DomainState.PAUSED:
            raise HvctlError(f"VM {name} is paused, not stopped", hint=f"hvctl resume {name}")
        if ctx.ledger.gpus.bindings(record.host, name):
            moved = passthrough.rebind_vm(ctx, ctx.gpu_env, name, record.host)
            if moved:
                say(f"binding {', '.join(moved)} to vfio-pci again (a host reboot gave them back)")
        say("starting")
        # The console log is appended to: an earlier boot's marker is before this offset, so it cannot count.
        console = pooled.console_of(ctx, record)
        offset = console_size(console)
        guest = start_claiming_a_port(ctx, with_current_filter(ctx, record, guest, say), say)
        op.step("started")
        say("waiting for the guest to report ready")
        line, waited = wait_for_ready(name, console, boot_timeout,
                                      lambda: guest.state() is DomainState.RUNNING, offset=offset,
                                      poll=0.05 if isinstance(console, Path) else 0.5)
        ctx.ledger.vms.set_state(name, VMState.RUNNING, f"started; guest up after {waited:.2f} s")
    return waited


def ledger_state(actual: DomainState) -> VMState:
    """The ledger's state for what libvirt reports of a domain hvctl is not in the middle of changing."""
    return {DomainState.RUNNING: VMState.RUNNING, DomainState.PAUSED: VMState.PAUSED}.get(actual, VMState.STOPPED)


def reconcile_power(ctx: Context, op: OperationRecord) -> str:
    """An interrupted stop that had asked the guest to power off is finished (it powers off, or is destroyed after
    the usual 30 s); any other interrupted start or stop leaves the VM as it is, and the ledger takes the state
    libvirt reports (running, or stopped)."""
    vm = op.vm
    try:
        record = ctx.ledger.vms.get(vm)
    except NotFound:
        ctx.ledger.operations.end(vm)
        return "the VM is gone"
    if op.kind == "stop" and op.step in ("asked", "powered-off"):
        guest = ctx.host(record.host).find_guest(vm)
        how = _power_off(guest, 30.0, lambda _: None) if guest is not None else "already stopped"
        ctx.ledger.vms.set_state(vm, VMState.STOPPED, f"an interrupted stop was finished ({how})")
        ctx.ledger.operations.end(vm)
        return f"the stop was finished ({how})"
    actual = ctx.host(record.host).state(vm)
    state = ledger_state(actual)
    if record.state != state:
        ctx.ledger.vms.set_state(vm, state, f"an interrupted {op.kind}: libvirt says {actual.value}")
    ctx.ledger.operations.end(vm)
    return f"libvirt says {actual.value}: the ledger says {state}"



def start_claiming_a_port(ctx: Context, guest: Guest, say: Say) -> Guest:
    """Start a defined VM. Any local user can bind a stopped VM's SSH forward port; QEMU then refuses to start.
    So a refused forward moves to a port that is free now, in the domain and the ledger, and the start is tried
    again. Nothing else is retried. Returns the handle on what was started: a redefinition makes a new one."""
    name = guest.name
    record = ctx.ledger.vms.get(name)
    port = record.ssh_port
    for _ in range(PORT_ATTEMPTS):
        try:
            guest.start()
            return guest
        except HypervisorError as exc:
            if HOSTFWD_REFUSED not in exc.message:
                raise
        bind = str(record.spec.ssh_bind)
        refused, port = port, ctx.ledger.vms.move_ssh_port(
            name, bind, port, bindable_here(bind) if ctx.is_this_machine(record.host) else None)
        say(f"port {refused} is taken by another process; moving the SSH forward to {port}")
        guest = guest.host.define(retarget_ssh_forward(guest.xml(inactive=True), port))
    raise HypervisorError(f"{name} could not bind an SSH forward port in {PORT_ATTEMPTS} tries",
                          hint="something is binding ports in hvctl's range as fast as they are freed")


def stop(ctx: Context, name: str, timeout: float = 30.0, say: Say = quiet) -> str:
    """Graceful shutdown, then destroy after ``timeout`` seconds. Returns "graceful" or "forced"."""
    ctx.ledger.vms.get(name)
    with operation(ctx, name, "stop", say=say) as op:
        record = ctx.ledger.vms.get(name)
        guest = ctx.host(record.host).find_guest(name)
        how = _power_off(guest, timeout, say, lambda: op.step("asked")) if guest is not None else "already stopped"
        op.step("powered-off")
        ctx.ledger.vms.set_state(name, VMState.STOPPED, f"stopped ({how})")
    return how


def _power_off(guest: Guest, timeout: float, say: Say,
               asked: Callable[[], None] = lambda: None) -> str:
    """ACPI power button, then destroy after ``timeout``: "graceful", "forced" or "already stopped". A paused
    guest is resumed first: paused vCPUs cannot act on the button."""
    if guest.state() not in (DomainState.RUNNING, DomainState.PAUSED, DomainState.SHUTTING_DOWN):
        return "already stopped"
    if guest.state() is DomainState.PAUSED:
        say("resuming the paused guest so that it can power off")
        guest.resume()
    say(f"asking the guest to power off (up to {timeout:.0f} s)")
    guest.shutdown()
    asked()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and guest.state() is not DomainState.SHUTOFF:
        time.sleep(0.2)
    if guest.state() is DomainState.SHUTOFF:
        return "graceful"
    say("guest did not power off in time; destroying")
    guest.destroy()
    return "forced"


def restart(ctx: Context, name: str, timeout: float = 30.0, say: Say = quiet,
            boot_timeout: float = DEFAULT_BOOT_TIMEOUT, force: bool = False) -> tuple[str, float]:
    """Power off (gracefully, forced after ``timeout``; at once with ``force``) and boot again in one operation,
    waiting until the guest reports ready. A new QEMU process: CPU and memory changes made with ``resize`` for the
    next boot take effect. Returns how it stopped and the seconds the boot took."""
    ctx.ledger.vms.get(name)
    with operation(ctx, name, "restart", say=say) as op:
        record = ctx.ledger.vms.get(name)
        guest = ctx.host(record.host).guest(name)
        if force and guest.state() is not DomainState.SHUTOFF:
            say("powering off at once (--force)")
            guest.destroy()
            how = "forced"
        else:
            how = _power_off(guest, timeout, say, lambda: op.step("asked"))
        op.step("powered-off")
        ctx.ledger.vms.set_state(name, VMState.STOPPED, f"restarting: stopped ({how})")
        console = pooled.console_of(ctx, record)
        offset = console_size(console)
        say("starting")
        guest = start_claiming_a_port(ctx, guest, say)
        op.step("started")
        say("waiting for the guest to report ready")
        _, waited = wait_for_ready(name, console, boot_timeout, lambda: guest.state() is DomainState.RUNNING,
                                   offset=offset, poll=0.05 if isinstance(console, Path) else 0.5)
        ctx.ledger.vms.set_state(name, VMState.RUNNING, f"restarted ({how} stop); guest up after {waited:.2f} s")
    return how, waited


def pause(ctx: Context, name: str) -> None:
    """Freeze the VM's vCPUs (libvirt suspend). Its memory stays allocated and counted; nothing in the guest runs,
    its agent and SSH included, until ``resume``."""
    ctx.ledger.vms.get(name)
    with operation(ctx, name, "pause"):
        record = ctx.ledger.vms.get(name)
        guest = ctx.host(record.host).guest(name)
        state = guest.state()
        if state is DomainState.PAUSED:
            raise HvctlError(f"VM {name} is already paused", hint=f"hvctl resume {name}")
        if state is not DomainState.RUNNING:
            raise HvctlError(f"VM {name} is not running (libvirt: {state.value}); only a running VM can be paused")
        guest.suspend()
        ctx.ledger.vms.set_state(name, VMState.PAUSED, f"paused {name}")


def resume(ctx: Context, name: str) -> None:
    """Let a paused VM's vCPUs run again."""
    ctx.ledger.vms.get(name)
    with operation(ctx, name, "resume"):
        record = ctx.ledger.vms.get(name)
        guest = ctx.host(record.host).guest(name)
        state = guest.state()
        if state is not DomainState.PAUSED:
            raise HvctlError(f"VM {name} is not paused (libvirt: {state.value})")
        guest.resume()
        ctx.ledger.vms.set_state(name, VMState.RUNNING, f"resumed {name}")


def destroy(ctx: Context, name: str, say: Say = quiet) -> None:
    """Remove the domain, its overlay disk and console log, and its ledger entry.

    The ledger row goes last: if anything fails first, the row still names what is left to clean, and a second
    destroy finishes the job. It holds the VM's operation lock (an interrupted migration is reconciled first), and
    deletes no file or volume while any host runs the VM's domain.
    """
    ctx.ledger.vms.get(name)
    with operation(ctx, name, "destroy", say=say) as op:
        _destroy(ctx, name, say, op.step)


def reconcile_destroy(ctx: Context, op: OperationRecord) -> str:
    """An interrupted destroy is finished: destroy is idempotent up to its last step, the ledger row."""
    try:
        ctx.ledger.vms.get(op.vm)
    except NotFound:
        ctx.ledger.operations.end(op.vm)
        return "it had finished"
    _destroy(ctx, op.vm, lambda _: None, lambda *_a, **_k: None)
    ctx.ledger.operations.end(op.vm)
    return "finished"


def _destroy(ctx: Context, name: str, say: Say, step: Callable[..., None]) -> None:
    record = ctx.ledger.vms.get(name)
    host = ctx.host(record.host)
    guest = host.find_guest(name)
    if guest is not None and (not guest.made_by_hvctl() or (record.domain_uuid and guest.uuid != record.domain_uuid)):
        # Someone else's domain of the same name: touching it, or the disk it may use, is not hvctl's to do.
        raise HvctlError(f"the domain {name} on host {record.host} is not the one hvctl made for this VM "
                         f"({'no hvctl metadata' if not guest.made_by_hvctl() else f'UUID {guest.uuid}'}); "
                         "refusing to destroy it or to remove any file",
                         hint="undefine it yourself if it is leftover, then `hvctl destroy` again")
    if guest is None:
        _refuse_if_running_elsewhere(ctx, record)
    ctx.ledger.vms.set_state(name, VMState.DESTROYING)
    step("marked")
    try:
        if guest is not None:
            say("destroying the domain")
            guest.destroy()
            say("undefining the domain")
            guest.undefine()
    except NotFound:
        pass  # Already gone from libvirt (drift); the rest still has to be removed.
    step("undefined")
    if ctx.ledger.gpus.bindings(record.host, name):
        say("giving the GPUs back to their host drivers")
        # A failure raises here, before the ledger row goes: `hvctl destroy` again, or `hvctl gpu release`.
        released = passthrough.release_vm(ctx, ctx.gpu_env, name, record.host)
        ctx.ledger.events.log(name, record.host, "gpu.released", f"returned {', '.join(released)} to their drivers")
    say(f"deleting the VM's volumes from host {record.host}'s storage pool" if not ctx.is_this_machine(record.host)
        else "removing the overlay disk and console log")
    remove_vm_files(ctx, record)
    step("files-removed")
    withdraw_vm_lease(ctx, record, say)
    ctx.ledger.vms.delete(name, f"destroyed {name}")
    if record.spec.network is not None and record.spec.network.tenant_network is not None:
        leave_if_unused(ctx, record.spec.network.tenant_network, record.host, say)


def remove_vm_files(ctx: Context, record: VMRecord) -> None:
    """The VM's disk, seed and console log: its volumes in its host's pool, or its directories here (NAME, or
    NAME.gN after a migration that moved its files, and any other left over). The directory its files are in may
    be another controller's state dir (a ledger several controllers share): it goes too, being the VM's own by
    its name and place (STATE/vms/NAME[.gN]). The caller has made sure that no host runs its domain."""
    if not ctx.is_this_machine(record.host):
        pooled.open_files(ctx.host(record.host), record.name).delete()
        return
    record.overlay.unlink(missing_ok=True)
    for vm_dir in {ctx.paths.vm_dir(record.name), ctx.paths.vm_dir(record.name, 1), record.overlay.parent}:
        if _is_vm_dir(vm_dir, record.name):
            shutil.rmtree(vm_dir, ignore_errors=True)


def _is_vm_dir(path: Path, name: str) -> bool:
    """A directory hvctl made for VM ``name``: STATE/vms/NAME or STATE/vms/NAME.gN, not a link. Names never contain
    '.', so it cannot be another VM's."""
    generation = path.name.removeprefix(f"{name}.g")
    return (path.parent.name == "vms" and not path.is_symlink()
            and (path.name == name or (path.name != generation and generation.isdigit())))


def destroy_orphan(ctx: Context, name: str, host_name: str, say: Say = quiet) -> list[str]:
    """An orphan: a domain on ``host_name`` that carries hvctl's metadata but that no VM in the ledger is. Its domain
    goes, and the files it names that are hvctl's own and no VM in the ledger uses: under this machine's state dir
    (vms/NAME*), or its vm-NAME.* volumes in the host's pool. Returns what was removed. Never automatic: `doctor`
    lists orphans, and this is the command its hint names."""
    if name in {vm.name for vm in ctx.ledger.vms.all()}:
        raise HvctlError(f"{name} is in the ledger, so it is not an orphan", hint=f"hvctl destroy {name}")
    with operation(ctx, name, "destroy-orphan", target=host_name, say=say):
        host = ctx.host(host_name)
        guest = host.find_guest(name)
        if guest is None:
            raise NotFound(f"host {host_name} has no domain {name!r}")
        if not guest.made_by_hvctl():
            raise HvctlError(f"the domain {name} on host {host_name} was not made by hvctl (no hvctl metadata); "
                             "hvctl leaves it alone", hint="virsh undefine it yourself if it is yours")
        root = ET.fromstring(guest.xml())
        paths = {el.get("file") or el.get("path") or "" for el in root.iter("source")}
        paths |= {el.get("file") or "" for el in root.iter("log")}
        used = {str(p) for vm in ctx.ledger.vms.all() for p in (vm.overlay, vm.seed, vm.console_log) if p}
        say("destroying the orphan domain")
        guest.destroy()
        guest.undefine()
        removed = [f"domain {name} ({guest.uuid})"]
        if ctx.is_this_machine(host_name):
            vms = ctx.paths.root / "vms"
            for directory in {Path(p).parent for p in paths if p and p not in used}:
                if directory.parent == vms and directory.name.split(".g")[0] == name:
                    shutil.rmtree(directory, ignore_errors=True)
                    removed.append(str(directory))
        else:
            removed += pooled.open_files(host, name).delete()
        ctx.ledger.events.log(name, host_name, "orphan.destroyed", f"destroyed orphan {name}: {', '.join(removed)}")
        return removed


def _refuse_if_running_elsewhere(ctx: Context, record: VMRecord) -> None:
    """The VM's host has no domain for it. Before its disk goes, every other host is asked, by the domain's UUID
    (by name and hvctl's metadata for a VM recorded before UUIDs were), whether it runs it there: after a crash
    mid-migration it may, with the ledger still naming the source."""
    silent = []
    for other in ctx.ledger.hosts.all():
        if other.name == record.host:
            continue
        try:
            host = ctx.host(other.name)
            found = host.find_guest_by_uuid(record.domain_uuid) if record.domain_uuid else \
                host.find_guest(record.name)
            if found is not None and (record.domain_uuid or found.made_by_hvctl()):
                raise HvctlError(f"{record.name}'s domain is on host {other.name} ({found.state().value}), not on "
                                 f"{record.host} as the ledger says; refusing to delete a disk it may be using",
                                 hint="`hvctl doctor --repair` reconciles an interrupted migration")
        except HostUnreachable as exc:
            silent.append(f"{other.name} ({exc.message})")
    if silent:
        raise HostUnreachable(f"{record.name} has no domain on {record.host}, and hvctl cannot confirm that no other "
                              f"host runs it: {'; '.join(silent)}",
                              hint="try again when those hosts answer, or `hvctl host rm` a host that is gone for good")
