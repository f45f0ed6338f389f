"""Sizing the guest's 64-bit PCI MMIO window for passed-through GPUs.

Datacenter GPUs expose huge 64-bit prefetchable BARs (an H100 maps 128 GiB of BAR1, an H200 256 GiB).
The guest firmware must fit them into q35's 64-bit PCI hole; when the hole is too small the BAR stays
unassigned and the guest driver hangs or fails to initialise (lxd#14380). libvirt sets the hole with
``<controller type='pci' model='pcie-root'><pcihole64 unit='KiB'>N</pcihole64></controller>``.

The size is computed by laying the BARs out the way firmware does, then adding headroom:

* Each card (PCI slot) sits behind its own root port, whose bridge window is aligned to its largest BAR.
  Within a slot the BARs are placed largest first, each aligned to its own size (BAR sizes are powers of
  two, so rounding up is a no-op on real hardware and a safe default otherwise).
* Slots are placed largest alignment first from an aligned base. OVMF and Linux both sort resources by
  alignment this way, and the resulting end address is the exact space needed, alignment gaps included.
* One GiB of headroom is added for the 64-bit BARs of emulated devices (virtio) and for hotplug.
* The result is rounded up to a power of two GiB, because OVMF aligns the window to its own size
  ("naturally"), so an aligned window of that size holds the layout above regardless of its base.

A blanket "double it" margin was rejected: the hole plus guest RAM must fit under the guest's physical
address width, and doubling an H200's need to 1 TiB would exceed QEMU's default 40-bit phys-bits.
"""

from __future__ import annotations

from collections.abc import Iterable

from .sysfs import Bar, PciDevice

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# q35's built-in 64-bit hole (Q35_PCI_HOST_HOLE64_SIZE_DEFAULT in QEMU's hw/pci-host/q35.c).
QEMU_Q35_DEFAULT_HOLE64 = 32 * GiB
EMULATED_DEVICE_HEADROOM = 1 * GiB


def pow2_ceil(value: int) -> int:
    """The smallest power of two that is at least ``value`` (1 for values below 2)."""
    return 1 if value <= 1 else 1 << (value - 1).bit_length()


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def mmio64_bars(device: PciDevice) -> list[Bar]:
    """The BARs that go into the 64-bit hole: 64-bit, prefetchable memory BARs.

    A 64-bit non-prefetchable BAR cannot use it, because a PCIe root port's non-prefetchable window is
    32-bit only, so the firmware places such BARs below 4 GiB.
    """
    return [bar for bar in device.bars if bar.is_memory and bar.is_64bit and bar.is_prefetchable]


def _slot_window(bars: list[Bar]) -> tuple[int, int]:
    """(alignment, size) of the bridge window one card needs, BARs placed largest first."""
    sizes = sorted((pow2_ceil(bar.size) for bar in bars), reverse=True)
    end = 0
    for size in sizes:
        end = _align_up(end, size) + size
    return sizes[0], end


def mmio64_layout_bytes(devices: Iterable[PciDevice]) -> int:
    """Bytes from an aligned base to the end of all 64-bit prefetchable BARs, alignment gaps included."""
    by_slot: dict[str, list[Bar]] = {}
    for device in devices:
        by_slot.setdefault(device.slot, []).extend(mmio64_bars(device))
    windows = sorted((_slot_window(bars) for bars in by_slot.values() if bars), reverse=True)
    end = 0
    for alignment, size in windows:
        end = _align_up(end, alignment) + size
    return end


def required_mmio64_bytes(devices: Iterable[PciDevice]) -> int:
    """The 64-bit hole size these devices need: layout plus headroom, a power of two of at least 1 GiB."""
    layout = mmio64_layout_bytes(devices)
    if layout == 0:
        return 0
    return max(GiB, pow2_ceil(layout + EMULATED_DEVICE_HEADROOM))


def pcihole64_kib(
    devices: Iterable[PciDevice], *, default_window: int = QEMU_Q35_DEFAULT_HOLE64
) -> int | None:
    """The ``<pcihole64 unit='KiB'>`` value for these devices, or None when q35's default is enough.

    None is returned whenever the requirement fits the default window rather than only for tiny BARs:
    emitting a smaller explicit value would shrink the window below QEMU's default and take space away
    from the guest's emulated devices.
    """
    needed = required_mmio64_bytes(devices)
    if needed <= default_window:
        return None
    return needed // KiB
