"""What hvctl keeps in a host's storage pool, and how it gets there.

An image's kernel, initrd and base disk (an imported cloud image's base disk alone: its bootloader is inside) are
uploaded once per host over libvirt streams, named by the image's content hash (``img-NAME-HASH.{kernel,initrd,
qcow2}``), and reused by every later caller. A marker volume
(``img-NAME-HASH.ok``) is uploaded last: an upload cut short leaves no marker and is redone before anything uses it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from hvctl.errors import HypervisorError
from hvctl.host import Pool, Volume
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


def ensure_image(pool: Pool, image: Image, progress: Progress | None = None) -> ImageVolumes:
    """The image's volumes in ``pool``, uploaded first unless the host already has all of them."""
    started = time.monotonic()
    prefix = image_prefix(image)
    marker = f"{prefix}.ok"
    parts = _FIRMWARE_PARTS if image.firmware else _PARTS
    pool.refresh()
    uploaded = 0
    if pool.volume(marker) is None:
        for role, file in parts:
            name = f"{prefix}.{role}"
            pool.delete(name)  # what an earlier upload that never finished left
            source = image.directory / file
            what = f"{image.name}'s {role}"
            pool.upload(name, source, (lambda done, total, what=what: progress(what, done, total))  # type: ignore[misc]
                        if progress else None)
            uploaded += source.stat().st_size
        pool.upload(marker, image.content_hash.encode() + b"\n")
        pool.refresh()  # libvirt probes formats on refresh: the uploaded base is then seen as qcow2
    found = {role: pool.volume(f"{prefix}.{role}") for role, _ in parts}
    missing = [role for role, vol in found.items() if vol is None]
    if missing:
        raise HypervisorError(f"image {image.name}'s {', '.join(missing)} vanished from pool {pool.name}")
    return ImageVolumes(kernel=found.get("kernel"), initrd=found.get("initrd"), base=found["qcow2"],  # type: ignore[arg-type]
                        uploaded_bytes=uploaded, seconds=time.monotonic() - started)
