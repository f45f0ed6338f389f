"""hvctl create: reserve in the ledger, make the overlay disk, define, start, wait for the guest to say it is up."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from hvctl.console import wait_for_ready
from hvctl.context import Context
from hvctl.designer import BootArtifacts, VMAllocation, design
from hvctl.errors import AlreadyExists, ImageError
from hvctl.host import DomainState
from hvctl.ledger import VMRecord
from hvctl.ops import Reporter, SilentReporter, Undo
from hvctl.spec import VMSpec

DEFAULT_BOOT_TIMEOUT = 120.0


def create(ctx: Context, spec: VMSpec, reporter: Reporter | None = None,
           boot_timeout: float = DEFAULT_BOOT_TIMEOUT, extra_cmdline: tuple[str, ...] = ()) -> VMRecord:
    say = (reporter or SilentReporter()).step
    paths = ctx.paths
    overlay, vm_dir = paths.overlay(spec.name), paths.vm_dir(spec.name)

    # Every check that can refuse the request runs before anything is written anywhere.
    host = ctx.host(spec.host)
    image = ctx.images.get(spec.image)
    image.verify()
    caps = ctx.capabilities(spec.host)
    if host.exists(spec.name):
        raise AlreadyExists(f"a domain named {spec.name!r} already exists on host {spec.host}")
    if overlay.exists():
        raise AlreadyExists(f"disk path {overlay} already exists", hint="remove it or pick another name")

    with Undo() as undo:
        say("reserving in the ledger")
        record = ctx.ledger.reserve_vm(spec, spec.host, image.base_disk, overlay, paths.console_log(spec.name),
                                       paths.agent_socket(spec.name))
        undo.push("forget the ledger row", lambda: ctx.ledger.delete_vm(spec.name, "create rolled back"))

        made_dir = not vm_dir.exists()
        vm_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        if made_dir:
            undo.push("remove the VM directory", lambda: shutil.rmtree(vm_dir, ignore_errors=True))

        say(f"creating {spec.disk_gib} GiB overlay on {image.name}@{image.content_hash[:8]}")
        make_overlay(image.base_disk, overlay, spec.disk_gib)
        undo.push("remove the overlay disk", lambda: overlay.unlink(missing_ok=True))

        domain = design(
            spec, caps,
            BootArtifacts(kernel=image.kernel, initrd=image.initrd, root_on_disk=image.kind.value != "initramfs"),
            VMAllocation(overlay=overlay, console_log=record.console_log, agent_socket=record.agent_socket,
                         ssh_port=record.ssh_port),
            extra_cmdline,
        )
        say(f"defining domain ({caps.accel.value}, q35, {spec.vcpus} vCPU, {spec.memory_mib} MiB)")
        host.define(domain.to_xml())
        undo.push("undefine the domain", lambda: host.undefine(spec.name))

        say("starting")
        host.start(spec.name)
        undo.push("destroy the domain", lambda: host.destroy(spec.name))

        say("waiting for the guest to report ready")
        line, waited = wait_for_ready(spec.name, record.console_log, boot_timeout,
                                      lambda: host.state(spec.name) is DomainState.RUNNING)
        ctx.ledger.set_state(spec.name, "running", f"guest up after {waited:.2f} s: {line}")
        undo.commit()
    return ctx.ledger.get_vm(spec.name)


def make_overlay(base: Path, overlay: Path, size_gib: int) -> None:
    result = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay), f"{size_gib}G"],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        overlay.unlink(missing_ok=True)
        raise ImageError(f"cannot create overlay {overlay}: {result.stderr.strip()}")
