"""The host layer: the only package that imports libvirt. One ``Host`` per connection URI, local or remote.

Binding quirks are recorded where the call is made. libvirt errors become hvctl's typed errors here, so nothing above
this module needs to know libvirt's exception type.
"""

from __future__ import annotations

import contextlib
import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from xml.etree import ElementTree as ET

import libvirt

from hvctl.console import PROBE_MARKER
from hvctl.domain import Accel, DirectBoot, Domain, SerialConsole
from hvctl.domain.model import HVCTL_NS
from hvctl.errors import HostUnreachable, HypervisorError, NotFound
from hvctl.host._errors import _errors, _msg
from hvctl.host.storage import Pool, Volume, ensure_pool

__all__ = ["Pool", "Volume"]

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


class ChannelBusy(HypervisorError):
    """Another client holds the guest's channel: libvirt refuses a second one at once instead of queueing it."""


_STREAM_EVENTS = (libvirt.VIR_STREAM_EVENT_READABLE | libvirt.VIR_STREAM_EVENT_WRITABLE
                  | libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP)
# A wake-up the event loop missed costs at most this long: the deadline is checked at least this often.
_STREAM_POLL_S = 0.05


class ByteStream:
    """A non-blocking libvirt stream read and written against deadlines: a guest's virtio-serial channel, tunnelled
    through the host's connection, so it works the same over the local socket, ``qemu+ssh`` and ``qemu+tls``.
    The guest on the other end is untrusted: nothing here waits on it without a deadline."""

    def __init__(self, stream: libvirt.virStream, what: str) -> None:
        self._stream = stream
        self.what = what
        self._ready = threading.Event()
        self._closed = False
        try:
            stream.eventAddCallback(_STREAM_EVENTS, lambda *_: self._ready.set(), None)
            self._callback = True
        except libvirt.libvirtError:
            self._callback = False  # polled instead

    def _wait(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{self.what}: deadline passed")
        self._ready.wait(min(remaining, _STREAM_POLL_S))

    def recv(self, deadline: float, size: int = 65536) -> bytes:
        """Up to ``size`` bytes, b"" at the end of the stream; TimeoutError if nothing came before ``deadline``."""
        while True:
            self._ready.clear()
            with _errors(f"reading {self.what}"):
                data = self._stream.recv(size)
            if isinstance(data, bytes):
                return data
            if data != -2:  # -2: nothing to read yet
                return b""
            self._wait(deadline)

    def send(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            self._ready.clear()
            with _errors(f"writing {self.what}"):
                sent = self._stream.send(bytes(view[:65536]))
            if sent == -2:  # the stream is full for now
                self._wait(deadline)
                continue
            if sent < 0:
                raise HypervisorError(f"{self.what}: the stream refused the write")
            view = view[sent:]

    def close(self) -> None:
        """Abort rather than finish: the peer may still have bytes queued that nobody will read."""
        if self._closed:
            return
        self._closed = True
        if self._callback:
            with contextlib.suppress(libvirt.libvirtError):
                self._stream.eventRemoveCallback()
        with contextlib.suppress(libvirt.libvirtError):
            self._stream.abort()



class DomainState(enum.StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    SHUTTING_DOWN = "shutting-down"
    OTHER = "other"
    MISSING = "missing"


_STATE_MAP = {
    libvirt.VIR_DOMAIN_RUNNING: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: DomainState.SHUTTING_DOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: DomainState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: DomainState.CRASHED,
}


@dataclass(frozen=True)
class HostFacts:
    arch: str
    cpus: int
    memory_mib: int
    domain_types: frozenset[str]
    hostname: str


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

    def qemu_gid(self) -> int | None:
        """The group QEMU runs as on this host: the gid of libvirt's DAC base label (``+64055:+64055`` on Debian,
        the libvirt-qemu group), or None where the DAC driver is off or QEMU runs as root. Asked once per
        connection: with /dev/kvm visible, each capabilities call makes libvirtd re-probe QEMU."""
        if not hasattr(self, "_qemu_gid"):
            caps = ET.fromstring(self.conn.getCapabilities())
            label = next((el.text or "" for el in caps.iterfind("host/secmodel/baselabel")
                          if el.get("type") == "qemu"), "")
            _, _, gid = label.partition(":")
            gid = gid.lstrip("+")
            self._qemu_gid = int(gid) if gid.isdigit() and int(gid) != 0 else None
        return self._qemu_gid

    def facts(self) -> HostFacts:
        caps = ET.fromstring(self.conn.getCapabilities())
        info = self.conn.getInfo()  # [model, memory MiB, cpus, mhz, nodes, sockets, cores, threads]
        types = frozenset(d.get("type", "") for d in caps.iterfind("guest/arch/domain"))
        return HostFacts(arch=caps.findtext("host/cpu/arch") or "x86_64", cpus=int(info[2]),
                         memory_mib=int(info[1]), domain_types=types, hostname=self.conn.getHostname())

    def numa_cells(self) -> list[dict[str, int]]:
        """Per NUMA cell: CPUs and memory (MiB), from the capabilities' host topology."""
        caps = ET.fromstring(self.conn.getCapabilities())
        cells = []
        for cell in caps.iterfind("host/topology/cells/cell"):
            memory = cell.find("memory")
            kib = int(memory.text or 0) if memory is not None else 0
            cells.append({"cpus": len(cell.findall("cpus/cpu")), "memory_mib": kib // 1024})
        return cells

    def pci_gpus(self, allowlist: frozenset[tuple[int, int]] = frozenset()) -> list[dict[str, str]]:
        """PCI display/3D controllers (class 0x03xxxx), plus allowlisted vendor:device pairs, from node devices."""
        found = []
        with _errors("listing node devices"):
            devices = self.conn.listAllDevices(libvirt.VIR_CONNECT_LIST_NODE_DEVICES_CAP_PCI_DEV)
        for dev in devices:
            xml = ET.fromstring(dev.XMLDesc(0))
            cap = xml.find("capability[@type='pci']")
            if cap is None:
                continue
            klass = int(cap.findtext("class") or "0", 16)
            vendor_el, product_el = cap.find("vendor"), cap.find("product")
            vendor = int(vendor_el.get("id", "0"), 16) if vendor_el is not None else 0
            product = int(product_el.get("id", "0"), 16) if product_el is not None else 0
            if klass >> 16 == 0x03 or (vendor, product) in allowlist:
                addr = f"{int(cap.findtext('domain') or 0):04x}:{int(cap.findtext('bus') or 0):02x}:" \
                       f"{int(cap.findtext('slot') or 0):02x}.{int(cap.findtext('function') or 0):x}"
                name = cap.findtext("product") or f"{vendor:04x}:{product:04x}"
                found.append({"address": addr, "model": name.strip(), "ids": f"{vendor:04x}:{product:04x}"})
        return found

    def network_active(self, name: str) -> bool | None:
        """None if this host has no libvirt network ``name``, else whether it is active."""
        try:
            net = self.conn.networkLookupByName(name)
        except libvirt.libvirtError:
            return None
        with _errors(f"reading network {name}"):
            return bool(net.isActive())

    # -- domains ----------------------------------------------------------------------------------------------

    def _lookup(self, name: str) -> libvirt.virDomain:
        try:
            return self.conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise NotFound(f"no domain {name!r} on {self.uri}") from None
            raise HypervisorError(f"lookup of {name} failed: {_msg(exc)}") from None

    def open_channel(self, name: str, channel: str) -> ByteStream:
        """Domain ``name``'s virtio-serial ``channel``, through this connection: no file or socket of the host is
        needed, so it works on a remote host as on this one."""
        return self._open_stream(name, f"channel {channel} of {name}", "Active channel stream", None,
                                 lambda dom, stream: dom.openChannel(channel, stream, 0))

    def open_console(self, name: str, force: bool = False) -> ByteStream:
        """Domain ``name``'s serial console (its pty), through this connection, as on ``virsh console``. libvirt
        lets one client hold a console at a time; ``force`` takes it from the one that has it."""
        flags = libvirt.VIR_DOMAIN_CONSOLE_FORCE if force else libvirt.VIR_DOMAIN_CONSOLE_SAFE
        return self._open_stream(name, f"console of {name}", "Active console session",
                                 "hvctl console --force takes it over",
                                 lambda dom, stream: dom.openConsole(None, stream, flags))

    def _open_stream(self, name: str, what: str, busy: str, busy_hint: str | None,
                     attach: Callable[[libvirt.virDomain, libvirt.virStream], object]) -> ByteStream:
        """A non-blocking stream attached to one of the domain's character devices by ``attach``. libvirt refuses
        a second client at once (its error contains ``busy``) instead of queueing it."""
        stream = self.conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
        try:
            attach(self._lookup(name), stream)
        except libvirt.libvirtError as exc:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            if busy in _msg(exc):
                raise ChannelBusy(f"the {what} is in use by another client", hint=busy_hint) from None
            raise HypervisorError(f"opening the {what} failed: {_msg(exc)}") from None
        except BaseException:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            raise
        return ByteStream(stream, what)

    def ensure_pool(self, name: str = DEFAULT_POOL, path: PurePosixPath = DEFAULT_POOL_PATH) -> tuple[Pool, bool]:
        """This host's storage pool for hvctl, adopted or made (see ``hvctl.host.storage``)."""
        return ensure_pool(self.conn, self.uri, name, path, streams=self.conn.getType() != "Test")

    def exists(self, name: str) -> bool:
        try:
            self._lookup(name)
            return True
        except NotFound:
            return False

    def define(self, xml: str) -> None:
        with _errors("define"):
            self.conn.defineXML(xml)

    def start(self, name: str) -> None:
        with _errors(f"start of {name}"):
            self._lookup(name).create()

    def shutdown(self, name: str) -> None:
        """Ask the guest to power off (ACPI power button). Returns at once; poll ``state`` for the result."""
        with _errors(f"shutdown of {name}"):
            self._lookup(name).shutdown()

    def destroy(self, name: str) -> None:
        dom = self._lookup(name)
        with _errors(f"destroy of {name}"):
            if dom.isActive():
                dom.destroy()

    def undefine(self, name: str) -> None:
        dom = self._lookup(name)
        with _errors(f"undefine of {name}"):
            # Plain undefine: hvctl boots kernels directly and never gives a guest UEFI NVRAM, and the flag that
            # removes NVRAM (VIR_DOMAIN_UNDEFINE_NVRAM) is refused by libvirt's test driver.
            dom.undefine()

    def state(self, name: str) -> DomainState:
        try:
            dom = self._lookup(name)
        except NotFound:
            return DomainState.MISSING
        with _errors(f"state of {name}"):
            code, _reason = dom.state()
        return _STATE_MAP.get(code, DomainState.OTHER)

    def domain_states(self) -> dict[str, DomainState]:
        with _errors("listing domains"):
            domains = self.conn.listAllDomains()
            return {d.name(): _STATE_MAP.get(d.state()[0], DomainState.OTHER) for d in domains}

    def domain_xml(self, name: str, inactive: bool = False) -> str:
        """The domain's XML; ``inactive``: its persistent definition, what the next start uses."""
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        with _errors(f"reading {name}'s XML"):
            return str(self._lookup(name).XMLDesc(flags))

    def made_by_hvctl(self, name: str) -> bool:
        """Whether domain ``name`` carries hvctl's metadata (NotFound if there is no such domain)."""
        dom = self._lookup(name)
        try:
            dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, HVCTL_NS)
        except libvirt.libvirtError:
            return False
        return True

    def hvctl_domains(self) -> set[str]:
        """Names of domains hvctl created: they carry hvctl's metadata element."""
        names = set()
        with _errors("listing domains"):
            for dom in self.conn.listAllDomains():
                try:
                    dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, HVCTL_NS)
                except libvirt.libvirtError:
                    continue  # No hvctl metadata: someone else's domain.
                names.add(dom.name())
        return names

    # -- migration ----------------------------------------------------------------------------------------------

    def migratable_xml(self, name: str) -> str:
        with _errors(f"reading {name}'s migratable XML"):
            return str(self._lookup(name).XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_SECURE))

    def cpu_compatible_with(self, dest: Host) -> tuple[bool, str]:
        """Can a guest started here run on ``dest``? libvirt compares this host's CPU model with dest's."""
        caps = ET.fromstring(self.conn.getCapabilities())
        cpu = caps.find("host/cpu")
        if cpu is None:
            return True, "no host CPU description to compare"
        with _errors("CPU comparison"):
            result = dest.conn.compareCPU(ET.tostring(cpu, encoding="unicode"), 0)
        if result == libvirt.VIR_CPU_COMPARE_INCOMPATIBLE:
            return False, f"{dest.uri}'s CPU lacks features of {self.uri}'s"
        return True, "identical" if result == libvirt.VIR_CPU_COMPARE_IDENTICAL else "superset"

    def migrate(self, name: str, dest: Host, dest_xml: str, *, live: bool, postcopy: bool, auto_converge: bool,
                copy_storage: bool, bandwidth_mib_s: int | None, migrate_uri: str | None,
                storage_verified_shared: bool = False, copy_disks: tuple[str, ...] = ()) -> None:
        """Client-managed migration (migrate3): hvctl holds both connections, QEMU streams memory directly.

        ``copy_storage``: the writable disks named in ``copy_disks`` (target devs) are mirrored to the destination
        over NBD while memory moves; only their top (overlay) layer travels, the backing image being on both hosts
        already (NON_SHARED_INC), and the destination file must exist, created by the caller."""
        flags = libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
        if storage_verified_shared:
            # libvirt cannot tell that a plain local file is visible to the destination ("Migration without
            # shared storage is unsafe"); the caller checked that both hosts are this machine and see the disk.
            flags |= libvirt.VIR_MIGRATE_UNSAFE
        if live:
            flags |= libvirt.VIR_MIGRATE_LIVE
        if postcopy:
            flags |= libvirt.VIR_MIGRATE_POSTCOPY
        if auto_converge:
            flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
        params: dict[str, object] = {libvirt.VIR_MIGRATE_PARAM_DEST_XML: dest_xml}
        if copy_storage:
            flags |= libvirt.VIR_MIGRATE_NON_SHARED_INC
            params[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] = list(copy_disks)
        if bandwidth_mib_s:
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = bandwidth_mib_s
        if migrate_uri:
            # Without it the destination offers its hostname, which need not resolve to an address the source
            # QEMU can reach; two "hosts" on one machine meet on loopback.
            params[libvirt.VIR_MIGRATE_PARAM_URI] = migrate_uri
        with _errors(f"migration of {name}"):
            self._lookup(name).migrate3(dest.conn, params, flags)

    def set_max_downtime(self, name: str, ms: int) -> None:
        with _errors(f"setting max downtime of {name}"):
            self._lookup(name).migrateSetMaxDowntime(ms, 0)

    def start_postcopy(self, name: str) -> None:
        with _errors(f"switching {name} to post-copy"):
            self._lookup(name).migrateStartPostCopy(0)

    def job_stats(self, name: str, completed: bool = False) -> dict[str, object]:
        """libvirt's job statistics: data processed/remaining, dirty rate, iteration, (expected) downtime."""
        flags = libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED if completed else 0
        try:
            return dict(self._lookup(name).jobStats(flags))
        except (libvirt.libvirtError, NotFound):
            return {}

    def abort_job(self, name: str) -> None:
        with _errors(f"cancelling {name}'s job"):
            self._lookup(name).abortJob()

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
            devices=(SerialConsole(Path(console)),),
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
    v = libvirt.getVersion()
    return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"
