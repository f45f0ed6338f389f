"""A VM incarnation whose files live in its host's storage pool, made and read through libvirt alone.

This is how hvctl runs a VM on a host that does not share the controller's filesystem:
- the image's kernel, initrd and base disk are pool volumes, uploaded once per host (``volumes.ensure_image``);
- the overlay is a qcow2 volume backed by the base volume, made by libvirt on the host;
- the seed ISO is built on the controller and uploaded as a volume;
- the console log is written by the host's virtlogd into the pool directory, and read back as a volume;
- the agent is reached with ``virDomain.openChannel`` (the socket's path is on the host and never opened here).
Destroy deletes the VM's volumes through the pool. Nothing of the VM is written on the controller's disk.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from hvctl.console import VolumeConsole
from hvctl.context import Context
from hvctl.designer import BootArtifacts
from hvctl.errors import AlreadyExists, InvalidSpec
from hvctl.host import Host, Pool
from hvctl.ledger import VMPaths, VMRecord
from hvctl.names import check_name
from hvctl.ops import Say, Undo
from hvctl.ops.incarnation import GuestSecrets
from hvctl.ops.volumes import ImageVolumes, Progress, UploadLease, ensure_image
from hvctl.spec import VMSpec
from images.store import Image

# Where libvirt keeps channel sockets on a host; libvirt itself opens the listening socket and hands it to QEMU.
CHANNEL_DIR = PurePosixPath("/var/lib/libvirt/qemu/channel/target")


@dataclass(frozen=True)
class PooledFiles:
    """One VM's volumes in one host's pool, and the host-side paths the domain and the ledger name."""

    pool: Pool
    vm: str

    @property
    def disk(self) -> str:
        return f"vm-{check_name(self.vm)}.qcow2"

    @property
    def seed(self) -> str:
        return f"vm-{self.vm}.seed.iso"

    @property
    def console(self) -> str:
        return f"vm-{self.vm}.console.log"

    @property
    def names(self) -> tuple[str, str, str]:
        return self.disk, self.seed, self.console

    def path(self, volume: str) -> PurePosixPath:
        return self.pool.path / volume

    @property
    def agent_socket(self) -> PurePosixPath:
        return CHANNEL_DIR / f"hvctl-{self.vm}.agent"

    def console_source(self) -> VolumeConsole:
        return VolumeConsole(self.pool, self.console)

    def existing(self) -> list[str]:
        self.pool.refresh()
        return [name for name in self.names if self.pool.volume(name) is not None]

    def delete(self) -> list[str]:
        """Delete every volume of the VM that exists; returns the ones that did."""
        self.pool.refresh()
        return [name for name in self.names if self.pool.delete(name)]


def console_of(ctx: Context, record: VMRecord) -> Path | VolumeConsole:
    """Where a VM's console log is read from: its file on this machine, or its volume in a remote host's pool."""
    if ctx.is_this_machine(record.host):
        return record.console_log
    return open_files(ctx.host(record.host), record.name).console_source()


def open_files(host: Host, vm: str) -> PooledFiles:
    """The VM's place in the host's hvctl pool (adopted, or made if the host has none: `host add` makes it)."""
    pool, _made = host.ensure_pool()
    return PooledFiles(pool, vm)


def check_room(files: PooledFiles, spec: VMSpec, host_name: str) -> None:
    """Refuse before anything is written: volumes of that name already there, or a disk larger than the pool's
    free space (the overlay is thin, but hvctl does not promise a disk that can never be filled)."""
    leftover = files.existing()
    if leftover:
        raise AlreadyExists(f"pool {files.pool.name} on host {host_name} already holds {', '.join(leftover)}, "
                            f"which hvctl's ledger does not know", hint="delete those volumes, or pick another name")
    free = files.pool.space().available
    if spec.disk_gib * 2**30 > free:
        raise InvalidSpec(f"a {spec.disk_gib} GiB disk does not fit in pool {files.pool.name} on host {host_name}: "
                          f"{free / 2**30:.1f} GiB free", hint="a smaller --disk-gib, or free space in that pool")


def upload_image(ctx: Context, host: str, files: PooledFiles, image: Image, say: Say,
                 progress: Progress | None = None) -> ImageVolumes:
    """The image's volumes in host ``host``'s pool, uploaded unless there (one command at a time: ``UploadLease``)."""
    say(f"making sure the host has image {image.name}@{image.content_hash[:8]} (uploaded once per host)")
    volumes = ensure_image(files.pool, image, progress, UploadLease(ctx.ledger.hosts, host, image, say))
    if volumes.uploaded_bytes:
        say(f"uploaded {volumes.uploaded_bytes / 2**20:.0f} MiB in {volumes.seconds:.1f} s")
    return volumes


@dataclass(frozen=True)
class PoolStorage:
    """An incarnation's files as volumes in its host's pool (``incarnation.Storage``): the overlay is made by
    libvirt on the host, backed by the image's base volume; the seed is built here and uploaded."""

    files: PooledFiles
    image_volumes: ImageVolumes

    @property
    def paths(self) -> VMPaths:
        f = self.files
        return VMPaths(base_disk=Path(self.image_volumes.base.path), overlay=Path(f.path(f.disk)),
                       seed=Path(f.path(f.seed)), console_log=Path(f.path(f.console)),
                       agent_socket=Path(f.agent_socket))

    def artifacts(self, image: Image) -> BootArtifacts:
        v = self.image_volumes
        if v.kernel is None or v.initrd is None:  # boots through firmware: the designer uses no kernel
            return BootArtifacts(kernel=image.kernel, initrd=image.initrd, root_on_disk=True, firmware=image.firmware)
        return BootArtifacts(kernel=Path(v.kernel.path), initrd=Path(v.initrd.path),
                             root_on_disk=image.kind.value != "initramfs")

    def console(self) -> VolumeConsole:
        return self.files.console_source()

    def make(self, spec: VMSpec, secrets: GuestSecrets, undo: Undo, say: Say) -> None:
        files, pool = self.files, self.files.pool
        say(f"creating a {spec.disk_gib} GiB overlay volume on {self.image_volumes.base.name}")
        pool.create(files.disk, spec.disk_gib * 2**30, fmt="qcow2", backing=self.image_volumes.base)
        undo.push("delete the overlay volume", lambda: pool.delete(files.disk))
        say("writing the seed on the controller and uploading it: hostname, SSH keys, host key, agent token")
        with tempfile.TemporaryDirectory(prefix="hvctl-seed-") as tmp:
            seed = Path(tmp) / "seed.iso"
            secrets.write_seed(seed, spec)
            pool.upload(files.seed, seed)
        undo.push("delete the seed volume", lambda: pool.delete(files.seed))
        # virtlogd makes the console log when the domain starts: delete it too, if the boot is rolled back.
        undo.push("delete the console log volume", lambda: pool.delete(files.console, refresh=True))
