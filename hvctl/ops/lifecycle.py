"""hvctl start, stop and destroy."""

from __future__ import annotations

import shutil
import time

from hvctl import passthrough
from hvctl.console import wait_for_ready
from hvctl.context import Context
from hvctl.errors import HvctlError, NotFound
from hvctl.host import DomainState
from hvctl.ops import Reporter, SilentReporter
from hvctl.ops.create import DEFAULT_BOOT_TIMEOUT


def start(ctx: Context, name: str, reporter: Reporter | None = None,
          boot_timeout: float = DEFAULT_BOOT_TIMEOUT) -> float:
    """Start a stopped VM and wait until the guest reports ready; returns the seconds it took."""
    say = (reporter or SilentReporter()).step
    record = ctx.ledger.get_vm(name)
    host = ctx.host(record.host)
    if host.state(name) is DomainState.RUNNING:
        raise HvctlError(f"VM {name} is already running")
    say("starting")
    # The console file is reopened (truncated) by QEMU at start, so an old marker cannot be mistaken for this boot.
    host.start(name)
    say("waiting for the guest to report ready")
    line, waited = wait_for_ready(name, record.console_log, boot_timeout,
                                  lambda: host.state(name) is DomainState.RUNNING)
    ctx.ledger.set_state(name, "running", f"started; guest up after {waited:.2f} s")
    return waited


def stop(ctx: Context, name: str, timeout: float = 30.0, reporter: Reporter | None = None) -> str:
    """Graceful shutdown, then destroy after ``timeout`` seconds. Returns "graceful" or "forced"."""
    say = (reporter or SilentReporter()).step
    record = ctx.ledger.get_vm(name)
    host = ctx.host(record.host)
    how = "already stopped"
    if host.state(name) in (DomainState.RUNNING, DomainState.PAUSED, DomainState.SHUTTING_DOWN):
        say(f"asking the guest to power off (up to {timeout:.0f} s)")
        host.shutdown(name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and host.state(name) is not DomainState.SHUTOFF:
            time.sleep(0.2)
        how = "graceful"
        if host.state(name) is not DomainState.SHUTOFF:
            say("guest did not power off in time; destroying")
            host.destroy(name)
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
    ctx.ledger.set_state(name, "destroying")
    host = ctx.host(record.host)
    try:
        say("destroying the domain")
        host.destroy(name)
        say("undefining the domain")
        host.undefine(name)
    except NotFound:
        pass  # Already gone from libvirt (drift); the rest still has to be removed.
    if ctx.ledger.gpu_bindings(record.host, name):
        say("giving the GPUs back to their host drivers")
        # A failure raises here, before the ledger row goes: `hvctl destroy` again, or `hvctl gpu release`.
        released = passthrough.release_vm(ctx, ctx.gpu_env, name, record.host)
        ctx.ledger.log_event(name, record.host, "gpu.released", f"returned {', '.join(released)} to their drivers")
    say("removing the overlay disk and console log")
    record.overlay.unlink(missing_ok=True)
    # The current incarnation's directory (NAME, or NAME.gN after a checkpoint-migration) and any other left over.
    for vm_dir in {ctx.paths.vm_dir(name), ctx.paths.vm_dir(name, 1), record.overlay.parent}:
        if vm_dir.parent == ctx.paths.root / "vms":
            shutil.rmtree(vm_dir, ignore_errors=True)
    ctx.ledger.delete_vm(name, f"destroyed {name}")
