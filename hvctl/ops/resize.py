"""hvctl resize NAME [--vcpus N] [--memory MIB] [--disk GIB]: what the VM may use, admitted like a create.

- The disk only grows. A running VM's grows at once (libvirt's block resize; the guest sees the new capacity) and
  its agent grows the root filesystem (resize2fs, online); a stopped VM's overlay grows on disk, and hvctl's
  images grow the filesystem at their next boot.
- vCPUs and memory change in the persistent definition (with the memory hard limit): they take effect at the next
  boot (`hvctl restart NAME`). hvctl's domains are created with their maxima equal to their sizes, so there is no
  headroom to hot-plug into.

The growth is admitted against the tenant's quota and the host's capacity in the ledger transaction that records
the new size; a refused resize changes nothing.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import Any

from guest import rpc
from hvctl.context import Context
from hvctl.designer import qemu_overhead_mib
from hvctl.errors import HvctlError, InvalidSpec
from hvctl.host import DomainState
from hvctl.ledger import Admission, OperationRecord, VMRecord
from hvctl.ops import Say, pooled, quiet
from hvctl.ops.intent import operation
from hvctl.placement import admission_for
from hvctl.spec import VMSpec


@dataclass(frozen=True)
class Applied:
    """How a resize took effect: vCPUs and memory ("unchanged", "at the next boot" of a running VM, "at the start" of
    a stopped one), the disk ("unchanged", "grown live", "grown") and the guest's filesystem (None: not touched)."""

    cpu_memory: str = "unchanged"
    disk: str = "unchanged"
    filesystem: str | None = None


@dataclass(frozen=True)
class Resized:
    name: str
    spec: VMSpec  # the new size
    applied: Applied

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "vcpus": self.spec.vcpus, "memory_mib": self.spec.memory_mib,
                "disk_gib": self.spec.disk_gib, "cpu_memory": self.applied.cpu_memory, "disk": self.applied.disk,
                "filesystem": self.applied.filesystem}


def resize(ctx: Context, name: str, vcpus: int | None = None, memory_mib: int | None = None,
           disk_gib: int | None = None, say: Say = quiet) -> Resized:
    record = ctx.ledger.vms.get(name)
    old = record.spec
    changes = {k: v for k, v in (("vcpus", vcpus), ("memory_mib", memory_mib), ("disk_gib", disk_gib))
               if v is not None and v != getattr(old, k)}
    if not changes:
        raise InvalidSpec(f"{name} already has {old.vcpus} vCPU, {old.memory_mib} MiB and a {old.disk_gib} GiB "
                          "disk; give --vcpus, --memory or --disk with another value")
    if disk_gib is not None and disk_gib < old.disk_gib:
        raise InvalidSpec(f"disks only grow: {name}'s is {old.disk_gib} GiB, {disk_gib} GiB asked",
                          hint="shrinking would cut off whatever the guest keeps at the end of its disk")
    new = VMSpec.parse(**(old.model_dump() | changes))  # the same bounds as a create
    with operation(ctx, name, "resize", data={"from": old.model_dump(mode="json")}, say=say) as op:
        policy = ctx.policy
        admission = admission_for(ctx.ledger, policy, record.tenant, record.host)
        say("admitting the new size")
        ctx.ledger.vms.resize(name, new, admission)
        op.step("recorded")
        try:
            applied = _apply(ctx, name, record.host, old, new, say)
        except BaseException:
            ctx.ledger.vms.resize(name, old, Admission({}, {}))  # back to what the VM still has
            raise
        op.step("applied")
    return Resized(name, new, applied)


def _apply(ctx: Context, name: str, host_name: str, old: VMSpec, new: VMSpec, say: Say) -> Applied:
    record = ctx.ledger.vms.get(name)
    guest = ctx.host(host_name).guest(name)
    running = guest.state() in (DomainState.RUNNING, DomainState.PAUSED)
    cpu_memory, disk, filesystem = "unchanged", "unchanged", None  # Applied's defaults
    if (new.vcpus, new.memory_mib) != (old.vcpus, old.memory_mib):
        say(f"setting {new.vcpus} vCPU and {new.memory_mib} MiB for the next boot")
        limited = ctx.capabilities(host_name).memory_limits
        guest.set_next_boot_size(new.vcpus, new.memory_mib * 1024,
                                 (new.memory_mib + qemu_overhead_mib(new)) * 1024 if limited else None)
        cpu_memory = "at the next boot" if running else "at the start"
    if new.disk_gib != old.disk_gib:
        size = new.disk_gib * 2**30
        if running:
            say(f"growing the running guest's disk to {new.disk_gib} GiB")
            guest.block_resize("vda", size)
            disk, filesystem = "grown live", _grow_filesystem(ctx, record, say)
        elif ctx.is_this_machine(host_name):
            say(f"growing the overlay to {new.disk_gib} GiB")
            done = subprocess.run(["qemu-img", "resize", "-q", str(record.overlay), str(size)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise HvctlError(f"cannot grow {record.overlay}: {done.stderr.strip()}")
            disk, filesystem = "grown", "at the next boot"
        else:
            say(f"growing the overlay volume to {new.disk_gib} GiB")
            pooled.open_files(ctx.host(host_name), name).pool.resize(record.overlay.name, size)
            disk, filesystem = "grown", "at the next boot"
    return Applied(cpu_memory, disk, filesystem)


def _grow_filesystem(ctx: Context, record: VMRecord, say: Say) -> str:
    """resize2fs on the guest's root disk, online, through the agent: its new size as the guest's df reports it."""
    if not record.agent_token:
        return "not grown: the image has no agent (its init grows it at the next boot, if it does that)"
    say("growing the guest's filesystem (resize2fs, online)")
    agent = ctx.agent(record.host, record.name, record.agent_token)
    grown = agent.typed("exec", rpc.ExecResult, rpc.ExecParams(argv=["resize2fs", "/dev/vda"], timeout_s=300),
                        timeout=330)
    if grown.exit_code != 0:
        return f"not grown: resize2fs said {(grown.stderr or grown.stdout).strip()[-200:]}"
    df = agent.typed("exec", rpc.ExecResult, rpc.ExecParams(argv=["df", "-B1", "--output=size", "/"]))
    size = df.stdout.split()[-1] if df.exit_code == 0 and df.stdout.split() else "?"
    return f"grown to {int(size) / 2**30:.2f} GiB" if size.isdigit() else "grown"


def reconcile_resize(ctx: Context, op: OperationRecord) -> str:
    """An interrupted resize keeps the size the ledger recorded; running `hvctl resize` again with it applies
    whatever did not happen (each step is idempotent)."""
    ctx.ledger.operations.end(op.vm)
    return "the ledger keeps the new size; `hvctl resize` with it again finishes applying it"
