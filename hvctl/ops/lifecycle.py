"""hvctl start, stop and destroy."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from hvctl import passthrough
from hvctl.console import console_size, wait_for_ready
from hvctl.context import Context
from hvctl.domain.model import retarget_ssh_forward
from hvctl.errors import HvctlError, HypervisorError, NotFound
from hvctl.host import DomainState, Guest
from hvctl.ops import Reporter, SilentReporter, pooled
from hvctl.ops.incarnation import DEFAULT_BOOT_TIMEOUT, HOSTFWD_REFUSED, PORT_ATTEMPTS


def start(ctx: Context, name: str, reporter: Reporter | None = None,
          boot_timeout: float = DEFAULT_BOOT_TIMEOUT) -> float:
    """Start a stopped VM and wait until the guest reports ready; returns the seconds it took."""
    say = (reporter or SilentReporter()).step
    record = ctx.ledger.get_vm(name)
    guest = ctx.host(record.host).guest(name)
    if guest.state() is DomainState.RUNNING:
        raise HvctlError(f"VM {name} is already running")
    say("starting")
    # The console log is appended to: an earlier boot's marker is before this offset, so it cannot count.
    console = pooled.console_of(ctx, record)
    offset = console_size(console)
    guest = start_claiming_a_port(ctx, guest, say)
    say("waiting for the guest to report ready")
    line, waited = wait_for_ready(name, console, boot_timeout,
                                  lambda: guest.state() is DomainState.RUNNING, offset=offset,
                                  poll=0.05 if isinstance(console, Path) else 0.5)
    ctx.ledger.set_state(name, "running", f"started; guest up after {waited:.2f} s")
    return waited



def start_claiming_a_port(ctx: Context, guest: Guest, say: Callable[[str], None]) -> Guest:
    """Start a defined VM. Any local user can bind a stopped VM's SSH forward port; QEMU then refuses to start.
    So a refused forward moves to a port that is free now, in the domain and the ledger, and the start is tried
    again. Nothing else is retried. Returns the handle on what was started: a redefinition makes a new one."""
    name = guest.name
    record = ctx.ledger.get_vm(name)
    port = record.ssh_port
    for _ in range(PORT_ATTEMPTS):
        try:
            guest.start()
            return guest
        except HypervisorError as exc:
            if HOSTFWD_REFUSED not in exc.message:
                raise
        refused, port = port, ctx.ledger.move_ssh_port(name, str(record.spec.ssh_bind), port,
                                                       probe=ctx.is_this_machine(record.host))
        say(f"port {refused} is taken by another process; moving the SSH forward to {port}")
        guest = guest.host.define(retarget_ssh_forward(guest.xml(inactive=True), port))
    raise HypervisorError(f"{name} could not bind an SSH forward port in {PORT_ATTEMPTS} tries",
                          hint="something is binding ports in hvctl's range as fast as they are freed")


def stop(ctx: Context, name: str, timeout: float = 30.0, reporter: Reporter | None = None) -> str:
    """Graceful shutdown, then destroy after ``timeout`` seconds. Returns "graceful" or "forced"."""
    say = (reporter or SilentReporter()).step
    record = ctx.ledger.get_vm(name)
    guest = ctx.host(record.host).find_guest(name)
    how = "already stopped"
    if guest is not None and guest.state() in (DomainState.RUNNING, DomainState.PAUSED, DomainState.SHUTTING_DOWN):
        say(f"asking the guest to power off (up to {timeout:.0f} s)")
        guest.shutdown()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and guest.state() is not DomainState.SHUTOFF:
            time.sleep(0.2)
        how = "graceful"
        if guest.state() is not DomainState.SHUTOFF:
            say("guest did not power off in time; destroying")
            guest.destroy()
            how = "forced"
    ctx.ledger.set_state(name, "stopped", f"stopped ({how})")
    return how


def destroy(ctx: Context, name: str, reporter: Reporter | None = None) -> None:
    """Remove the domain, its overlay disk and console log, and its ledger entry.

    The ledger row goes last: if anything fails first, the row still names what is left to clean, and a second
    destroy finishes the job.
    """
    say = (reporter or SilentReporter()).step
    record = ctx.ledger.get_vm(name)
    host = ctx.host(record.host)
    guest = host.find_guest(name)
    if guest is not None and not guest.made_by_hvctl():
        # Someone else's domain of the same name: touching it, or the disk it may use, is not hvctl's to do.
        raise HvctlError(f"the domain {name} on host {record.host} was not made by hvctl (no hvctl metadata); "
                         "refusing to destroy it or to remove any file",
                         hint="undefine it yourself if it is leftover, then `hvctl destroy` again")
    ctx.ledger.set_state(name, "destroying")
    try:
        if guest is not None:
            say("destroying the domain")
            guest.destroy()
            say("undefining the domain")
            guest.undefine()
    except NotFound:
        pass  # Already gone from libvirt (drift); the rest still has to be removed.
    if ctx.ledger.gpu_bindings(record.host, name):
        say("giving the GPUs back to their host drivers")
        # A failure raises here, before the ledger row goes: `hvctl destroy` again, or `hvctl gpu release`.
        released = passthrough.release_vm(ctx, ctx.gpu_env, name, record.host)
        ctx.ledger.log_event(name, record.host, "gpu.released", f"returned {', '.join(released)} to their drivers")
    if not ctx.is_this_machine(record.host):
        say(f"deleting the VM's volumes from host {record.host}'s storage pool")
        pooled.open_files(host, name).delete()
        ctx.ledger.delete_vm(name, f"destroyed {name}")
        return
    say("removing the overlay disk and console log")
    record.overlay.unlink(missing_ok=True)
    # The current incarnation's directory (NAME, or NAME.gN after a checkpoint-migration) and any other left over.
    for vm_dir in {ctx.paths.vm_dir(name), ctx.paths.vm_dir(name, 1), record.overlay.parent}:
        if vm_dir.parent == ctx.paths.root / "vms":
            shutil.rmtree(vm_dir, ignore_errors=True)
    ctx.ledger.delete_vm(name, f"destroyed {name}")
