"""Read-only discovery of PCI devices, GPUs and IOMMU groups from a sysfs tree.

The sysfs root is a parameter everywhere (default ``/sys``) so that tests can point it at a fake tree
and so that nothing here needs root or real hardware to be exercised.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import DeviceNotFound, InvalidAddress, NotAGpu

DEFAULT_SYSFS = Path("/sys")

# Flag bits from the kernel's include/linux/ioport.h. The kernel exports them unchanged in each device's
# "resource" file, so they are a stable userspace ABI.
IORESOURCE_IO = 0x00000100
IORESOURCE_MEM = 0x00000200
IORESOURCE_PREFETCH = 0x00002000
IORESOURCE_MEM_64 = 0x00100000

# Lines 0-5 of the resource file are the standard BARs; line 6 is the expansion ROM and later lines are
# bridge windows or SR-IOV VF BARs, none of which a guest maps as a device BAR.
_BAR_COUNT = 6

# Base class + subclass (the top 16 bits of the 24-bit class code). 0x0380 ("other display controller")
# is included because AMD Instinct accelerators enumerate with it.
GPU_CLASSES = frozenset({0x0300, 0x0302, 0x0380})
VGA_CLASS = 0x0300  # VGA-compatible: the only class firmware picks a boot display from
BRIDGE_CLASS = 0x0604

VFIO_DRIVER = "vfio-pci"
# Drivers that leave a device harmless to the host from the IOMMU's point of view (the kernel's own
# viability rule treats pci-stub the same as vfio-pci).
INERT_DRIVERS = frozenset({VFIO_DRIVER, "pci-stub"})

IOMMU_HINT = "enable the IOMMU: add intel_iommu=on (Intel) or amd_iommu=on (AMD) to the kernel command line"
VFIO_PCI_HINT = "load the driver with `modprobe vfio-pci` (and add it to /etc/modules-load.d to persist)"

_ADDRESS_RE = re.compile(r"^(?:([0-9a-f]{4}):)?([0-9a-f]{2}):([0-1][0-9a-f])\.([0-7])$")


def normalize_address(text: str) -> str:
    """Return the canonical DDDD:BB:DD.F form, accepting the short BB:DD.F form lspci prints."""
    match = _ADDRESS_RE.match(text.strip().lower())
    if match is None:
        raise InvalidAddress(
            f"'{text}' is not a PCI address", hint="use the DDDD:BB:DD.F form, e.g. 0000:01:00.0"
        )
    domain, bus, slot, function = match.groups()
    return f"{domain or '0000'}:{bus}:{slot}.{function}"


@dataclass(frozen=True)
class Bar:
    """One populated BAR: ``index`` 0-5, its host address range and the ioport.h flags."""

    index: int
    start: int
    size: int
    flags: int

    @property
    def is_memory(self) -> bool:
        return bool(self.flags & IORESOURCE_MEM)

    @property
    def is_64bit(self) -> bool:
        return bool(self.flags & IORESOURCE_MEM_64)

    @property
    def is_prefetchable(self) -> bool:
        return bool(self.flags & IORESOURCE_PREFETCH)


@dataclass(frozen=True)
class PciDevice:
    """A snapshot of one PCI function as sysfs described it when it was read."""

    address: str
    vendor: int
    device: int
    class_code: int
    driver: str | None
    driver_override: str | None
    iommu_group: int | None
    numa_node: int | None
    # Whether firmware chose it as the boot VGA device (the host's console). None: the source cannot tell (libvirt's
    # node-device XML, for a VGA-compatible device).
    boot_vga: bool | None
    bars: tuple[Bar, ...]
    # The kernel's reset methods for the function, in the order it tries them (``reset_method``, Linux 5.15+):
    # "flr", "pm", "bus", "af"...; empty when it has none or the kernel does not say.
    reset_method: tuple[str, ...] = ()

    @property
    def slot(self) -> str:
        """DDDD:BB:DD, shared by all functions of one physical card."""
        return self.address.rsplit(".", 1)[0]

    @property
    def ids(self) -> str:
        return f"{self.vendor:04x}:{self.device:04x}"

    @property
    def is_display(self) -> bool:
        return (self.class_code >> 8) in GPU_CLASSES

    @property
    def is_bridge(self) -> bool:
        return (self.class_code >> 8) == BRIDGE_CLASS

    def describe(self) -> str:
        """How errors name a device, e.g. ``0000:01:00.2 (8086:10d3, class 0x020000)``."""
        return f"{self.address} ({self.ids}, class 0x{self.class_code:06x})"


@dataclass(frozen=True)
class Gpu:
    """A GPU as passed through: its primary function plus the other functions of the same slot."""

    primary: PciDevice
    companions: tuple[PciDevice, ...]

    @property
    def functions(self) -> tuple[PciDevice, ...]:
        return (self.primary, *self.companions)

    @property
    def address(self) -> str:
        return self.primary.address


Allowlist = Iterable[tuple[int, int]]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _link_name(path: Path) -> str | None:
    # The basename of the symlink target is the driver or group name; the link is absent when unset.
    try:
        return os.path.basename(os.readlink(path))
    except (FileNotFoundError, NotADirectoryError):
        return None


def parse_resource(text: str) -> tuple[Bar, ...]:
    """Parse a device's ``resource`` file into its populated BARs (0-5 only)."""
    bars: list[Bar] = []
    for index, line in enumerate(text.splitlines()[:_BAR_COUNT]):
        fields = line.split()
        if len(fields) != 3:
            continue
        start, end, flags = (int(field, 16) for field in fields)
        # An empty slot, including the upper half of a 64-bit BAR, reads as all zeros.
        if end == 0:
            continue
        bars.append(Bar(index=index, start=start, size=end - start + 1, flags=flags))
    return tuple(bars)


class PciInventory:
    """A host's PCI devices and IOMMU groups, read from wherever that host describes them: its sysfs
    (``PciSysfs``, on the machine hvctl runs on) or libvirt's node-device XML (``vfio.nodedev``, any host). What
    is derived from the devices (GPUs, their functions, a group's members) is worked out here, once for both."""

    def addresses(self) -> list[str]:
        raise NotImplementedError

    def device(self, address: str) -> PciDevice:
        raise NotImplementedError

    def group_members(self, group: int) -> list[PciDevice]:
        raise NotImplementedError

    def live_vendor_id(self, address: str) -> int | None:
        """The vendor ID read from the device's configuration space now, or None where that cannot be read."""
        return None

    def devices(self) -> list[PciDevice]:
        return [self.device(address) for address in self.addresses()]

    def slot_functions(self, address: str) -> list[PciDevice]:
        """Every function of the card at ``address``, the given one included, in function order."""
        slot = normalize_address(address).rsplit(".", 1)[0]
        return [self.device(a) for a in self.addresses() if a.rsplit(".", 1)[0] == slot]

    def is_gpu(self, device: PciDevice, allowlist: Allowlist = ()) -> bool:
        return device.is_display or (device.vendor, device.device) in set(allowlist)

    def gpu(self, address: str, accelerator_allowlist: Allowlist = ()) -> Gpu:
        """The GPU whose primary function is at ``address``; raises if it is not a GPU."""
        allow = set(accelerator_allowlist)
        primary = self.device(address)
        if not self.is_gpu(primary, allow):
            raise NotAGpu(primary.address, primary.ids, primary.class_code)
        companions = tuple(d for d in self.slot_functions(primary.address) if d.address != primary.address)
        return Gpu(primary=primary, companions=companions)

    def gpus(self, accelerator_allowlist: Allowlist = ()) -> list[Gpu]:
        """Every GPU on the host, one per card: the lowest GPU function of a slot is its primary."""
        allow = set(accelerator_allowlist)
        seen_slots: set[str] = set()
        found: list[Gpu] = []
        for device in self.devices():
            if device.slot in seen_slots or not self.is_gpu(device, allow):
                continue
            seen_slots.add(device.slot)
            found.append(self.gpu(device.address, allow))
        return found


class PciSysfs(PciInventory):
    """Reads PCI devices and IOMMU groups under ``root`` (normally ``/sys``)."""

    def __init__(self, root: Path | str = DEFAULT_SYSFS) -> None:
        self.root = Path(root)

    @property
    def devices_dir(self) -> Path:
        return self.root / "bus" / "pci" / "devices"

    @property
    def drivers_dir(self) -> Path:
        return self.root / "bus" / "pci" / "drivers"

    def device_dir(self, address: str) -> Path:
        return self.devices_dir / address

    def addresses(self) -> list[str]:
        if not self.devices_dir.is_dir():
            return []
        return sorted(entry.name for entry in self.devices_dir.iterdir())

    def current_driver(self, address: str) -> str | None:
        return _link_name(self.device_dir(address) / "driver")

    def driver_override(self, address: str) -> str | None:
        value = _read(self.device_dir(address) / "driver_override")
        # The kernel prints "(null)" when no override is set.
        return None if value in (None, "", "(null)") else value

    def device(self, address: str) -> PciDevice:
        address = normalize_address(address)
        path = self.device_dir(address)
        if not path.exists():
            raise DeviceNotFound(address)
        numa = _read(path / "numa_node")
        group = _link_name(path / "iommu_group")
        return PciDevice(
            address=address,
            vendor=int(_read(path / "vendor") or "0", 16),
            device=int(_read(path / "device") or "0", 16),
            class_code=int(_read(path / "class") or "0", 16),
            driver=self.current_driver(address),
            driver_override=self.driver_override(address),
            iommu_group=int(group) if group is not None else None,
            # The kernel reports -1 when the platform has no NUMA information.
            numa_node=int(numa) if numa is not None and int(numa) >= 0 else None,
            boot_vga=_read(path / "boot_vga") == "1",
            bars=parse_resource(_read(path / "resource") or ""),
            reset_method=tuple((_read(path / "reset_method") or "").split()),
        )

    def live_vendor_id(self, address: str) -> int | None:
        """The vendor ID read from the function's configuration space now (``config``, not the ``vendor`` file,
        which is what the kernel cached at enumeration). 0xffff means the device no longer answers: it fell off
        the bus, typically after a failed reset. None when the config space cannot be read."""
        try:
            with open(self.device_dir(normalize_address(address)) / "config", "rb") as f:
                head = f.read(2)
        except OSError:
            return None
        return int.from_bytes(head, "little") if len(head) == 2 else None

    def group_members(self, group: int) -> list[PciDevice]:
        members = self.root / "kernel" / "iommu_groups" / str(group) / "devices"
        if not members.is_dir():
            return []
        return [self.device(entry.name) for entry in sorted(members.iterdir())]


def iommu_enabled(root: Path | str = DEFAULT_SYSFS) -> bool:
    """True when the kernel created IOMMU groups, i.e. an IOMMU is present and enabled (see IOMMU_HINT)."""
    groups = Path(root) / "kernel" / "iommu_groups"
    return groups.is_dir() and any(groups.iterdir())


def vfio_pci_available(root: Path | str = DEFAULT_SYSFS) -> bool:
    """True when the vfio-pci driver is registered or its module is loaded (see VFIO_PCI_HINT)."""
    base = Path(root)
    return (base / "bus" / "pci" / "drivers" / VFIO_DRIVER).is_dir() or (
        base / "module" / "vfio_pci"
    ).is_dir()


@dataclass(frozen=True)
class HostCheck:
    """One prerequisite for the doctor command: whether it holds, and what to do when it does not."""

    name: str
    ok: bool
    hint: str


def host_checks(root: Path | str = DEFAULT_SYSFS) -> list[HostCheck]:
    return [
        HostCheck(name="iommu", ok=iommu_enabled(root), hint=IOMMU_HINT),
        HostCheck(name="vfio-pci", ok=vfio_pci_available(root), hint=VFIO_PCI_HINT),
    ]
