"""hvctl migrate: move a running VM to another host with libvirt's migrate3, after prechecks that refuse early.

Order: every precheck (VM and host known, not the same host, target reachable, CPU compatible, no passthrough
device, disks reachable) → reserve the target's capacity in the ledger → migrate while reporting job stats → one
ledger transaction moves the VM and turns the reservation into its allocation. On failure or cancel the VM stays
on the source, the reservation is released and the event log says what happened.
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import socket
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from hvctl.accounting import host_footprint
from hvctl.context import Context
from hvctl.domain.model import retarget_paths, retarget_ssh_forward, retarget_tenant_filter
from hvctl.errors import AlreadyExists, HvctlError, InvalidSpec, MigrationFailed, NotFound
from hvctl.host import DomainState, Guest, Host
from hvctl.ledger import OperationRecord, QuotaExceeded, VMRecord
from hvctl.ops import Say, pooled, quiet
from hvctl.ops.ckpt_migrate import checkpoint_migrate
from hvctl.ops.create import check_network
from hvctl.ops.incarnation import make_overlay
from hvctl.ops.intent import Operation, operation
from hvctl.ops.migrated import Migrated
from hvctl.ops.networks import leave_if_unused
from hvctl.ops.target import Target
from hvctl.paths import make_private_dir

Mode = Literal["live", "postcopy", "offline", "checkpoint"]


@dataclass(frozen=True)
class MigrateOptions:
    mode: Mode = "live"
    max_downtime_ms: int | None = None
    bandwidth_mib_s: int | None = None
    auto_converge: bool = False
    copy_storage: bool = False
    timeout_s: float | None = None
    timeout_action: Literal["abort", "postcopy"] = "abort"
    rejoin_job: bool = False  # checkpoint mode: a job member leaves and rejoins (ckpt_member; experimental)


def migrate(ctx: Context, name: str, target: str, opts: MigrateOptions,
            on_progress: Callable[[dict[str, Any]], None] | None = None,
            say: Say = quiet) -> Migrated:
    """A live (or offline) migration holds the VM's operation lock with a durable intent (``hvctl.ops.intent``),
    so a crash at any step is finished or rolled back by ``reconcile_migration``."""
    ctx.ledger.vms.get(name)  # NotFound before any lock
    kind = "migrate-checkpoint" if opts.mode == "checkpoint" else "migrate"
    with operation(ctx, name, kind, target=target, say=say) as op:
        return _migrate(ctx, name, target, opts, on_progress, say, op)


def _migrate(ctx: Context, name: str, target: str, opts: MigrateOptions,
             on_progress: Callable[[dict[str, Any]], None] | None, say: Say,
             op: Operation) -> Migrated:
    ledger = ctx.ledger
    record = ledger.vms.get(name)
    target_record = ledger.hosts.get(target)  # an unknown host is refused first
    _refuse(ctx, record, target, opts)  # from the ledger alone, before any host is contacted
    dest = Target.of(ctx, target_record)
    src = ctx.host(record.host)
    guest = src.guest(name)
    check_network(ctx, record.spec, dest, say)  # its production NIC's bridge or network must exist there too
    if guest.state() is not DomainState.RUNNING and opts.mode != "offline":
        raise InvalidSpec(f"{name} is not running; use --mode offline")
    if guest.state() is DomainState.SHUTOFF and opts.copy_storage:
        raise InvalidSpec(f"{name} is stopped: libvirt moves a stopped domain's definition only, and cannot copy "
                          "its disk", hint=f"`hvctl start {name}` and migrate it live with --copy-storage")
    if opts.mode == "checkpoint":
        return _checkpoint(ctx, record, dest, opts, say, op)
    compatible, detail = src.cpu_compatible_with(dest.host)
    if not compatible:
        raise InvalidSpec(f"cannot migrate {name} to {target}: {detail}")
    _refuse_storage(ctx, record, dest, opts)
    op.step("checked", source=record.host, uuid=guest.uuid, source_overlay=str(record.overlay),
            copy_storage=opts.copy_storage)
    return _move(ctx, record, guest, dest, opts, on_progress, say, op)


def _refuse(ctx: Context, record: VMRecord, target: str, opts: MigrateOptions) -> None:
    """What the ledger alone can refuse: the VM's own host, GPUs moved live, an agentless checkpoint migration,
    internal snapshots, and options that contradict each other. (A disabled target is refused by its ``Target``.)"""
    name = record.name
    if target == record.host:
        raise InvalidSpec(f"{name} is already on host {target}")
    if record.spec.gpus.count and opts.mode != "checkpoint":
        raise InvalidSpec(f"{name} holds {record.spec.gpus.count} passthrough GPU(s), whose state cannot be moved "
                          "live", hint="use --mode checkpoint")
    if opts.mode == "checkpoint" and record.agent_token is None:
        raise InvalidSpec(f"{name} has no agent, and checkpoint mode moves its workloads through it",
                          hint="use --mode offline")
    snapshots = ctx.ledger.snapshots.all(name)
    if snapshots:
        raise InvalidSpec(f"{name} has {len(snapshots)} snapshot(s) ({', '.join(s.name for s in snapshots)}); "
                          "libvirt does not migrate a domain with internal snapshots",
                          hint=f"`hvctl snapshot rm {name} SNAP` each first")
    if opts.copy_storage and opts.mode == "checkpoint":
        raise InvalidSpec("--copy-storage does not apply to --mode checkpoint, which boots a fresh disk on the target")


def _checkpoint(ctx: Context, record: VMRecord, dest: Target, opts: MigrateOptions, say: Say,
                op: Operation) -> Migrated:
    """A checkpoint migration (``hvctl.ops.ckpt_migrate``), its failure logged and named as one."""
    name, target = record.name, dest.name
    try:
        return checkpoint_migrate(ctx, record, dest, opts.timeout_s, say, op, rejoin_job=opts.rejoin_job)
    except BaseException as exc:
        message = exc.message if isinstance(exc, HvctlError) else f"{type(exc).__name__}: {exc}"
        ctx.ledger.events.log(name, record.host, "migration.failed", f"checkpoint-migration of {name} to {target} "
                                                                    f"failed: {message}; it stays on {record.host}",
                              {"mode": opts.mode, "target": target})
        if isinstance(exc, (InvalidSpec, NotFound, QuotaExceeded)) or not isinstance(exc, Exception):
            raise  # refused before anything moved, or interrupted: the error says it all
        raise MigrationFailed(f"checkpoint-migration of {name} to {target} failed: {message}; "
                              f"it is still on {record.host}, its workloads running") from exc


def _refuse_storage(ctx: Context, record: VMRecord, dest: Target, opts: MigrateOptions) -> None:
    """The VM's disk must either stay reachable from the target (both hosts this machine) or be copied."""
    name, target = record.name, dest.name
    both_here = ctx.is_this_machine(record.host) and dest.here
    if not both_here and not opts.copy_storage:
        raise InvalidSpec(f"{record.host} and {target} share no storage that hvctl knows of, so {name}'s disk "
                          "cannot stay where it is", hint="use --copy-storage")
    if both_here:
        # With --copy-storage the overlay travels; its backing image and the seed must already be there.
        needed = (record.base_disk, *([record.seed] if record.seed else []))
        for disk in needed if opts.copy_storage else (record.overlay, *needed):
            if not Path(disk).exists():
                raise InvalidSpec(f"{disk} is not reachable from {target}",
                                  hint=None if opts.copy_storage else "use --copy-storage")


def _move(ctx: Context, record: VMRecord, guest: Guest, dest: Target, opts: MigrateOptions,
          on_progress: Callable[[dict[str, Any]], None] | None, say: Say, op: Operation) -> Migrated:
    """Reserve the target (its share and an SSH port), move the domain, and commit the move in the ledger; a
    failure releases the reservation and leaves the VM on its source."""
    name, ledger, target = record.name, ctx.ledger, dest.name
    reservation, port = ledger.reservations.hold_with_port(
        target, record.tenant, host_footprint(record.spec), "migration", name, host_limit=dest.allowance,
        port_free=dest.port_check(str(record.spec.ssh_bind)))
    copy: StorageCopy | None = None
    try:
        op.step("reserved", reservation=reservation, port=port)
        dest_xml = retarget_tenant_filter(retarget_ssh_forward(guest.migratable_xml(), port))
        moved: dict[str, str] | None = None
        if opts.copy_storage:
            copy = prepare_storage_copy(ctx, record, dest, dest_xml, say)
            dest_xml, moved = copy.dest_xml, copy.moved
            op.step("prepared", moved=moved)
        else:
            # Both QEMUs on this machine's filesystem: the source's, exiting after the switch-over, would unlink
            # the agent channel's socket under the destination's, leaving the agent unreachable. The destination
            # listens on the other of two socket names instead.
            socket_path = shared_storage_socket(record.agent_socket)
            socket_path.unlink(missing_ok=True)  # a stale one from an earlier crash: no QEMU listens on it
            dest_xml = retarget_paths(dest_xml, {str(record.agent_socket): str(socket_path)})
            moved = {"agent_socket": str(socket_path)}
            op.step("prepared", moved=moved)
        if opts.max_downtime_ms:
            guest.set_max_downtime(opts.max_downtime_ms)
        stats = _run(ctx, guest, record.host, dest, dest_xml, opts, _recording(ctx, op, record.host, target,
                                                                                 on_progress),
                     copy.copy_disks if copy else ())
        op.step("migrated")  # libvirt has finished: the VM runs on the target, the ledger does not say so yet
    except BaseException as exc:
        ledger.reservations.release(reservation)
        if copy is not None:
            copy.discard()
        message = exc.message if isinstance(exc, HvctlError) else f"{type(exc).__name__}: {exc}"
        ledger.events.log(name, record.host, "migration.failed", f"migration of {name} to {target} failed: "
                                                                f"{message}; it stays on {record.host}",
                         {"mode": opts.mode, "target": target})
        raise
    ledger.vms.complete_migration(name, target, port, reservation, stats.as_json(), moved=moved)
    op.step("committed")
    if opts.copy_storage:
        _discard_source_files(ctx, record)  # the source's copy: the VM runs on the new one
    if record.spec.network is not None and record.spec.network.tenant_network is not None:
        leave_if_unused(ctx, record.spec.network.tenant_network, record.host, say)
    return stats


def shared_storage_socket(current: Path) -> Path:
    """The agent socket a live migration on shared storage gives the destination: ``agent.live`` beside
    ``agent.sock``, and back (the same length, so a path that fit at create still fits)."""
    return current.with_name("agent.live" if current.name == "agent.sock" else "agent.sock")


def reconcile_migration(ctx: Context, op: OperationRecord) -> str:
    """An interrupted live migration, decided by where the domain with the VM's UUID runs now:
    - the ledger already says the target (killed after the commit): the source's leftover copy is removed;
    - it runs on the target and no longer on the source (libvirt finished, hvctl did not commit): committed now,
      with the reservation turned into its allocation, and the source's copy removed;
    - it runs on the source and not on the target: rolled back, the reservation released and the target's copy
      of its disk (made for --copy-storage, unused) removed;
    - on both, or on neither: not decided; the row stays, and the reason is returned.
    A file or volume is removed only when no host of the two runs a domain with that UUID from it."""
    vm, target, data = op.vm, op.target_host, op.data
    source = data.get("source")
    ledger = ctx.ledger
    if source is None:  # killed before the checks ended: nothing was made
        ledger.operations.end(vm)
        return "nothing had been done yet"
    record = ledger.vms.get(vm)
    uuid = data["uuid"]
    copy_storage = bool(data.get("copy_storage"))
    if record.host == target:
        if copy_storage and ctx.host(source).find_guest_by_uuid(uuid) is None:
            _discard_source_files(ctx, dataclasses.replace(record, host=source,
                                                           overlay=Path(data["source_overlay"])))
        ledger.operations.end(vm)
        return f"it had been committed on {target}" + ("; the source's copy of its disk is removed" if copy_storage
                                                       else "")
    there = ctx.host(target).find_guest_by_uuid(uuid)
    here = ctx.host(source).find_guest_by_uuid(uuid)
    live = (DomainState.RUNNING, DomainState.PAUSED)
    if there is not None and there.state() in live and (here is None or here.state() not in live):
        reservation = data.get("reservation")
        port = data.get("port")
        if reservation is None or port is None:
            return "undecided: the VM runs on the target, but the intent has no reservation or port"
        ledger.vms.complete_migration(vm, target, int(port), int(reservation), {"reconciled": True},
                                  moved=data.get("moved"))
        if copy_storage and here is None:
            _discard_source_files(ctx, dataclasses.replace(record, overlay=Path(data["source_overlay"])))
        ledger.operations.end(vm)
        return f"libvirt had finished: committed on {target}"
    if here is not None and here.state() in live and there is None:
        ledger.reservations.release_for(vm, "migration", target)
        if copy_storage:
            _discard_target_copy(ctx, record, target)
        ledger.operations.end(vm)
        return f"it never left {source}: rolled back"
    return (f"undecided: the domain runs on {'both hosts' if here and there else 'neither host'}; "
            "if a migration is still finishing, try again in a moment")


def _discard_target_copy(ctx: Context, record: VMRecord, target: str) -> None:
    """The unused disk a failed or rolled-back --copy-storage made on the target: the directory beside the VM's
    here, or its volumes in the target's pool (the VM itself is elsewhere: its ledger row names other files)."""
    if ctx.is_this_machine(target):
        files = ctx.paths.next_vm_files(record.name, record.overlay)
        if files.dir != record.overlay.parent:
            shutil.rmtree(files.dir, ignore_errors=True)
    else:
        pooled.open_files(ctx.host(target), record.name).delete()


def migration_address(ctx: Context, source: str, target: str) -> str:
    """Where the source host's QEMU reaches the target's (memory, and the disks' NBD mirror): loopback when both
    are this machine; between two other hosts, the target's underlay address when it has one (`host add
    --underlay`: the address other hosts reach it at, which its URI's, the controller's way in, need not be);
    otherwise the address the target's URI names when it is another host; and when only the source is another
    host, this machine's own address on its route to that host (the kernel's choice of source address for a
    datagram socket connected there: nothing is sent)."""
    underlay = ctx.ledger.networks.underlays().get(target)
    address: str | None
    if underlay is not None and not ctx.is_this_machine(source) and not ctx.is_this_machine(target):
        address = str(underlay)
    elif not ctx.is_this_machine(target):
        address = urlsplit(ctx.ledger.hosts.get(target).uri).hostname
        if not address:
            raise InvalidSpec(f"host {target}'s URI names no address that {source} could migrate to")
    elif ctx.is_this_machine(source):
        address = "127.0.0.1"
    else:
        peer = urlsplit(ctx.ledger.hosts.get(source).uri).hostname
        if not peer:
            raise InvalidSpec(f"host {source}'s URI names no address, so hvctl cannot tell which of this "
                              "machine's addresses it reaches")
        try:
            family, kind, _, _, where = socket.getaddrinfo(peer, 9, type=socket.SOCK_DGRAM)[0]
            with socket.socket(family, kind) as probe:
                probe.connect(where)
                address = str(probe.getsockname()[0])
        except OSError as exc:
            raise InvalidSpec(f"no route from this machine to host {source} ({peer}): {exc}") from None
    return f"[{address}]" if ":" in address else address


@dataclass(frozen=True)
class StorageCopy:
    """The destination's side of a storage-copying migration: the domain XML naming its files, the disks QEMU
    mirrors into them, the ledger columns that change, and how to delete them if the migration fails."""

    dest_xml: str
    copy_disks: tuple[str, ...]
    moved: dict[str, str]
    discard: Callable[[], object]


def prepare_storage_copy(ctx: Context, record: VMRecord, dest: Target, dest_xml: str,
                         say: Say) -> StorageCopy:
    """An empty overlay of the same size on the target, on the image's base there (QEMU mirrors the source overlay
    into it; only the top layer travels), the seed, and new console and agent paths. On this machine they are
    files under the state dir (NAME or NAME.g1); on another host, volumes in its pool, the image uploaded there
    first if it has never had it. Every path of the VM the domain names is moved: kernel, initrd, backing image."""
    image = ctx.images.for_base(record.base_disk)  # the build its overlay was made on, whichever is newest
    os_el = ET.fromstring(dest_xml).find("os")
    seed = _seed_bytes(ctx, record) if record.seed else None
    target = dest.name
    new: dict[str, object]
    if dest.here:
        files = ctx.paths.next_vm_files(record.name, record.overlay)
        if files.dir.exists():
            raise AlreadyExists(f"{files.dir} is left over from an earlier operation on {record.name}",
                                hint="remove it (nothing in the ledger refers to it)")
        make_private_dir(files.dir, dest.host.qemu_gid())
        try:
            make_overlay(image.base_disk, files.overlay, record.spec.disk_gib)
            if seed is not None:
                fd = os.open(files.seed, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
                with os.fdopen(fd, "wb") as out:
                    out.write(seed)
        except BaseException:
            _discard_target_copy(ctx, record, target)
            raise
        new = {"overlay": files.overlay, "console_log": files.console_log, "agent_socket": files.agent_socket,
               "seed": files.seed, "base_disk": image.base_disk, "kernel": image.kernel, "initrd": image.initrd}
    else:
        pool_files = pooled.open_files(dest.host, record.name)
        pooled.check_room(pool_files, record.spec, target)
        volumes = pooled.upload_image(ctx, target, pool_files, image, say)
        pool = pool_files.pool
        try:
            say(f"creating a {record.spec.disk_gib} GiB overlay volume on {target} for the copy")
            pool.create(pool_files.disk, record.spec.disk_gib * 2**30, fmt="qcow2", backing=volumes.base)
            if seed is not None:
                pool.upload(pool_files.seed, seed)
        except BaseException:
            _discard_target_copy(ctx, record, target)
            raise
        new = {"overlay": pool_files.path(pool_files.disk), "console_log": pool_files.path(pool_files.console),
               "agent_socket": pool_files.agent_socket, "seed": pool_files.path(pool_files.seed),
               "base_disk": volumes.base.path, "kernel": volumes.kernel.path if volumes.kernel else None,
               "initrd": volumes.initrd.path if volumes.initrd else None}
    old = {"overlay": record.overlay, "console_log": record.console_log, "agent_socket": record.agent_socket,
           "seed": record.seed, "base_disk": record.base_disk,
           "kernel": os_el.findtext("kernel") if os_el is not None else None,
           "initrd": os_el.findtext("initrd") if os_el is not None else None}
    moves = {str(old[key]): str(value) for key, value in new.items() if old[key]}
    copy_disks = []
    for disk in ET.fromstring(dest_xml).iterfind("devices/disk"):
        source, dev = disk.find("source"), disk.find("target")
        if source is not None and dev is not None and source.get("file") == str(record.overlay):
            copy_disks.append(str(dev.get("dev")))
    moved = {key: str(new[key]) for key in ("overlay", "console_log", "agent_socket", "base_disk")}
    if record.seed:
        moved["seed"] = str(new["seed"])
    return StorageCopy(retarget_paths(dest_xml, moves), tuple(copy_disks), moved,
                       lambda: _discard_target_copy(ctx, record, target))


def _seed_bytes(ctx: Context, record: VMRecord) -> bytes:
    """The VM's seed ISO as it is now, read here or from its host's pool: it is not a disk QEMU mirrors."""
    assert record.seed is not None
    if ctx.is_this_machine(record.host):
        return record.seed.read_bytes()
    files = pooled.open_files(ctx.host(record.host), record.name)
    sink = io.BytesIO()
    files.pool.download(files.seed, sink)
    return sink.getvalue()


def _discard_source_files(ctx: Context, record: VMRecord) -> None:
    """After a storage-copying migration committed: the source's files (its directory here, or its volumes in its
    host's pool). A failure is logged: the VM has moved, and what is left is drift."""
    try:
        if ctx.is_this_machine(record.host):
            shutil.rmtree(record.overlay.parent, ignore_errors=True)
        else:
            pooled.open_files(ctx.host(record.host), record.name).delete()
    except HvctlError as exc:
        ctx.ledger.events.log(record.name, record.host, "migration.source-left",
                             f"the source's copy of {record.name}'s files could not be deleted: {exc.message}")


# How often a running migration's progress is written to the ledger (its operation row and an event).
PROGRESS_EVERY_S = 1.0


def _recording(ctx: Context, op: Operation, source: str, target: str,
               on_progress: Callable[[dict[str, Any]], None] | None) -> Callable[[dict[str, Any]], None]:
    """``on_progress``, plus the progress written to the ledger at most every PROGRESS_EVERY_S: the operation
    row's data (``hvctl show`` in another shell) and a ``migration.progress`` event (``hvctl events --follow``)."""
    last = [float("-inf")]

    def record(stats: dict[str, Any]) -> None:
        if on_progress:
            on_progress(stats)
        now = time.monotonic()
        if now - last[0] < PROGRESS_EVERY_S:
            return
        last[0] = now
        done, left = int(stats.get("data_processed", 0)), int(stats.get("data_remaining", 0))
        summary = {"target": target, "elapsed_s": round(float(stats.get("elapsed_s", 0.0)), 1),
                   "bytes_done": done, "bytes_left": left,
                   "percent": round(100.0 * done / (done + left), 1) if done + left else None,
                   "iteration": int(stats.get("memory_iteration", 0)),
                   "expected_downtime_ms": stats.get("downtime")}
        op.progress(summary)
        pct = f"{summary['percent']:.0f}%" if summary["percent"] is not None else "starting"
        ctx.ledger.events.log(op.vm, source, "migration.progress",
                             f"migrating to {target}: {pct}, {done / 2**20:.1f} MiB sent, {left / 2**20:.1f} MiB "
                             f"left, iteration {summary['iteration']}", summary)

    return record


def _run(ctx: Context, guest: Guest, source: str, dest: Target, dest_xml: str, opts: MigrateOptions,
         on_progress: Callable[[dict[str, Any]], None] | None, copy_disks: tuple[str, ...] = ()) -> Migrated:
    name, target, dst = guest.name, dest.name, dest.host
    failure: list[BaseException] = []
    migrate_uri = f"tcp://{migration_address(ctx, source, target)}"
    both_here = ctx.is_this_machine(source) and dest.here

    def worker() -> None:
        try:
            # A second connection: libvirt serialises calls per connection, and the poller must not wait on this.
            own_src, own_dst = Host(guest.host.uri), Host(dst.uri)
            try:
                own_guest = own_src.guest(name)
                own_guest.migrate(own_dst, dest_xml, live=opts.mode != "offline",
                                  stopped=own_guest.state() is DomainState.SHUTOFF,
                                  postcopy=opts.mode == "postcopy" or opts.timeout_action == "postcopy",
                                  auto_converge=opts.auto_converge, copy_storage=opts.copy_storage,
                                  bandwidth_mib_s=opts.bandwidth_mib_s, migrate_uri=migrate_uri,
                                  storage_verified_shared=both_here and not opts.copy_storage,
                                  copy_disks=copy_disks)
            finally:
                own_src.close()
                own_dst.close()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread below
            failure.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=worker, name=f"migrate-{name}", daemon=True)
    thread.start()
    switched = False
    while thread.is_alive():
        stats = guest.job_stats()
        elapsed = time.monotonic() - started
        if on_progress and stats:
            on_progress(stats | {"elapsed_s": elapsed})
        if opts.mode == "postcopy" and not switched and int(str(stats.get("memory_iteration", 0))) >= 1:
            # Post-copy: one full pre-copy pass, then the guest runs on the destination and faults pages over.
            switched = True
            guest.start_postcopy()
        elif opts.timeout_s is not None and elapsed > opts.timeout_s and not switched:
            switched = True
            if opts.timeout_action == "postcopy" and opts.mode != "offline":
                guest.start_postcopy()
            else:
                guest.abort_job()
        thread.join(0.2)
    if failure:
        raise _failed(name, source, target, failure[0]) from failure[0]
    total = time.monotonic() - started
    arrived = dst.find_guest(name)
    completed = arrived.job_stats(completed=True) if arrived is not None else {}
    return Migrated(
        mode=opts.mode, total_s=round(total, 3), downtime_ms=_count(completed.get("downtime")),
        bytes=_count(completed.get("data_processed") or completed.get("memory_processed")),
        memory_iterations=_count(completed.get("memory_iteration")),
        switched_to_postcopy=switched and (opts.mode == "postcopy" or opts.timeout_action == "postcopy"),
    )


def _failed(name: str, source: str, target: str, exc: BaseException) -> MigrationFailed:
    message = exc.message if isinstance(exc, HvctlError) else str(exc)
    hint = None
    if "Postcopy is not supported" in message:
        hint = ("post-copy needs userfaultfd for the unprivileged QEMU on the destination: "
                "sysctl vm.unprivileged_userfaultfd=1, or use --auto-converge")
    return MigrationFailed(f"migration of {name} to {target} failed: {message}; it is still on {source}", hint=hint)


def _count(value: object) -> int | None:
    """One of libvirt's job statistics (integers), or None where the job did not report it."""
    return int(value) if isinstance(value, int) else None
