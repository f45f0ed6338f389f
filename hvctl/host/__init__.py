"""The host layer: the only package that imports libvirt. One ``Host`` per connection URI, local or remote.

Binding quirks are recorded where the call is made. libvirt errors become hvctl's typed errors here, so nothing above
this module needs to know libvirt's exception type.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import libvirt

from hvctl.console import PROBE_MARKER
from hvctl.domain import Accel, DirectBoot, Domain, SerialConsole
from hvctl.domain.model import HVCTL_NS
from hvctl.errors import HostUnreachable, HypervisorError, NotFound
from hvctl.host import capabilities, devices, networks
from hvctl.host._errors import _errors, _msg, _typed
from hvctl.host.guest import STATE_MAP, ByteStream, ChannelBusy, DomainState, Guest
from hvctl.host.storage import Pool, Volume, ensure_pool
from vfio import NodeDeviceInventory
from vfio.binding import BindingJournal, DeviceBinder

__all__ = ["ByteStream", "ChannelBusy", "DomainEvent", "DomainState", "Guest", "Pool", "Volume"]

# hvctl's storage pool on each host: where the host's libvirt keeps images uploaded to it.
DEFAULT_POOL = "hvctl"
DEFAULT_POOL_PATH = PurePosixPath("/var/lib/libvirt/images/hvctl")

# libvirt prints every error to stderr by default, before the caller sees the exception. We report errors ourselves.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

_events_lock = threading.Lock()
_events_started = False


def _ensure_event_loop() -> None:
    """libvirt's client event loop, once per process in a daemon thread. Non-blocking streams (the agent channel)
    wake their reader through it, and libvirt wants it registered before the first connection opens."""
    global _events_started
    with _events_lock:
        if _events_started:
            return
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=_run_event_loop, name="libvirt-events", daemon=True).start()
        _events_started = True


def _run_event_loop() -> None:
    while True:
        if libvirt.virEventRunDefaultImpl() < 0:
            time.sleep(0.05)  # never spin if the loop itself fails


@dataclass(frozen=True)
class DomainEvent:
    """One domain event as libvirt delivered it."""

    vm: str
    uri: str
    kind: str
    message: str
    ts: float = field(default_factory=time.time)


_LIFECYCLE = {libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined", libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
              libvirt.VIR_DOMAIN_EVENT_STARTED: "started", libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
              libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed", libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
              libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown", libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "pmsuspended",
              libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed"}
_LIFECYCLE_DETAIL = {
    (libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_BOOTED): "booted",
    (libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_MIGRATED): "migrated in",
    (libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_RESTORED): "restored",
    (libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_FROM_SNAPSHOT): "from a snapshot",
    (libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_SUSPENDED_PAUSED): "paused",
    (libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED): "for the migration's end",
    (libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_SUSPENDED_IOERROR): "by a disk I/O error",
    (libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_SUSPENDED_FROM_SNAPSHOT): "from a snapshot",
    (libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY): "post-copy",
    (libvirt.VIR_DOMAIN_EVENT_RESUMED, libvirt.VIR_DOMAIN_EVENT_RESUMED_UNPAUSED): "unpaused",
    (libvirt.VIR_DOMAIN_EVENT_RESUMED, libvirt.VIR_DOMAIN_EVENT_RESUMED_MIGRATED): "migrated",
    (libvirt.VIR_DOMAIN_EVENT_RESUMED, libvirt.VIR_DOMAIN_EVENT_RESUMED_FROM_SNAPSHOT): "from a snapshot",
    (libvirt.VIR_DOMAIN_EVENT_RESUMED, libvirt.VIR_DOMAIN_EVENT_RESUMED_POSTCOPY): "post-copy",
    (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN): "the guest shut down",
    (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED): "destroyed",
    (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED): "crashed",
    (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED): "migrated away",
    (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED): "failed",
    (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT): "for a snapshot",
    (libvirt.VIR_DOMAIN_EVENT_SHUTDOWN, libvirt.VIR_DOMAIN_EVENT_SHUTDOWN_FINISHED): "the guest finished shutting down",
}
_IO_ACTION = {libvirt.VIR_DOMAIN_EVENT_IO_ERROR_NONE: "none", libvirt.VIR_DOMAIN_EVENT_IO_ERROR_PAUSE: "paused",
              libvirt.VIR_DOMAIN_EVENT_IO_ERROR_REPORT: "reported to the guest"}


@dataclass(frozen=True)
class HostFacts:
    arch: str
    cpus: int
    memory_mib: int
    domain_types: frozenset[str]
    hostname: str
    libvirt_version: str = ""
    cpu_model: str = ""


class Host:
    def __init__(self, uri: str, timeout: float = 10.0) -> None:
        self.uri = uri
        _ensure_event_loop()
        try:
            # libvirt.open() blocks until the daemon answers or the transport fails; a dead local socket fails
            # at once ("No such file or directory"), an unreachable remote one when ssh/tcp gives up.
            self.conn = libvirt.open(uri)
        except libvirt.libvirtError as exc:
            remote = "+" in uri.split(":", 1)[0]
            raise HostUnreachable(f"cannot reach libvirt at {uri}: {_msg(exc)}",
                                  hint="check that the host answers, that its libvirtd runs, and for qemu+ssh that "
                                       "it accepts your key and its host key is the one you pinned" if remote
                                  else "is libvirtd running? (`make daemons` starts one)") from None

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self.conn.close()

    def domain_stats(self) -> dict[str, dict[str, Any]]:
        """libvirt's bulk statistics (virConnectGetAllDomainStats: state, CPU time, balloon, vCPUs, interfaces,
        block devices) for every domain on this host, by name, in one call."""
        wanted = (libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL | libvirt.VIR_DOMAIN_STATS_BALLOON
                  | libvirt.VIR_DOMAIN_STATS_VCPU | libvirt.VIR_DOMAIN_STATS_INTERFACE
                  | libvirt.VIR_DOMAIN_STATS_BLOCK)
        with _errors(f"reading domain statistics on {self.uri}"):
            return {dom.name(): dict(stats) for dom, stats in self.conn.getAllDomainStats(wanted, 0)}

    def watch_domain_events(self, deliver: Callable[[DomainEvent], None]) -> Callable[[], None]:
        """Call ``deliver`` (on libvirt's event-loop thread) for each lifecycle change, guest reboot, disk I/O
        error, migration iteration and finished job of any domain on this host. Returns the unsubscribe."""
        def lifecycle(_c: Any, dom: Any, event: int, detail: int, _o: Any) -> None:
            what = _LIFECYCLE.get(event, f"event-{event}")
            deliver(DomainEvent(dom.name(), self.uri, f"libvirt.{what}",
                                f"{what} ({_LIFECYCLE_DETAIL.get((event, detail), f'detail {detail}')})"))

        def reboot(_c: Any, dom: Any, _o: Any) -> None:
            deliver(DomainEvent(dom.name(), self.uri, "libvirt.reboot", "the guest rebooted"))

        def io_error(_c: Any, dom: Any, path: str, alias: str, action: int, reason: str, _o: Any) -> None:
            deliver(DomainEvent(dom.name(), self.uri, "libvirt.io-error", f"disk {alias} ({path}): "
                                f"{reason or 'I/O error'}, action {_IO_ACTION.get(action, action)}"))

        def iteration(_c: Any, dom: Any, number: int, _o: Any) -> None:
            deliver(DomainEvent(dom.name(), self.uri, "libvirt.migration-iteration",
                                f"migration pass {number} over guest memory"))

        def job_completed(_c: Any, dom: Any, params: dict[str, Any], _o: Any) -> None:
            deliver(DomainEvent(dom.name(), self.uri, "libvirt.job-completed",
                                f"job finished: {int(params.get('data_processed', 0)) / 2**20:.1f} MiB, "
                                f"downtime {params.get('downtime', '-')} ms"))

        ids = []
        try:
            for event_id, callback in ((libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle),
                                       (libvirt.VIR_DOMAIN_EVENT_ID_REBOOT, reboot),
                                       (libvirt.VIR_DOMAIN_EVENT_ID_IO_ERROR_REASON, io_error),
                                       (libvirt.VIR_DOMAIN_EVENT_ID_MIGRATION_ITERATION, iteration),
                                       (libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, job_completed)):
                ids.append(self.conn.domainEventRegisterAny(None, event_id, callback, None))
        except libvirt.libvirtError as exc:
            raise HostUnreachable(f"cannot watch events on {self.uri}: {_msg(exc)}") from None

        def stop() -> None:
            for callback_id in ids:
                with contextlib.suppress(libvirt.libvirtError):
                    self.conn.domainEventDeregisterAny(callback_id)

        return stop

    def capabilities(self) -> capabilities.Capabilities:
        """libvirt's capabilities of this host, read once per connection: with /dev/kvm visible, each
        capabilities call makes libvirtd re-probe QEMU."""
        if not hasattr(self, "_capabilities"):
            with _errors("reading the host's capabilities"):
                self._capabilities = capabilities.parse(self.conn.getCapabilities())
        return self._capabilities

    def qemu_gid(self) -> int | None:
        """The group QEMU runs as on this host (libvirt-qemu's on Debian), or None where the DAC driver is off or
        QEMU runs as root."""
        return self.capabilities().qemu_gid

    def facts(self) -> HostFacts:
        caps = self.capabilities()
        info = self.conn.getInfo()  # [model, memory MiB, cpus, mhz, nodes, sockets, cores, threads]
        return HostFacts(arch=caps.arch, cpus=int(info[2]), memory_mib=int(info[1]), domain_types=caps.domain_types,
                         hostname=self.conn.getHostname(), libvirt_version=_version(self.conn.getLibVersion()),
                         cpu_model=caps.cpu_model)

    def pci_devices(self) -> NodeDeviceInventory:
        """The host's PCI functions, with drivers and IOMMU groups, from its libvirt's node devices."""
        with _errors("listing the host's PCI devices"):
            return devices.pci_inventory(self.conn)

    def device_binder(self, journal: BindingJournal, owner_of: Callable[[str], str | None]) -> DeviceBinder:
        """A binder that moves this host's devices to vfio-pci and back through its libvirt."""
        return devices.NodeDeviceBinder(self.conn, journal=journal, owner_of=owner_of)

    def ensure_isolated_network(self, name: str, bridge: str, tenant_network: str, tenant: str, subnet: str,
                                leases: Iterable[networks.DhcpHost] = ()) -> bool:
        """hvctl's tenant network on this host, running, and its filters defined (``hvctl.host.networks``); True if
        the network was made or started. ``leases``: the static DHCP leases it serves when it is made here."""
        networks.ensure_tenant_filters(self.conn, self.uri)
        return networks.ensure_network(self.conn, networks.isolated_network_xml(name, bridge, tenant_network, tenant,
                                                                                 subnet, leases))

    def dhcp_hosts(self, network: str) -> list[networks.DhcpHost] | None:
        return networks.dhcp_hosts(self.conn, network)

    def set_dhcp_host(self, network: str, lease: networks.DhcpHost) -> bool:
        return networks.set_dhcp_host(self.conn, network, lease)

    def remove_dhcp_host(self, network: str, mac: str) -> bool:
        return networks.remove_dhcp_host(self.conn, network, mac)

    def remove_network(self, name: str) -> bool:
        return networks.remove_network(self.conn, name)

    def network_active(self, name: str) -> bool | None:
        """None if this host has no libvirt network ``name``, else whether it is active."""
        try:
            net = self.conn.networkLookupByName(name)
        except libvirt.libvirtError:
            return None
        with _errors(f"reading network {name}"):
            return bool(net.isActive())

    # -- domains ----------------------------------------------------------------------------------------------

    def guest(self, name: str) -> Guest:
        """The handle on domain ``name``; NotFound if this host has none."""
        found = self.find_guest(name)
        if found is None:
            raise NotFound(f"no domain {name!r} on {self.uri}")
        return found

    def find_guest(self, name: str) -> Guest | None:
        try:
            return Guest(self, self.conn.lookupByName(name))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise HypervisorError(f"lookup of {name} failed: {_msg(exc)}") from None

    def find_guest_by_uuid(self, uuid: str) -> Guest | None:
        """The domain with libvirt UUID ``uuid`` on this host, whatever its name; None if there is none."""
        try:
            return Guest(self, self.conn.lookupByUUIDString(uuid))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise _typed(exc, f"lookup of domain {uuid}") from None

    def exists(self, name: str) -> bool:
        return self.find_guest(name) is not None

    def state(self, name: str) -> DomainState:
        """Domain ``name``'s state by name, MISSING if there is none: for a caller that holds no handle."""
        found = self.find_guest(name)
        return found.state() if found is not None else DomainState.MISSING

    def define(self, xml: str) -> Guest:
        with _errors("define"):
            return Guest(self, self.conn.defineXML(xml))

    def ensure_pool(self, name: str = DEFAULT_POOL, path: PurePosixPath = DEFAULT_POOL_PATH) -> tuple[Pool, bool]:
        """This host's storage pool for hvctl, adopted or made (see ``hvctl.host.storage``)."""
        return ensure_pool(self.conn, self.uri, name, path, streams=self.conn.getType() != "Test")

    def domain_states(self) -> dict[str, DomainState]:
        """Every domain's state, in one round trip (the bulk stats call), however many domains there are."""
        with _errors("listing domains"):
            stats = self.conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE, 0)
            return {d.name(): STATE_MAP.get(s.get("state.state", -1), DomainState.OTHER) for d, s in stats}

    def hvctl_domains(self, skip: frozenset[str] = frozenset()) -> set[str]:
        """Names of domains hvctl created: they carry hvctl's metadata element. Asking costs one round trip per
        domain, so a caller that already knows some names are hvctl's (its ledger's VMs here) passes them in
        ``skip``: they are returned without being asked."""
        names = set()
        with _errors("listing domains"):
            for dom in self.conn.listAllDomains():
                name = dom.name()
                if name in skip:
                    names.add(name)
                    continue
                try:
                    dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, HVCTL_NS)
                except libvirt.libvirtError:
                    continue  # No hvctl metadata: someone else's domain.
                names.add(name)
        return names

    # -- migration ----------------------------------------------------------------------------------------------

    def cpu_compatible_with(self, dest: Host) -> tuple[bool, str]:
        """Can a guest started here run on ``dest``? libvirt compares this host's CPU model with dest's."""
        cpu = self.capabilities().cpu_xml
        if cpu is None:
            return True, "no host CPU description to compare"
        with _errors("CPU comparison"):
            result = dest.conn.compareCPU(cpu, 0)
        if result == libvirt.VIR_CPU_COMPARE_INCOMPATIBLE:
            return False, f"{dest.uri}'s CPU lacks features of {self.uri}'s"
        return True, "identical" if result == libvirt.VIR_CPU_COMPARE_IDENTICAL else "superset"

    # -- accelerator probe ------------------------------------------------------------------------------------

    def probe_accelerator(self, kernel: Path, initrd: Path, workdir: Path, timeout: float = 15.0) -> Accel:
        """Decide KVM vs TCG by booting a tiny kernel once under KVM, never by trusting /dev/kvm's existence.

        A /dev/kvm that belongs to a nested PVM hypervisor exists and opens, yet a stock kernel crashes under it;
        only a real boot tells. If libvirt does not even offer the kvm domain type, there is nothing to try.
        ``kernel``, ``initrd``: paths on this machine; ``workdir``: where the probe's console log is written here.
        """
        workdir.mkdir(parents=True, exist_ok=True)
        console = workdir / "accel-probe.log"
        console.unlink(missing_ok=True)
        return self.probe_accelerator_with(
            kernel, initrd, console, lambda: console.read_text(errors="replace") if console.exists() else "", timeout)

    def probe_accelerator_with(self, kernel: Path | PurePosixPath, initrd: Path | PurePosixPath,
                               console: Path | PurePosixPath, read_console: Callable[[], str],
                               timeout: float = 15.0) -> Accel:
        """The probe with paths on the host itself (another host's pool volumes, say) and a way to read back the
        console log it writes there."""
        if "kvm" not in self.facts().domain_types:
            return Accel.TCG
        probe = Domain(
            name=f"hvctl-accel-probe-{int(time.time() * 1000) % 10**9}", accel=Accel.KVM, memory_mib=128, vcpus=1,
            boot=DirectBoot(Path(kernel), Path(initrd), f"console=ttyS0 panic=-1 hvctl.probe {PROBE_MARKER.lower()}"),
            devices=(SerialConsole(Path(console)),), acpi=True,
        )
        try:
            # A transient domain: it vanishes when it powers off or is destroyed, leaving nothing defined.
            dom = self.conn.createXML(probe.to_xml(), 0)
        except libvirt.libvirtError:
            return Accel.TCG
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if PROBE_MARKER in read_console():
                    return Accel.KVM
                time.sleep(0.1)
            return Accel.TCG
        finally:
            # It may already have powered itself off, which is what a successful probe does.
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()


def libvirt_version() -> str:
    """The version of the libvirt library this process uses (a host's daemon: ``HostFacts.libvirt_version``)."""
    return _version(libvirt.getVersion())


def _version(v: int) -> str:
    return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"
