"""hvctl create: reserve in the ledger, make the overlay disk, define, start, wait for the guest to say it is up."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from hvctl import passthrough
from hvctl.agent_client import AgentClient, AgentError
from hvctl.console import ConsoleSource, console_size, console_tail, wait_for_ready
from hvctl.context import Context
from hvctl.designer import BootArtifacts, VMAllocation, design, nic_mac
from hvctl.errors import AlreadyExists, GuestTimeout, ImageError, InvalidSpec
from hvctl.host import DomainState
from hvctl.ledger import Admission, VMRecord
from hvctl.ops import Reporter, SilentReporter, Undo, pooled
from hvctl.passthrough import GpuAllocation
from hvctl.paths import VMFiles, make_private_dir
from hvctl.placement import choose_host, host_limit
from hvctl.seed import KeyPair, build_seed, generate_ed25519, new_agent_token, operator_key, public_key_of
from hvctl.spec import VMSpec

DEFAULT_BOOT_TIMEOUT = 120.0


def create(ctx: Context, spec: VMSpec, reporter: Reporter | None = None,
           boot_timeout: float = DEFAULT_BOOT_TIMEOUT, extra_cmdline: tuple[str, ...] = (),
           extra_qemu_args: tuple[str, ...] = (), stats: dict[str, object] | None = None) -> VMRecord:
    """``stats``, if given, receives numbers a caller may report: ``image_upload`` (bytes, seconds) for a VM on a
    host that keeps its files in its storage pool."""
    say = (reporter or SilentReporter()).step
    # Every check that can refuse the request runs before anything is written anywhere, the state dir included.
    policy = ctx.policy
    quota = policy.tenant(spec.tenant).quota
    paths = ctx.paths
    overlay = paths.overlay(spec.name)
    image = ctx.images.get(spec.image)
    image.verify()
    if spec.host is None:
        ctx.capabilities(ctx.host_name)  # the connected host's capacity must be known to place on it
        say("placing")
        spec = spec.model_copy(update={"host": choose_host(ctx.ledger, policy, spec)})
    assert spec.host is not None
    host = ctx.host(spec.host)
    ctx.capabilities(spec.host)  # probed (cached) before anything is written
    gpus = len(ctx.ledger.host_inventory(spec.host)[1])
    admission = Admission(tenant_limit=quota.model_dump(),
                          host_limit=host_limit(policy, ctx.ledger.get_host(spec.host), gpus))
    if host.exists(spec.name):
        raise AlreadyExists(f"a domain named {spec.name!r} already exists on host {spec.host}")
    check_network(ctx, spec, spec.host)
    if spec.disk_gib * 2**30 < image.disk_virtual_bytes:
        need = -(-image.disk_virtual_bytes // 2**30)
        raise InvalidSpec(f"image {image.name} needs a disk of at least {need} GiB; {spec.disk_gib} GiB requested")
    # A host that does not share this machine's filesystem keeps the VM's files in its storage pool.
    pool_files = None if ctx.is_this_machine(spec.host) else pooled.open_files(host, spec.name)
    if pool_files is not None:
        pooled.check_room(pool_files, spec, spec.host)
    elif overlay.exists():
        raise AlreadyExists(f"disk path {overlay} already exists", hint="remove it or pick another name")
    authorized = authorized_keys_for(ctx, spec)
    host_key = generate_ed25519(f"hvctl-host-{spec.name}")
    token = new_agent_token()
    # Shared per host and content-addressed, so not part of this VM's undo; an upload cut short leaves nothing.
    image_volumes = pooled.upload_image(pool_files, image, say, _upload_progress(say)) if pool_files else None
    if image_volumes is not None and stats is not None:
        stats["image_upload"] = {"image": image.name, "bytes": image_volumes.uploaded_bytes,
                                 "seconds": round(image_volumes.seconds, 3)}

    with Undo() as undo:
        say("reserving in the ledger")
        files = paths.vm_files(spec.name)
        base_disk, disk, console, socket, seed = (image.base_disk, overlay, files.console_log, files.agent_socket,
                                                  files.seed)
        if pool_files is not None and image_volumes is not None:  # paths on the VM's host, in its pool
            base_disk, socket = Path(image_volumes.base.path), Path(pool_files.agent_socket)
            disk, console, seed = (Path(pool_files.path(v)) for v in (pool_files.disk, pool_files.console,
                                                                       pool_files.seed))
        record = ctx.ledger.reserve_vm(spec, spec.host, base_disk, disk, console, socket, agent_token=token,
                                       host_pubkey=host_key.public_line, seed=seed,
                                       bind_address=str(spec.ssh_bind), admission=admission)
        undo.push("forget the ledger row", lambda: ctx.ledger.delete_vm(spec.name, "create rolled back"))
        if spec.gpus.count:
            say(f"binding {spec.gpus.count} GPU(s) to vfio-pci")
        gpu_alloc = passthrough.allocate(ctx, ctx.gpu_env, spec, spec.host, undo)
        if pool_files is not None and image_volumes is not None:
            message = pooled.boot_pooled(ctx, spec, spec.host, pool_files, image_volumes, record.ssh_port,
                                         authorized, host_key, token, undo, say, boot_timeout, extra_cmdline,
                                         extra_qemu_args)
        else:
            message = boot_incarnation(ctx, spec, spec.host, files, record.ssh_port, authorized, host_key, token,
                                       undo, say, boot_timeout, extra_cmdline, extra_qemu_args, gpu_alloc)
        if gpu_alloc:
            message += f"; GPUs {', '.join(gpu_alloc.gpus)}"
        ctx.ledger.set_state(spec.name, "running", message)
        undo.commit()
    return ctx.ledger.get_vm(spec.name)


def _upload_progress(say: Callable[[str], None]) -> Callable[[str, int, int], None]:
    """Upload progress as reporter steps, one per tenth of each file."""
    shown: dict[str, int] = {}

    def progress(what: str, done: int, total: int) -> None:
        tenth = done * 10 // max(total, 1)
        if shown.get(what) != tenth:
            shown[what] = tenth
            say(f"uploading {what}: {done / 2**20:.0f} of {total / 2**20:.0f} MiB")

    return progress


def authorized_keys_for(ctx: Context, spec: VMSpec) -> list[str]:
    """The keys a VM's root account accepts: its tenant's, and hvctl's operator key unless the spec declines it."""
    operator = [public_key_of(operator_key(ctx.paths.keys))] if spec.operator_key else []
    return operator + [k for _, k in ctx.ledger.tenant_keys(spec.tenant)]


def boot_incarnation(ctx: Context, spec: VMSpec, host_name: str, files: VMFiles, ssh_port: int,
                     authorized: list[str], host_key: KeyPair, token: str, undo: Undo, say: Callable[[str], None],
                     boot_timeout: float, extra_cmdline: tuple[str, ...] = (),
                     extra_qemu_args: tuple[str, ...] = (), gpus: GpuAllocation | None = None) -> str:
    """Files, seed, domain, boot, agent: one incarnation of ``spec`` on ``host_name``, every step pushed on
    ``undo``. The caller holds the capacity (a ledger row, or a migration's reservation). Returns how it went."""
    image = ctx.images.get(spec.image)
    host, caps = ctx.host(host_name), ctx.capabilities(host_name)
    if files.overlay.exists():
        raise AlreadyExists(f"disk path {files.overlay} already exists", hint="remove it or pick another name")
    made_dir = not files.dir.exists()
    make_private_dir(files.dir, host.qemu_gid(), exist_ok=True)
    if made_dir:
        undo.push("remove the VM directory", lambda: shutil.rmtree(files.dir, ignore_errors=True))

    say(f"creating {spec.disk_gib} GiB overlay on {image.name}@{image.content_hash[:8]}")
    make_overlay(image.base_disk, files.overlay, spec.disk_gib)
    undo.push("remove the overlay disk", lambda: files.overlay.unlink(missing_ok=True))
    say("writing the seed: hostname, SSH keys, the VM's own host key, agent token")
    build_seed(files.seed, spec.name, authorized, host_key, token,
               (nic_mac(spec.name), spec.network) if spec.network else None)
    undo.push("remove the seed", lambda: files.seed.unlink(missing_ok=True))

    domain = design(
        spec, caps,
        BootArtifacts(kernel=image.kernel, initrd=image.initrd, root_on_disk=image.kind.value != "initramfs"),
        VMAllocation(overlay=files.overlay, console_log=files.console_log, agent_socket=files.agent_socket,
                     ssh_port=ssh_port, ssh_bind_address=str(spec.ssh_bind), seed=files.seed,
                     hostdevs=gpus.hostdevs if gpus else (), pcihole64_kib=gpus.pcihole64_kib if gpus else None),
        extra_cmdline,
        extra_qemu_args,
    )
    say(f"defining domain on {host_name} ({caps.accel.value}, q35, {spec.vcpus} vCPU, {spec.memory_mib} MiB)")
    host.define(domain.to_xml())
    undo.push("undefine the domain", lambda: host.undefine(spec.name))

    say("starting")
    offset = console_size(files.console_log)  # the file is appended to: only what this boot prints counts
    host.start(spec.name)
    undo.push("destroy the domain", lambda: host.destroy(spec.name))

    say("waiting for the guest to report ready")
    started = time.monotonic()
    line, waited = wait_for_ready(spec.name, files.console_log, boot_timeout,
                                  lambda: host.state(spec.name) is DomainState.RUNNING, offset=offset)
    message = f"guest up after {waited:.2f} s: {line}"
    if image.agent:
        say("waiting for the agent")
        wait_for_agent(ctx.agent(host_name, spec.name, token), spec.name, files.console_log,
                       boot_timeout - (time.monotonic() - started))
        message += f"; agent ready after {time.monotonic() - started:.2f} s"
    return message


def check_network(ctx: Context, spec: VMSpec, host_name: str) -> None:
    """The production NIC's bridge or libvirt network must exist (and be up) before anything is written."""
    net = spec.network
    if net is None:
        return
    if net.network is not None:
        active = ctx.host(host_name).network_active(net.network)
        if active is None:
            raise InvalidSpec(f"host {host_name} has no libvirt network {net.network!r}",
                              hint="define it with `virsh net-define` / `net-start`, or use --bridge")
        if not active:
            raise InvalidSpec(f"libvirt network {net.network!r} on host {host_name} is not active",
                              hint=f"virsh net-start {net.network}")
    elif ctx.is_this_machine(host_name) and not Path(f"/sys/class/net/{net.bridge}/bridge").is_dir():
        raise InvalidSpec(f"there is no bridge {net.bridge!r} on host {host_name}",
                          hint=f"create it first (ip link add {net.bridge} type bridge)")


def wait_for_agent(agent: AgentClient, name: str, console_log: Path | ConsoleSource, timeout: float) -> None:
    """Agent-ready: the agent answered a ping with this VM's token. A timeout carries the console tail."""
    try:
        agent.wait_ready(max(timeout, 1.0))
    except AgentError as exc:
        raise GuestTimeout(f"the agent of {name} never answered: {exc.message}",
                           console_tail=console_tail(console_log)) from None


def make_overlay(base: Path, overlay: Path, size_gib: int) -> None:
    # umask 077: the overlay is born 0600; libvirt's DAC driver hands it to QEMU's user while the VM runs.
    result = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay), f"{size_gib}G"],
        capture_output=True, text=True, umask=0o077,
    )
    if result.returncode != 0:
        overlay.unlink(missing_ok=True)
        raise ImageError(f"cannot create overlay {overlay}: {result.stderr.strip()}")
