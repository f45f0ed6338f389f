"""hvctl host add/list/rm: hosts are libvirt URIs; their capacity comes from libvirt itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address
from typing import Any, NamedTuple

from hvctl import passthrough
from hvctl.accounting import Usage
from hvctl.context import Context
from hvctl.errors import AlreadyExists, HostUnreachable, HvctlError, InvalidSpec
from hvctl.host import DomainState, Host, identity
from hvctl.ledger import Hardware, HostRecord, NumaCell
from hvctl.names import check_name
from hvctl.ops import Say
from hvctl.ops.migrate import MigrateOptions, Mode, migrate
from hvctl.placement import choose_host, host_limit
from vfio import PciSysfs

# Enough for the largest image hvctl builds (ml: ~1.5 GiB with torch) to be uploaded once.
MIN_POOL_FREE_BYTES = 2 << 30


@dataclass(frozen=True)
class HostView:
    """`hvctl host list`: a host as the ledger has it, its hardware, what the policy lets be allocated there and
    what is."""

    record: HostRecord
    hardware: Hardware
    allocatable: dict[str, float | None]
    allocated: Usage
    vms: int
    underlay: str | None

    def as_json(self) -> dict[str, Any]:
        r = self.record
        return {"name": r.name, "uri": r.uri, "enabled": r.enabled, "accel": r.accel, "cpus": r.cpus,
                "memory_mib": r.memory_mib, **self.hardware.as_dict(), "allocatable": self.allocatable,
                "allocated": self.allocated.as_dict(), "vms": self.vms, "underlay": self.underlay}


@dataclass(frozen=True)
class PoolView:
    name: str
    path: str
    made: bool  # made for hvctl now, or adopted as it was
    capacity_bytes: int
    available_bytes: int


@dataclass(frozen=True)
class HostAdded:
    """`hvctl host add`: the host's view, its storage pool, its libvirt and CPU, and for each registered host
    whether guests started there can migrate to it."""

    view: HostView
    pool: PoolView
    libvirt_version: str
    cpu_model: str | None
    hostname: str
    migration_from: dict[str, str]

    def as_json(self) -> dict[str, Any]:
        return self.view.as_json() | {"pool": asdict(self.pool), "libvirt_version": self.libvirt_version,
                                      "cpu_model": self.cpu_model, "hostname": self.hostname,
                                      "migration_from": self.migration_from}


def add_host(ctx: Context, name: str, uri: str, underlay: str | None = None) -> HostAdded:
    """Connect first: a URI that does not answer is refused before anything is written."""
    check_name(name, "host name")
    try:
        underlay_address = IPv4Address(underlay) if underlay is not None else None
    except ValueError:
        raise InvalidSpec(f"--underlay {underlay}: not an IPv4 address") from None
    if name in {h.name for h in ctx.ledger.hosts.all()} and ctx.ledger.hosts.get(name).uri != uri:
        raise AlreadyExists(f"host {name} already exists with another URI")
    probe = Host(uri)
    try:
        facts = probe.facts()
        migration = cpu_compatibility(ctx, probe, exclude=name)
        # The host's storage pool for hvctl: adopted, or made (and taken back if the host is refused below).
        pool, made = probe.ensure_pool()
        space = pool.space()
        if space.available < MIN_POOL_FREE_BYTES:
            if made:
                pool.release()
            raise InvalidSpec(f"host {name}: pool {pool.name} at {pool.path} has {space.available // 2**20} MiB "
                              f"free, under the {MIN_POOL_FREE_BYTES // 2**30} GiB hvctl needs for an image",
                              hint="free space there, or adopt a larger pool under that name")
        cells = probe.capabilities().cells
        # This machine's GPUs are read (and bound) through sysfs, any other host's through its node devices.
        here = uri.startswith("test:") or identity.is_this_machine(uri, probe.conn, ctx.local_daemon_uuids())
        gpus = passthrough.inventory_rows(ctx, PciSysfs(ctx.gpu_env.sysfs_root) if here else probe.pci_devices())
    finally:
        probe.close()
    ctx.ledger.hosts.ensure(name, uri)
    ctx.ledger.hosts.record_hardware(name, Hardware(tuple(NumaCell(c.cpus, c.memory_mib) for c in cells), gpus))
    if underlay_address is not None:
        ctx.ledger.networks.set_underlay(name, underlay_address)
    caps = ctx.capabilities(name)
    pool_view = PoolView(pool.name, str(pool.path), made, space.capacity, space.available)
    ctx.ledger.events.log(None, name, "host.added", f"host {name} at {uri}: {facts.cpus} CPUs, {facts.memory_mib} MiB, "
                                                   f"{len(cells)} NUMA cells, {len(gpus)} GPUs, {caps.accel.value}")
    return HostAdded(host_view(ctx, name), pool_view, facts.libvirt_version, facts.cpu_model, facts.hostname,
                     migration)


def cpu_compatibility(ctx: Context, new: Host, exclude: str) -> dict[str, str]:
    """For each registered host that answers: can a guest started there run on ``new``? (libvirt compares that
    host's CPU with the new one's.) A host that does not answer is left out."""
    found = {}
    for record in ctx.ledger.hosts.all():
        if record.name == exclude:
            continue
        try:
            ok, detail = ctx.host(record.name).cpu_compatible_with(new)
        except HostUnreachable:
            continue
        except HvctlError as exc:  # a driver that cannot compare CPUs (libvirt's test driver) says so
            found[record.name] = f"not compared: {exc.message}"
            continue
        found[record.name] = detail if ok else f"incompatible: {detail}"
    return found


def host_view(ctx: Context, name: str) -> HostView:
    record = ctx.ledger.hosts.get(name)
    hardware = ctx.ledger.hosts.hardware(name)
    underlay = ctx.ledger.networks.underlays().get(name)
    return HostView(record, hardware, host_limit(ctx.policy, record, len(hardware.gpus)), ctx.ledger.host_usage(name),
                    len(ctx.ledger.vms.all(host=name)), str(underlay) if underlay else None)


def set_enabled(ctx: Context, name: str, enabled: bool, reason: str = "") -> bool:
    """Let the scheduler place VMs on the host, or stop it; returns whether anything changed. A disabled host keeps
    its VMs running; create --host and migrate --to refuse it."""
    record = ctx.ledger.hosts.get(name)
    if record.enabled == enabled:
        return False
    ctx.ledger.hosts.set_enabled(name, enabled)
    what = "enabled" if enabled else "disabled"
    ctx.ledger.events.log(None, name, f"host.{what}", f"host {name} {what}" + (f": {reason}" if reason else ""))
    return True


class Moved(NamedTuple):
    vm: str
    to: str
    mode: str
    total_s: float


class Stayed(NamedTuple):
    vm: str
    error: str


@dataclass(frozen=True)
class Evacuated:
    """`hvctl host evacuate`: each VM that moved (where, how, in how long), and each that could not, with why."""

    host: str
    moved: tuple[Moved, ...]
    failed: tuple[Stayed, ...]

    def as_json(self) -> dict[str, Any]:
        return {"host": self.host, "moved": [m._asdict() for m in self.moved],
                "failed": [f._asdict() for f in self.failed]}


def evacuate(ctx: Context, name: str, say: Say = lambda _: None,
             on_progress: Callable[[dict[str, Any]], None] | None = None) -> Evacuated:
    """Move every VM off host ``name`` to hosts the scheduler picks: running VMs live, stopped ones offline, VMs
    with passthrough GPUs by checkpoint migration; with their disks copied when the two hosts do not share this
    machine's filesystem. The host is disabled first, so that nothing new lands on it. Each VM is tried once; what
    could not move is reported with why, and the others still go."""
    ctx.ledger.hosts.get(name)
    set_enabled(ctx, name, False, "evacuating")
    moved: list[Moved] = []
    failed: list[Stayed] = []
    vms = ctx.ledger.vms.all(host=name)
    for i, record in enumerate(vms, 1):
        prefix = f"[{i}/{len(vms)}] {record.name}: "
        say(prefix + "placing")
        try:
            actual = ctx.host(name).state(record.name)
            mode: Mode
            if record.spec.gpus.count:
                mode = "checkpoint"
            elif actual is DomainState.RUNNING:
                mode = "live"
            elif actual is DomainState.SHUTOFF:
                mode = "offline"
            else:
                raise HvctlError(f"it is {actual.value}; resume or stop it, then evacuate again")
            target = choose_host(ctx.ledger, ctx.policy, record.spec.model_copy(update={"host": None}))
            copy = mode != "checkpoint" and not (ctx.is_this_machine(name) and ctx.is_this_machine(target))
            say(prefix + f"{mode} migration to {target}" + (" (copying its disk)" if copy else ""))
            stats = migrate(ctx, record.name, target, MigrateOptions(mode=mode, copy_storage=copy), on_progress,
                            lambda step: say(prefix + step))  # noqa: B023 - called within this iteration only
            moved.append(Moved(record.name, target, mode, stats.total_s))
        except HvctlError as exc:
            failed.append(Stayed(record.name, exc.message))
    ctx.ledger.events.log(None, name, "host.evacuated", f"host {name}: {len(moved)} VM(s) moved, "
                                                       f"{len(failed)} could not be"
                                                       + "".join(f"; {vm}: {why}" for vm, why in failed))
    return Evacuated(name, tuple(moved), tuple(failed))
