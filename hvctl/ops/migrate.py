"""hvctl migrate: move a running VM to another host with libvirt's migrate3, after prechecks that refuse early.

Order: every precheck (VM and host known, not the same host, target reachable, CPU compatible, no passthrough
device, disks reachable) → reserve the target's capacity in the ledger → migrate while reporting job stats → one
ledger transaction moves the VM and turns the reservation into its allocation. On failure or cancel the VM stays
on the source, the reservation is released and the event log says what happened.
"""

from __future__ import annotations

import shutil
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hvctl.accounting import host_footprint
from hvctl.context import Context
from hvctl.domain.model import retarget_paths, retarget_ssh_forward
from hvctl.errors import AlreadyExists, HvctlError, InvalidSpec, NotFound
from hvctl.host import DomainState, Guest, Host
from hvctl.ledger import QuotaExceeded, VMRecord
from hvctl.ops.ckpt_migrate import checkpoint_migrate
from hvctl.ops.create import check_network
from hvctl.ops.incarnation import make_overlay
from hvctl.paths import VMFiles, make_private_dir
from hvctl.placement import host_limit

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


class MigrationFailed(HvctlError):
    exit_code = 15


def migrate(ctx: Context, name: str, target: str, opts: MigrateOptions,
            on_progress: Callable[[dict[str, Any]], None] | None = None,
            on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    ledger = ctx.ledger
    record = ledger.get_vm(name)
    target_record = ledger.get_host(target)
    if target == record.host:
        raise InvalidSpec(f"{name} is already on host {target}")
    if record.spec.gpus.count and opts.mode != "checkpoint":
        raise InvalidSpec(f"{name} holds {record.spec.gpus.count} passthrough GPU(s), whose state cannot be moved "
                          "live", hint="use --mode checkpoint")
    if opts.mode == "checkpoint" and record.agent_token is None:
        raise InvalidSpec(f"{name} has no agent, and checkpoint mode moves its workloads through it",
                          hint="use --mode offline")
    if opts.copy_storage and opts.mode == "checkpoint":
        raise InvalidSpec("--copy-storage does not apply to --mode checkpoint, which boots a fresh disk on the target")
    if opts.copy_storage and not ctx.is_this_machine(target):
        raise InvalidSpec(f"--copy-storage needs the destination overlay created before the copy; hvctl creates it "
                          f"only on hosts that share this machine's filesystem, and {target} ({target_record.uri}) "
                          "is remote")
    src = ctx.host(record.host)
    guest = src.guest(name)
    check_network(ctx, record.spec, target)  # its production NIC's bridge or network must exist there too
    if guest.state() is not DomainState.RUNNING and opts.mode != "offline":
        raise InvalidSpec(f"{name} is not running; use --mode offline")
    if opts.mode == "checkpoint":
        try:
            return checkpoint_migrate(ctx, record, target, opts.timeout_s, on_step)
        except BaseException as exc:
            message = exc.message if isinstance(exc, HvctlError) else f"{type(exc).__name__}: {exc}"
            ledger.log_event(name, record.host, "migration.failed", f"checkpoint-migration of {name} to {target} "
                                                                    f"failed: {message}; it stays on {record.host}")
            if isinstance(exc, (InvalidSpec, NotFound, QuotaExceeded)) or not isinstance(exc, Exception):
                raise  # refused before anything moved, or interrupted: the error says it all
            raise MigrationFailed(f"checkpoint-migration of {name} to {target} failed: {message}; "
                                  f"it is still on {record.host}, its workloads running") from exc
    dst = ctx.host(target)
    compatible, detail = src.cpu_compatible_with(dst)
    if not compatible:
        raise InvalidSpec(f"cannot migrate {name} to {target}: {detail}")
    if ctx.is_this_machine(target):
        # With --copy-storage the overlay travels; its backing image and the seed must already be there.
        needed = (record.base_disk, *([record.seed] if record.seed else []))
        for disk in needed if opts.copy_storage else (record.overlay, *needed):
            if not Path(disk).exists():
                raise InvalidSpec(f"{disk} is not reachable from {target}",
                                  hint=None if opts.copy_storage else "use --copy-storage")
    files = ctx.paths.next_vm_files(record.name, record.overlay) if opts.copy_storage else None
    if files is not None and files.dir.exists():
        raise AlreadyExists(f"{files.dir} is left over from an earlier operation on {name}",
                            hint="remove it (nothing in the ledger refers to it)")
    gpus = len(ledger.host_inventory(target)[1])
    reservation = ledger.reserve(target, record.tenant, host_footprint(record.spec), "migration", vm=name,
                                 host_limit=host_limit(ctx.policy, target_record, gpus))
    moved: dict[str, str] | None = None
    try:
        port = ledger.free_port_on(target, bind_address=str(record.spec.ssh_bind) if ctx.is_this_machine(target)
                                   else None)
        dest_xml = retarget_ssh_forward(guest.migratable_xml(), port)
        copy_disks: tuple[str, ...] = ()
        if files is not None:
            dest_xml, copy_disks, moved = _prepare_storage_copy(record, files, dest_xml,
                                                                 ctx.host(target).qemu_gid())
        if opts.max_downtime_ms:
            guest.set_max_downtime(opts.max_downtime_ms)
        stats = _run(ctx, guest, record.host, target, dest_xml, opts, on_progress, copy_disks)
    except BaseException as exc:
        ledger.release(reservation)
        if files is not None:
            shutil.rmtree(files.dir, ignore_errors=True)
        message = exc.message if isinstance(exc, HvctlError) else f"{type(exc).__name__}: {exc}"
        ledger.log_event(name, record.host, "migration.failed", f"migration of {name} to {target} failed: "
                                                                f"{message}; it stays on {record.host}")
        raise
    ledger.complete_migration(name, target, port, reservation, stats, moved=moved)
    if opts.copy_storage:
        shutil.rmtree(record.overlay.parent, ignore_errors=True)  # the source's copy: the VM runs on the new one
    return stats


def _prepare_storage_copy(record: VMRecord, files: VMFiles, dest_xml: str,
                          qemu_gid: int | None) -> tuple[str, tuple[str, ...], dict[str, str]]:
    """The destination's files for a storage-copying migration: an empty overlay of the same size on the same
    backing image (QEMU mirrors the source overlay into it), the seed, and new console/agent paths."""
    make_private_dir(files.dir, qemu_gid)
    make_overlay(record.base_disk, files.overlay, record.spec.disk_gib)
    moves = {str(record.overlay): str(files.overlay), str(record.console_log): str(files.console_log),
             str(record.agent_socket): str(files.agent_socket)}
    if record.seed:
        shutil.copy2(record.seed, files.seed)
        moves[str(record.seed)] = str(files.seed)
    copy_disks = []
    for disk in ET.fromstring(dest_xml).iterfind("devices/disk"):
        source, target = disk.find("source"), disk.find("target")
        if source is not None and target is not None and source.get("file") == str(record.overlay):
            copy_disks.append(str(target.get("dev")))
    moved = {"overlay": str(files.overlay), "console_log": str(files.console_log),
             "agent_socket": str(files.agent_socket)} | ({"seed": str(files.seed)} if record.seed else {})
    return retarget_paths(dest_xml, moves), tuple(copy_disks), moved


def _run(ctx: Context, guest: Guest, source: str, target: str, dest_xml: str, opts: MigrateOptions,
         on_progress: Callable[[dict[str, Any]], None] | None, copy_disks: tuple[str, ...] = ()) -> dict[str, Any]:
    name = guest.name
    dst = ctx.host(target)
    failure: list[BaseException] = []
    migrate_uri = "tcp://127.0.0.1" if ctx.is_this_machine(target) else None

    def worker() -> None:
        try:
            # A second connection: libvirt serialises calls per connection, and the poller must not wait on this.
            own_src, own_dst = Host(guest.host.uri), Host(dst.uri)
            try:
                own_src.guest(name).migrate(own_dst, dest_xml, live=opts.mode != "offline",
                                postcopy=opts.mode == "postcopy" or opts.timeout_action == "postcopy",
                                auto_converge=opts.auto_converge, copy_storage=opts.copy_storage,
                                bandwidth_mib_s=opts.bandwidth_mib_s, migrate_uri=migrate_uri,
                                storage_verified_shared=migrate_uri is not None and not opts.copy_storage,
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
        exc = failure[0]
        message = exc.message if isinstance(exc, HvctlError) else str(exc)
        hint = None
        if "Postcopy is not supported" in message:
            hint = ("post-copy needs userfaultfd for the unprivileged QEMU on the destination: "
                    "sysctl vm.unprivileged_userfaultfd=1, or use --auto-converge")
        raise MigrationFailed(f"migration of {name} to {target} failed: {message}; it is still on {source}",
                              hint=hint) from exc
    total = time.monotonic() - started
    arrived = dst.find_guest(name)
    completed = arrived.job_stats(completed=True) if arrived is not None else {}
    return {
        "total_s": round(total, 3),
        "downtime_ms": completed.get("downtime"),
        "bytes": completed.get("data_processed") or completed.get("memory_processed"),
        "memory_iterations": completed.get("memory_iteration"),
        "mode": opts.mode,
        "switched_to_postcopy": switched and (opts.mode == "postcopy" or opts.timeout_action == "postcopy"),
    }
