"""What hvctl keeps in a host's storage pool, and how it gets there.

An image's kernel, initrd and base disk (an imported cloud image's base disk alone: its bootloader is inside) are
uploaded once per host over libvirt streams, named by the image's content hash (``img-NAME-HASH.{kernel,initrd,
qcow2}``), and reused by every later caller. A marker volume
(``img-NAME-HASH.ok``) is uploaded last: an upload cut short leaves no marker and is redone before anything uses it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from hvctl.errors import HypervisorError
from hvctl.host import Pool, Volume
from hvctl.ledger.hosts import Hosts
from hvctl.ops import Say, quiet
from hvctl.ops.intent import WAIT_POLL_S, holder_alive, this_holder
from images.store import Image

# (role, file in the image directory), in upload order; the marker goes last.
_PARTS = (("kernel", "vmlinuz"), ("initrd", "initrd.img"), ("qcow2", "base.qcow2"))
_FIRMWARE_PARTS = (("qcow2", "base.qcow2"),)  # an imported image boots through firmware and its own bootloader

Progress = Callable[[str, int, int], None]  # what, bytes done, bytes in all


@dataclass(frozen=True)
class ImageVolumes:
    kernel: Volume | None  # None for an image that boots through firmware
    initrd: Volume | None
    base: Volume
    uploaded_bytes: int  # 0 when the host already had them
    seconds: float


def image_prefix(image: Image) -> str:
    return image.volume_prefix


class UploadLease:
    """The turn to upload one image to one host's pool, held in the ledger (``Hosts.claim_upload``) for the block,
    so that commands of every controller sharing the ledger take turns: two creates onto a new host would each
    delete what the other was writing. A holder that died is taken over from, as an operation lock is: exactly on
    its own machine, and from another once it has not renewed its claim (each part it uploads renews it) for
    ``intent.LEASE_S``. ``holder``: who this is (``intent.this_holder()``; a test names two in one process)."""

    def __init__(self, hosts: Hosts, host: str, image: Image, say: Say = quiet, holder: str | None = None) -> None:
        self.hosts, self.host, self.image, self.say = hosts, host, image, say
        self.holder = holder or this_holder()

    def __enter__(self) -> UploadLease:
        said = False
        while (held := self.hosts.claim_upload(self.host, self.image.content_hash, self.holder)) is not None:
            other, updated_at = held
            if not holder_alive(other, updated_at):
                self.hosts.end_upload(self.host, self.image.content_hash, other)
                continue
            if not said:
                self.say(f"another command is uploading image {self.image.name} to host {self.host}: waiting for it")
                said = True
            time.sleep(WAIT_POLL_S)
        return self

    def renew(self) -> None:
        self.hosts.claim_upload(self.host, self.image.content_hash, self.holder)

    def __exit__(self, *exc: object) -> None:
        self.hosts.end_upload(self.host, self.image.content_hash, self.holder)


def ensure_image(pool: Pool, image: Image, progress: Progress | None = None,
                 lease: UploadLease | None = None) -> ImageVolumes:
    """The image's volumes in ``pool``, uploaded first unless the host already has all of them. ``lease``: the
    turn to upload there, taken only if an upload is needed (None: no other command can be uploading)."""
    started = time.monotonic()
    prefix = image_prefix(image)
    parts = _FIRMWARE_PARTS if image.firmware else _PARTS
    pool.refresh()
    uploaded = 0
    if pool.volume(f"{prefix}.ok") is None:
        with lease or contextlib.nullcontext():
            pool.refresh()
            if pool.volume(f"{prefix}.ok") is None:  # else another command uploaded it while this one waited
                uploaded = _upload(pool, image, parts, progress, lease.renew if lease else lambda: None)
    found = {role: pool.volume(f"{prefix}.{role}") for role, _ in parts}
    missing = [role for role, vol in found.items() if vol is None]
    if missing:
        raise HypervisorError(f"image {image.name}'s {', '.join(missing)} vanished from pool {pool.name}")
    return ImageVolumes(kernel=found.get("kernel"), initrd=found.get("initrd"), base=found["qcow2"],  # type: ignore[arg-type]
                        uploaded_bytes=uploaded, seconds=time.monotonic() - started)


def _upload(pool: Pool, image: Image, parts: tuple[tuple[str, str], ...], progress: Progress | None,
            renew: Callable[[], None]) -> int:
    """Every part, then the marker; returns the bytes uploaded."""
    prefix = image_prefix(image)
    uploaded = 0
    for role, file in parts:
        name = f"{prefix}.{role}"
        pool.delete(name)  # what an earlier upload that never finished left
        source = image.directory / file
        what = f"{image.name}'s {role}"
        pool.upload(name, source, (lambda done, total, what=what: progress(what, done, total))  # type: ignore[misc]
                    if progress else None)
        uploaded += source.stat().st_size
        renew()
    pool.upload(f"{prefix}.ok", image.content_hash.encode() + b"\n")
    pool.refresh()  # libvirt probes formats on refresh: the uploaded base is then seen as qcow2
    return uploaded
