"""One domain on one host: Nova's libvirt ``Guest``. A handle is looked up once, by name, and then refers to that
domain by its UUID: if the domain is undefined and another one is defined under the same name, the handle does not
silently act on the newcomer, it answers MISSING or NotFound.

Also here: the non-blocking byte streams that a guest's console and virtio-serial channels are reached through.
"""

from __future__ import annotations

import contextlib
import enum
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from xml.etree import ElementTree as ET

import libvirt

from hvctl.domain.model import HVCTL_NS
from hvctl.domain.tuning import LiveTuning
from hvctl.errors import HypervisorError, NotFound
from hvctl.host._errors import _code, _errors, _msg, _typed

if TYPE_CHECKING:
    from hvctl.host import Host


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


STATE_MAP = {
    libvirt.VIR_DOMAIN_RUNNING: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: DomainState.SHUTTING_DOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: DomainState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: DomainState.CRASHED,
}


# libvirt's largest CFS quota/period (VIR_DOMAIN_SCHEDULER_*_QUOTA max, 2^44-1): at or past it there is no limit.
_NO_QUOTA = 17592186044415
# VIR_DOMAIN_MEMORY_PARAM_UNLIMITED (2^53-1 KiB): a C macro the Python binding does not export.
_UNLIMITED_KIB = 9007199254740991
_NUMA_MODES = {libvirt.VIR_DOMAIN_NUMATUNE_MEM_STRICT: "strict", libvirt.VIR_DOMAIN_NUMATUNE_MEM_PREFERRED: "preferred",
               libvirt.VIR_DOMAIN_NUMATUNE_MEM_INTERLEAVE: "interleave",
               getattr(libvirt, "VIR_DOMAIN_NUMATUNE_MEM_RESTRICTIVE", 3): "restrictive"}


class Guest:
    """A handle on one domain of ``host``. Get one from ``Host.guest`` (NotFound if there is none), ``Host.find_guest``
    (None) or ``Host.define``."""

    def __init__(self, host: Host, dom: libvirt.virDomain) -> None:
        self.host = host
        self._dom = dom
        self.name: str = dom.name()
        self.uuid: str = dom.UUIDString()

    def __repr__(self) -> str:
        return f"Guest({self.name!r}@{self.host.uri}, {self.uuid})"

    @contextmanager
    def _call(self, action: str) -> Iterator[None]:
        """libvirt errors as hvctl's; the domain having gone (undefined, or a transient one powered off) is
        NotFound, whatever the call was."""
        try:
            yield
        except libvirt.libvirtError as exc:
            raise self._gone() if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN \
                else _typed(exc, f"{action} of {self.name}") from None

    def _gone(self) -> NotFound:
        return NotFound(f"domain {self.name!r} ({self.uuid}) is no longer on {self.host.uri}")

    # -- state ----------------------------------------------------------------------------------------------------

    def state(self) -> DomainState:
        """The domain's state; MISSING once it is gone."""
        try:
            with self._call("state"):
                code, _reason = self._dom.state()
        except NotFound:
            return DomainState.MISSING
        return STATE_MAP.get(code, DomainState.OTHER)

    def xml(self, inactive: bool = False) -> str:
        """The domain's XML; ``inactive``: its persistent definition, what the next start uses."""
        with self._call("reading the XML"):
            return str(self._dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0))

    def made_by_hvctl(self) -> bool:
        """Whether the domain carries hvctl's metadata element."""
        try:
            self._dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, HVCTL_NS)
        except libvirt.libvirtError as exc:
            if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                raise self._gone() from None
            return False
        return True

    # -- lifecycle --------------------------------------------------------------------------------------------------

    def start(self) -> None:
        with self._call("start"):
            self._dom.create()

    def shutdown(self) -> None:
        """Ask the guest to power off (ACPI power button). Returns at once; poll ``state`` for the result."""
        with self._call("shutdown"):
            self._dom.shutdown()

    def suspend(self) -> None:
        """Pause the vCPUs; memory, devices and the QEMU process stay as they are."""
        with self._call("pause"):
            self._dom.suspend()

    def resume(self) -> None:
        with self._call("resume"):
            self._dom.resume()

    def destroy(self) -> None:
        """Power off at once; nothing to do if it is not running."""
        with self._call("destroy"):
            if self._dom.isActive():
                self._dom.destroy()

    def undefine(self) -> None:
        with self._call("undefine"):
            # A UEFI guest's NVRAM (its variable store, which libvirt copied from the firmware's template at first
            # boot) goes with it: libvirt refuses to undefine a domain that has one without the flag (9.0 even when
            # the path is absent from the persistent XML, as with autoselected firmware), and ignores the flag for
            # one that has none. Snapshots' metadata goes too (their data is inside the overlay, which the caller
            # removes), likewise refused without its flag.
            flags = libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
            if self._dom.snapshotNum(0):
                flags |= libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            try:
                self._dom.undefineFlags(flags)
            except libvirt.libvirtError as exc:
                # libvirt's test driver knows no NVRAM: it refuses the flag ("unsupported flags").
                if exc.get_error_code() != libvirt.VIR_ERR_INVALID_ARG:
                    raise
                self._dom.undefineFlags(flags & ~libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)

    # -- size -----------------------------------------------------------------------------------------------------

    def set_next_boot_size(self, vcpus: int, memory_kib: int, hard_limit_kib: int | None) -> None:
        """vCPUs and memory (both the maximum and the current value) in the persistent definition: the next boot
        has them. The memory hard limit follows memory, or QEMU would be killed at the old one."""
        config = libvirt.VIR_DOMAIN_AFFECT_CONFIG
        with self._call("resizing"):
            current = int(self._dom.vcpusFlags(config | libvirt.VIR_DOMAIN_VCPU_MAXIMUM))
            # The current count may never exceed the maximum: raise the maximum first, lower it last.
            order = (libvirt.VIR_DOMAIN_VCPU_MAXIMUM, 0) if vcpus > current else (0, libvirt.VIR_DOMAIN_VCPU_MAXIMUM)
            for extra in order:
                self._dom.setVcpusFlags(vcpus, config | extra)
            old_max = int(self._dom.maxMemory()) if not self._dom.isActive() else None
            order = (libvirt.VIR_DOMAIN_MEM_MAXIMUM, 0) if old_max is None or memory_kib > old_max \
                else (0, libvirt.VIR_DOMAIN_MEM_MAXIMUM)
            for extra in order:
                self._dom.setMemoryFlags(memory_kib, config | extra)
            if hard_limit_kib is not None:
                self._dom.setMemoryParameters({libvirt.VIR_DOMAIN_MEMORY_HARD_LIMIT: hard_limit_kib}, config)

    def block_resize(self, target: str, capacity: int) -> None:
        """Grow the running guest's disk ``target`` (vda) to ``capacity`` bytes; the guest sees the new size at once
        (virtio-blk reports a capacity change)."""
        with self._call(f"resizing disk {target}"):
            self._dom.blockResize(target, capacity, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)

    # -- snapshots (libvirt's internal qcow2 snapshots: inside the overlay, so they need no files of their own) ------

    def snapshot_create(self, name: str, memory: bool) -> None:
        """An internal snapshot: of the disk, and with ``memory`` also of the running guest's RAM and device state
        (QEMU's savevm). libvirt refuses a disk-only internal snapshot of a running domain."""
        root = ET.Element("domainsnapshot")
        ET.SubElement(root, "name").text = name
        ET.SubElement(root, "description").text = "made by hvctl"
        ET.SubElement(root, "memory", snapshot="internal" if memory else "no")
        with self._call(f"snapshot {name}"):
            self._dom.snapshotCreateXML(ET.tostring(root, encoding="unicode"), 0)

    def snapshot_names(self) -> list[str]:
        with self._call("listing snapshots"):
            return [str(n) for n in self._dom.snapshotListNames(0)]

    def snapshot_revert(self, name: str) -> None:
        """The disk (and, for a snapshot with memory, the running guest) as it was. libvirt's revert of a
        memory snapshot restores it running."""
        with self._call(f"revert to snapshot {name}"):
            self._dom.revertToSnapshot(self._dom.snapshotLookupByName(name, 0), 0)

    def snapshot_delete(self, name: str) -> None:
        with self._call(f"deleting snapshot {name}"):
            self._dom.snapshotLookupByName(name, 0).delete(0)

    # -- character devices ------------------------------------------------------------------------------------------

    def open_channel(self, channel: str) -> ByteStream:
        """The virtio-serial ``channel``, through the host's connection: no file or socket of the host is needed, so
        it works on a remote host as on this one."""
        return self._open_stream(f"channel {channel} of {self.name}", "Active channel stream", None,
                                 lambda stream: self._dom.openChannel(channel, stream, 0))

    def open_console(self, force: bool = False) -> ByteStream:
        """The serial console (its pty), as on ``virsh console``. libvirt lets one client hold a console at a time;
        ``force`` takes it from the one that has it."""
        flags = libvirt.VIR_DOMAIN_CONSOLE_FORCE if force else libvirt.VIR_DOMAIN_CONSOLE_SAFE
        return self._open_stream(f"console of {self.name}", "Active console session",
                                 "hvctl console --force takes it over",
                                 lambda stream: self._dom.openConsole(None, stream, flags))

    def _open_stream(self, what: str, busy: str, busy_hint: str | None,
                     attach: Callable[[libvirt.virStream], object]) -> ByteStream:
        """A non-blocking stream attached to one of the domain's character devices by ``attach``. libvirt refuses
        a second client at once (its error contains ``busy``) instead of queueing it."""
        stream = self.host.conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
        try:
            attach(stream)
        except libvirt.libvirtError as exc:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            if busy in _msg(exc):
                raise ChannelBusy(f"the {what} is in use by another client", hint=busy_hint) from None
            if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                raise self._gone() from None
            raise HypervisorError(f"opening the {what} failed: {_msg(exc)}") from None
        except BaseException:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            raise
        return ByteStream(stream, what)

    # -- enforcement --------------------------------------------------------------------------------------------

    def live_tuning(self) -> LiveTuning:
        """What this host's libvirt says it applied to the running domain: the readback that works on any host,
        where reading cgroups works only on this machine. A read libvirt refuses is recorded, not raised."""
        unreadable: list[tuple[str, str]] = []

        def read(what: str, call: Callable[[], Any]) -> Any:
            try:
                return call()
            except libvirt.libvirtError as exc:
                if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                    raise self._gone() from None
                unreadable.append((what, _msg(exc)))
                return None

        sched = read("scheduler", self._dom.schedulerParameters) or {}
        memory = read("memory", lambda: self._dom.memoryParameters(0)) or {}
        blkio = read("blkio", lambda: self._dom.blkioParameters(0)) or {}
        numa = read("numa", lambda: self._dom.numaParameters(0)) or {}
        vcpus = read("vcpupin", lambda: self._dom.vcpuPinInfo(0)) or ()
        emulator = read("emulatorpin", lambda: self._dom.emulatorPinInfo(0))

        def limit(value: object, unlimited: int) -> int | None:
            return int(value) if isinstance(value, int) and 0 < value < unlimited else None

        hard = memory.get("hard_limit")
        return LiveTuning(
            cpu_shares=sched.get("cpu_shares"),
            global_period_us=limit(sched.get("global_period"), _NO_QUOTA),
            global_quota_us=limit(sched.get("global_quota"), _NO_QUOTA),
            memory_hard_limit_kib=limit(hard, _UNLIMITED_KIB),
            blkio_weight=blkio.get("weight") or None,
            vcpupin=tuple(frozenset(i for i, on in enumerate(cpus) if on) for cpus in vcpus),
            emulatorpin=frozenset(i for i, on in enumerate(emulator) if on) if emulator is not None else None,
            numa_nodeset=numa.get("numa_nodeset") or None,
            numa_mode=_NUMA_MODES.get(numa["numa_mode"]) if "numa_mode" in numa else None,
            unreadable=tuple(unreadable),
        )

    # -- migration --------------------------------------------------------------------------------------------------

    def migratable_xml(self) -> str:
        with self._call("reading the migratable XML"):
            return str(self._dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_SECURE))

    def migrate(self, dest: Host, dest_xml: str, *, live: bool, postcopy: bool, auto_converge: bool,
                copy_storage: bool, bandwidth_mib_s: int | None, migrate_uri: str | None,
                storage_verified_shared: bool = False, copy_disks: tuple[str, ...] = (),
                stopped: bool = False) -> None:
        """Client-managed migration (migrate3): hvctl holds both connections, QEMU streams memory directly.

        ``copy_storage``: the writable disks named in ``copy_disks`` (target devs) are mirrored to the destination
        over NBD while memory moves; only their top (overlay) layer travels, the backing image being on both hosts
        already (NON_SHARED_INC), and the destination file must exist, created by the caller."""
        flags = libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
        if stopped:
            # A shut-off domain: only its definition moves (VIR_MIGRATE_OFFLINE); its disks must already be
            # where the destination looks for them.
            flags |= libvirt.VIR_MIGRATE_OFFLINE
            live = postcopy = auto_converge = copy_storage = False
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
        with self._call("migration"):
            self._dom.migrate3(dest.conn, params, flags)

    def set_max_downtime(self, ms: int) -> None:
        with self._call("setting max downtime"):
            self._dom.migrateSetMaxDowntime(ms, 0)

    def start_postcopy(self) -> None:
        with self._call("switching to post-copy"):
            self._dom.migrateStartPostCopy(0)

    def job_stats(self, completed: bool = False) -> dict[str, object]:
        """libvirt's job statistics: data processed/remaining, dirty rate, iteration, (expected) downtime; {} when
        there is none or the domain has gone."""
        flags = libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED if completed else 0
        try:
            return dict(self._dom.jobStats(flags))
        except libvirt.libvirtError:
            return {}

    def abort_job(self) -> None:
        with self._call("cancelling the job"):
            self._dom.abortJob()
