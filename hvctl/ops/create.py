"""hvctl create: reserve in the ledger, make the overlay disk, define, start, wait for the guest to say it is up."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from hvctl import passthrough
from hvctl.context import Context
from hvctl.errors import AlreadyExists, InvalidSpec, NotFound
from hvctl.ledger import OperationRecord, VMRecord, VMState
from hvctl.ops import Say, Undo, pooled, quiet
from hvctl.ops.incarnation import BootOptions, GuestSecrets, Incarnation, LocalStorage, Storage, boot
from hvctl.ops.intent import operation
from hvctl.ops.lifecycle import remove_vm_files
from hvctl.ops.networks import ensure_on_host, publish_lease, withdraw_lease, withdraw_vm_lease
from hvctl.ops.target import Target
from hvctl.placement import choose_host
from hvctl.spec import VMSpec
from images.store import Image


def create(ctx: Context, spec: VMSpec, say: Say = quiet, options: BootOptions | None = None,
           stats: dict[str, object] | None = None) -> VMRecord:
    """``stats``, if given, receives numbers a caller may report: ``image_upload`` (bytes, seconds) for a VM on a
    host that keeps its files in its storage pool."""
    # Every check that can refuse the request runs before anything is written anywhere, the state dir included.
    policy = ctx.policy
    policy.tenant(spec.tenant)  # an unknown tenant is refused first
    image = ctx.images.get(spec.image)
    image.verify()
    if spec.host is None:
        ctx.capabilities()  # the connected host's capacity must be known to place on it
        say("placing")
        spec = spec.model_copy(update={"host": choose_host(ctx.ledger, policy, spec)})
    assert spec.host is not None
    target = Target.resolve(ctx, spec.host, hint=f"`hvctl host enable {spec.host}`, or leave out --host")
    if target.host.exists(spec.name):
        raise AlreadyExists(f"a domain named {spec.name!r} already exists on host {target.name}")
    check_network(ctx, spec, target, say)
    if spec.disk_gib * 2**30 < image.disk_virtual_bytes:
        need = -(-image.disk_virtual_bytes // 2**30)
        raise InvalidSpec(f"image {image.name} needs a disk of at least {need} GiB; {spec.disk_gib} GiB requested")
    storage = _storage_for(ctx, spec, image, target, say, stats)
    secrets = GuestSecrets.fresh(ctx, spec)

    with operation(ctx, spec.name, "create", target=target.name, say=say) as op, Undo() as undo:
        say("reserving in the ledger")
        record = ctx.ledger.vms.reserve(spec, target.name, storage.paths, agent_token=secrets.token,
                                       host_pubkey=secrets.host_key.public_line,
                                       admission=target.admission(policy, spec.tenant),
                                       port_free=target.port_check(str(spec.ssh_bind)))
        undo.push("forget the ledger row", lambda: ctx.ledger.vms.delete(spec.name, "create rolled back"))
        spec = record.spec.model_copy(update={"host": record.host})  # as recorded: with its tenant address, if any
        op.step("reserved")
        served = publish_lease(ctx, spec, say)
        if served and spec.network is not None and spec.network.tenant_network is not None:
            undo.push("withdraw the DHCP lease",
                      functools.partial(withdraw_lease, ctx, spec.network.tenant_network, spec.name, served))
        if spec.gpus.count:
            say(f"binding {spec.gpus.count} GPU(s) to vfio-pci")
        gpu_alloc = passthrough.allocate(ctx, ctx.gpu_env, spec, target.name, undo)
        if gpu_alloc and gpu_alloc.unsized:
            say(f"host {target.name}'s libvirt does not report BAR sizes and the policy gives no mmio64_gib for "
                f"{', '.join(gpu_alloc.unsized)}: the guest gets QEMU's default 64-bit PCI hole (32 GiB)")
        incarnation = Incarnation(spec, image, target, storage, record.ssh_port, secrets, gpu_alloc)
        message = boot(ctx, incarnation, options or BootOptions(), undo, say,
                       lambda refused: ctx.ledger.vms.move_ssh_port(spec.name, str(spec.ssh_bind), refused,
                                                                    target.port_check(str(spec.ssh_bind))),
                       op.step)
        op.step("ready")
        if gpu_alloc:
            message += f"; GPUs {', '.join(gpu_alloc.gpus)}"
        ctx.ledger.vms.set_domain_uuid(spec.name, target.host.guest(spec.name).uuid)
        ctx.ledger.vms.set_state(spec.name, VMState.RUNNING, message)
        undo.commit()
    return ctx.ledger.vms.get(spec.name)


def _storage_for(ctx: Context, spec: VMSpec, image: Image, target: Target, say: Say,
                 stats: dict[str, object] | None) -> Storage:
    """Where the VM's files go, checked for room before anything is written: this machine's state dir, or, on a
    host that does not share this machine's filesystem, that host's storage pool (the image uploaded once)."""
    if target.here:
        files = ctx.paths.vm_files(spec.name)
        if files.overlay.exists():
            raise AlreadyExists(f"disk path {files.overlay} already exists", hint="remove it or pick another name")
        return LocalStorage(files, image, target.host.qemu_gid())
    pool_files = pooled.open_files(target.host, spec.name)
    pooled.check_room(pool_files, spec, target.name)
    # Shared per host and content-addressed, so not part of this VM's undo; an upload cut short leaves nothing.
    volumes = pooled.upload_image(ctx, target.name, pool_files, image, say, _upload_progress(say))
    if stats is not None:
        stats["image_upload"] = {"image": image.name, "bytes": volumes.uploaded_bytes,
                                 "seconds": round(volumes.seconds, 3)}
    return pooled.PoolStorage(pool_files, volumes)


def _upload_progress(say: Say) -> Callable[[str, int, int], None]:
    """Upload progress as reporter steps, one per tenth of each file."""
    shown: dict[str, int] = {}

    def progress(what: str, done: int, total: int) -> None:
        tenth = done * 10 // max(total, 1)
        if shown.get(what) != tenth:
            shown[what] = tenth
            say(f"uploading {what}: {done / 2**20:.0f} of {total / 2**20:.0f} MiB")

    return progress


def check_network(ctx: Context, spec: VMSpec, target: Target, say: Say = quiet) -> None:
    """The production NIC's bridge or libvirt network must exist (and be up) on ``target`` before anything is
    written; a tenant network is set up on the host then (it stays there until `hvctl network rm`)."""
    net = spec.network
    if net is None:
        return
    if net.tenant_network is not None:  # hvctl's own: checked in the ledger, and made on the host if it is not there
        ensure_on_host(ctx, spec, target.name, say)
        return
    if net.network is not None:
        active = target.host.network_active(net.network)
        if active is None:
            raise InvalidSpec(f"host {target.name} has no libvirt network {net.network!r}",
                              hint="define it with `virsh net-define` / `net-start`, or use --bridge")
        if not active:
            raise InvalidSpec(f"libvirt network {net.network!r} on host {target.name} is not active",
                              hint=f"virsh net-start {net.network}")
    elif target.here and not Path(f"/sys/class/net/{net.bridge}/bridge").is_dir():
        raise InvalidSpec(f"there is no bridge {net.bridge!r} on host {target.name}",
                          hint=f"create it first (ip link add {net.bridge} type bridge)")


def reconcile_create(ctx: Context, op: OperationRecord) -> str:
    """An interrupted create is rolled back: its domain (by the UUID the intent recorded, else by name and hvctl's
    metadata on the target host), its GPUs, its files or volumes, its DHCP lease, and its ledger row. One that had
    committed (the ledger says running) is left as it is."""
    vm, ledger = op.vm, ctx.ledger
    try:
        record = ledger.vms.get(vm)
    except NotFound:
        ledger.operations.end(vm)
        return "nothing had been recorded"
    if record.state != VMState.CREATING:
        ledger.operations.end(vm)
        return f"it had finished ({record.state})"
    host = ctx.host(record.host)
    uuid = op.data.get("uuid")
    guest = host.find_guest_by_uuid(uuid) if uuid else host.find_guest(vm)
    if guest is not None and (uuid or guest.made_by_hvctl()):
        guest.destroy()
        guest.undefine()
    if ledger.gpus.bindings(record.host, vm):
        passthrough.release_vm(ctx, ctx.gpu_env, vm, record.host)
    remove_vm_files(ctx, record)
    withdraw_vm_lease(ctx, record)
    ledger.vms.delete(vm, "an interrupted create was rolled back")
    ledger.operations.end(vm)
    return f"rolled back on {record.host}"
