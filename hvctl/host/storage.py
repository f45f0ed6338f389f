"""Storage on a host through libvirt's storage pools: the same calls over the local socket, ``qemu+ssh`` and
``qemu+tls``, with no file of the host visible to the controller.

Each host has one directory pool for hvctl, made by ``host add`` or adopted. Images are uploaded into it once over a
libvirt stream (``hvctl.ops.volumes``); a VM on a host that does not share the controller's filesystem keeps its
overlay, seed and console log there too (``hvctl.ops.pooled``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO
from xml.etree import ElementTree as ET

import libvirt

from hvctl.errors import HypervisorError, InvalidSpec
from hvctl.host._errors import _code as code
from hvctl.host._errors import _errors as libvirt_errors
from hvctl.host._errors import _msg as message
from hvctl.host._errors import _typed

# Pool types whose volumes are plain files, so that overlays with backing files and direct kernel boot work.
FILE_POOL_TYPES = frozenset({"dir", "fs", "netfs"})
CHUNK = 256 << 10
# libvirt refuses to refresh a pool while a volume is being built or uploaded into it: another command's upload, say.
# A refresh waits for that, asking again this often, for up to this long.
BUSY_POLL_S = 0.2
BUSY_WAIT_S = 900.0

Progress = Callable[[int, int], None]  # bytes done, bytes in all


@dataclass(frozen=True)
class Volume:
    name: str
    path: PurePosixPath
    capacity: int
    allocation: int


@dataclass(frozen=True)
class PoolSpace:
    capacity: int
    allocation: int
    available: int


class Pool:
    def __init__(self, pool: libvirt.virStoragePool, conn: libvirt.virConnect, uri: str, streams: bool) -> None:
        self._pool = pool
        self._conn = conn
        self.uri = uri
        self.name = str(pool.name())
        root = ET.fromstring(pool.XMLDesc(0))
        self.type = root.get("type", "")
        self.path = PurePosixPath(root.findtext("target/path") or "/")
        # libvirt's test driver keeps volumes in memory and implements no volume streams: there, creating a
        # volume is all that an upload can do, and a download reads nothing. Every real driver streams.
        self._streams = streams

    def space(self) -> PoolSpace:
        with libvirt_errors(f"reading pool {self.name}"):
            _state, capacity, allocation, available = self._pool.info()
        return PoolSpace(int(capacity), int(allocation), int(available))

    def refresh(self, wait: bool = True, on_busy: Callable[[], None] | None = None) -> bool:
        """Re-read the directory: volumes QEMU or another controller made since, and formats probed anew.

        While another command uploads or builds a volume in the pool, libvirt refuses ("has asynchronous jobs
        running"); then this waits for it (up to ``BUSY_WAIT_S``), or with ``wait`` False returns False at once.
        ``on_busy`` is called at each refusal (a test's hook)."""
        deadline = time.monotonic() + BUSY_WAIT_S
        while True:
            try:
                self._pool.refresh(0)
                return True
            except libvirt.libvirtError as exc:
                if "asynchronous jobs running" not in message(exc):
                    raise _typed(exc, f"refreshing pool {self.name}") from None
            if on_busy is not None:
                on_busy()
            if not wait:
                return False
            if time.monotonic() > deadline:
                raise HypervisorError(f"pool {self.name} stayed busy with another upload for {BUSY_WAIT_S:.0f} s",
                                      hint="`virsh vol-list` on the host shows what is being written")
            time.sleep(BUSY_POLL_S)

    def _find(self, name: str) -> libvirt.virStorageVol | None:
        try:
            return self._pool.storageVolLookupByName(name)
        except libvirt.libvirtError as exc:
            if code(exc) == libvirt.VIR_ERR_NO_STORAGE_VOL:
                return None
            raise HypervisorError(f"looking up volume {name} in pool {self.name} failed: {message(exc)}") from None

    def volume(self, name: str) -> Volume | None:
        vol = self._find(name)
        return _volume(vol) if vol is not None else None

    def backing(self, name: str) -> PurePosixPath | None:
        """The path of the volume a qcow2 overlay is backed by, as the host's libvirt reads it; None if none."""
        with libvirt_errors(f"reading volume {name} in pool {self.name}"):
            found = ET.fromstring(self._lookup(name).XMLDesc(0)).findtext("backingStore/path")
        return PurePosixPath(found) if found else None

    def volumes(self) -> list[Volume]:
        with libvirt_errors(f"listing pool {self.name}"):
            return sorted((_volume(v) for v in self._pool.listAllVolumes(0)), key=lambda v: v.name)

    def create(self, name: str, capacity: int, fmt: str = "raw", backing: Volume | None = None,
               mode: int = 0o600, sparse: bool = False) -> Volume:
        """A new volume; ``backing``: a qcow2 overlay on that volume (libvirt runs qemu-img create -b). libvirt
        allocates a raw volume whole unless it is ``sparse``."""
        root = ET.Element("volume")
        ET.SubElement(root, "name").text = name
        ET.SubElement(root, "capacity", unit="bytes").text = str(capacity)
        if sparse:
            ET.SubElement(root, "allocation", unit="bytes").text = "0"
        target = ET.SubElement(root, "target")
        ET.SubElement(target, "format", type=fmt)
        ET.SubElement(ET.SubElement(target, "permissions"), "mode").text = f"0{mode:o}"
        if backing is not None:
            store = ET.SubElement(root, "backingStore")
            ET.SubElement(store, "path").text = str(backing.path)
            ET.SubElement(store, "format", type="qcow2")
        try:
            vol = self._pool.createXML(ET.tostring(root, encoding="unicode"), 0)
        except libvirt.libvirtError as exc:
            if code(exc) == libvirt.VIR_ERR_STORAGE_VOL_EXIST or "already exists" in message(exc):
                raise InvalidSpec(f"volume {name} already exists in pool {self.name} on {self.uri}",
                                  hint="something outside hvctl's ledger uses that name") from None
            raise HypervisorError(f"creating volume {name} in pool {self.name} failed: {message(exc)}") from None
        return _volume(vol)

    def upload(self, name: str, source: Path | bytes, progress: Progress | None = None) -> Volume:
        """A new raw volume filled from a controller-side file or bytes. Its format is probed when the pool is
        next refreshed, so an uploaded qcow2 is seen as qcow2."""
        size = len(source) if isinstance(source, bytes) else source.stat().st_size
        volume = self.create(name, size, sparse=True)  # not written with zeros first: the upload writes it
        if not self._streams:
            return volume
        vol = self._lookup(name)
        stream = self._conn.newStream(0)
        done = 0
        try:
            with libvirt_errors(f"uploading {name} to pool {self.name}"), contextlib.ExitStack() as files:
                vol.upload(stream, 0, size, 0)
                reader = _reader(source, files)
                while done < size:
                    chunk = reader(min(CHUNK, size - done))
                    if not chunk:
                        raise HypervisorError(f"{source!r} shrank while it was being uploaded")
                    _send_all(stream, chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, size)
                stream.finish()
        except BaseException:
            _abort(stream)
            self.delete(name)
            raise
        return volume

    def download(self, name: str, sink: BinaryIO, offset: int = 0, length: int = 0,
                 progress: Progress | None = None) -> int:
        """Copy a volume (or ``length`` bytes of it from ``offset``; 0: to its end) into ``sink``. Returns bytes."""
        vol = self._lookup(name)
        total = length or max(_volume(vol).capacity - offset, 0)
        if not self._streams or total == 0:
            return 0
        stream = self._conn.newStream(0)
        done = 0
        try:
            with libvirt_errors(f"downloading {name} from pool {self.name}"):
                vol.download(stream, offset, length, 0)
                while True:
                    chunk = stream.recv(CHUNK)
                    if not isinstance(chunk, bytes) or not chunk:
                        break
                    sink.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total)
                stream.finish()
        except BaseException:
            _abort(stream)
            raise
        return done

    def resize(self, name: str, capacity: int) -> None:
        """Grow volume ``name`` to ``capacity`` bytes (its virtual size, for a qcow2). Only while no domain runs on
        it; a running VM's disk grows through ``Guest.block_resize``."""
        vol = self._lookup(name)
        with libvirt_errors(f"resizing volume {name} in pool {self.name}"):
            vol.resize(capacity, 0)

    def delete(self, name: str, refresh: bool = False) -> bool:
        """Delete a volume if it exists. Returns whether there was one. ``refresh`` first, for a file that
        something other than libvirt made in the pool (QEMU's console log)."""
        if refresh:
            self.refresh()
        vol = self._find(name)
        if vol is None:
            return False
        with libvirt_errors(f"deleting volume {name} from pool {self.name}"):
            vol.delete(0)
        return True

    def _lookup(self, name: str) -> libvirt.virStorageVol:
        with libvirt_errors(f"looking up volume {name} in pool {self.name}"):
            return self._pool.storageVolLookupByName(name)

    def release(self) -> None:
        """Undo ``ensure_pool``'s creation: stop and forget the pool, and remove its directory if it is empty."""
        with libvirt_errors(f"removing pool {self.name}"):
            if self._pool.isActive():
                self._pool.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                self._pool.delete(0)  # rmdir of the target directory; refused if anything is left in it
            self._pool.undefine()


def ensure_pool(conn: libvirt.virConnect, uri: str, name: str, path: PurePosixPath,
                streams: bool = True) -> tuple[Pool, bool]:
    """Adopt the pool ``name`` if the host has one, else define a directory pool at ``path``, build it (mkdir on
    the host), start it and mark it autostart. Returns the pool and whether hvctl made it."""
    try:
        existing = conn.storagePoolLookupByName(name)
    except libvirt.libvirtError as exc:
        if code(exc) != libvirt.VIR_ERR_NO_STORAGE_POOL:
            raise HypervisorError(f"looking up pool {name} on {uri} failed: {message(exc)}") from None
        existing = None
    if existing is not None:
        pool = Pool(existing, conn, uri, streams)
        if pool.type not in FILE_POOL_TYPES:
            raise InvalidSpec(f"pool {name} on {uri} is a {pool.type!r} pool; hvctl needs one whose volumes are "
                              f"files ({', '.join(sorted(FILE_POOL_TYPES))})",
                              hint=f"hvctl uses the pool named {name} on every host: undefine that one "
                                   f"(virsh pool-undefine {name}) so hvctl can make its own")
        if not existing.isActive():
            try:
                existing.create(0)
            except libvirt.libvirtError as exc:
                raise InvalidSpec(f"pool {name} on {uri} is defined but cannot start: {message(exc)}",
                                  hint=f"fix its directory on that host, or undefine it (virsh pool-undefine {name}) "
                                       "so hvctl can make its own") from None
        return pool, False
    root = ET.Element("pool", type="dir")
    ET.SubElement(root, "name").text = name
    target = ET.SubElement(root, "target")
    ET.SubElement(target, "path").text = str(path)
    # Traversable, not listable: QEMU (running as its own user) opens its files by path; nobody else may list them.
    ET.SubElement(ET.SubElement(target, "permissions"), "mode").text = "0711"
    with libvirt_errors(f"defining pool {name} on {uri}"):
        defined = conn.storagePoolDefineXML(ET.tostring(root, encoding="unicode"), 0)
    try:
        defined.build(0)
        defined.create(0)
        defined.setAutostart(1)
    except libvirt.libvirtError as exc:
        try:
            if defined.isActive():
                defined.destroy()
            defined.undefine()
        except libvirt.libvirtError:
            pass
        raise InvalidSpec(f"host {uri} cannot use {path} as hvctl's storage pool: {message(exc)}",
                          hint=f"make {path} a directory libvirt on that host can write") \
            from None
    return Pool(defined, conn, uri, streams), True


def _volume(vol: libvirt.virStorageVol) -> Volume:
    _type, capacity, allocation = vol.info()
    return Volume(name=str(vol.name()), path=PurePosixPath(vol.path()), capacity=int(capacity),
                  allocation=int(allocation))


def _reader(source: Path | bytes, files: contextlib.ExitStack) -> Callable[[int], bytes]:
    if isinstance(source, bytes):
        view = memoryview(source)
        position = 0

        def read(n: int) -> bytes:
            nonlocal position
            chunk = bytes(view[position:position + n])
            position += len(chunk)
            return chunk

        return read
    return files.enter_context(source.open("rb")).read


def _send_all(stream: libvirt.virStream, chunk: bytes) -> None:
    view = memoryview(chunk)
    while view:
        sent = stream.send(bytes(view))
        if sent < 0:
            raise HypervisorError("the upload stream refused data")
        view = view[sent:]


def _abort(stream: libvirt.virStream) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        stream.abort()
