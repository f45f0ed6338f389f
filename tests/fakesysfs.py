"""Fake sysfs, /dev and /proc trees, and a fake kernel, for testing the vfio package without hardware.

THESE ARE FAKES. Binding a GPU to vfio-pci needs root, an IOMMU and the device itself, none of which a
test run has. ``FakeHost`` builds directories and symlinks with the same layout as the real ``/sys``
(``bus/pci/devices/<addr>`` linking to ``devices/pci0000:00/<addr>``, ``driver`` and ``iommu_group``
links, ``kernel/iommu_groups/N/devices``), so the discovery code reads them exactly as it reads /sys.

Writing to ``unbind``, ``bind`` or ``drivers_probe`` in a plain directory does nothing, so ``FakeKernel``
stands in for the kernel: the binder's ``SysfsWriter`` is replaced by it, and it simulates what the
kernel would do (moves the ``driver`` link, honours ``driver_override``, creates ``/dev/vfio/N``). It can
be told to fail a given operation on a given device to exercise rollback. It models only what the
binder relies on; passing here says nothing about a particular kernel version's behaviour.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Real flag words as the kernel prints them in "resource" for an NVIDIA datacenter GPU.
MEM32 = 0x40200  # 32-bit non-prefetchable memory BAR
MEM64_PREF = 0x14220C  # 64-bit prefetchable memory BAR
MEM64 = 0x140204  # 64-bit non-prefetchable memory BAR
IO = 0x40101
ROM = 0x46200


@dataclass(frozen=True)
class FakeBar:
    index: int
    size: int
    flags: int = MEM64_PREF


class FakeHost:
    """A host's ``sys``, ``dev`` and ``proc`` roots under one temporary directory."""

    def __init__(self, base: Path, *, iommu: bool = True, vfio_loaded: bool = True) -> None:
        self.sys = base / "sys"
        self.dev = base / "dev"
        self.proc = base / "proc"
        self.native: dict[str, str | None] = {}
        for path in (
            self.sys / "bus/pci/devices",
            self.sys / "bus/pci/drivers",
            self.sys / "devices/pci0000:00",
            self.sys / "kernel/iommu_groups",
            self.sys / "module",
            self.dev / "vfio",
            self.proc,
        ):
            path.mkdir(parents=True, exist_ok=True)
        (self.sys / "bus/pci/drivers_probe").write_text("")
        self._iommu = iommu
        if vfio_loaded:
            self.add_driver("vfio-pci")
            (self.sys / "module/vfio_pci").mkdir()

    def add_driver(self, name: str) -> None:
        drv = self.sys / "bus/pci/drivers" / name
        drv.mkdir(exist_ok=True)
        for attr in ("bind", "unbind", "new_id"):
            (drv / attr).touch()

    def device_dir(self, address: str) -> Path:
        return self.sys / "devices/pci0000:00" / address

    def add_device(
        self,
        address: str,
        *,
        vendor: int,
        device: int,
        class_code: int,
        group: int,
        driver: str | None = None,
        numa_node: int = 0,
        boot_vga: bool | None = None,
        bars: tuple[FakeBar, ...] = (),
        drm: tuple[str, ...] = (),
        reset_method: str | None = "flr bus",
    ) -> str:
        """Create one PCI function. ``driver`` is also what a plain drivers_probe would bind it to."""
        real = self.device_dir(address)
        real.mkdir(parents=True)
        (real / "vendor").write_text(f"0x{vendor:04x}\n")
        (real / "device").write_text(f"0x{device:04x}\n")
        (real / "class").write_text(f"0x{class_code:06x}\n")
        (real / "numa_node").write_text(f"{numa_node}\n")
        (real / "driver_override").write_text("(null)\n")
        # Real sysfs only has boot_vga on VGA-class devices, so None leaves the file out altogether.
        if boot_vga is not None:
            (real / "boot_vga").write_text("1\n" if boot_vga else "0\n")
        (real / "resource").write_text(_resource_text(bars))
        if reset_method is not None:
            (real / "reset_method").write_text(reset_method + "\n")
        # The first bytes of configuration space: vendor and device IDs, little-endian, as the device answers them.
        (real / "config").write_bytes(vendor.to_bytes(2, "little") + device.to_bytes(2, "little") + bytes(60))
        if drm:
            (real / "drm").mkdir()
            for node in drm:
                (real / "drm" / node).mkdir()
        os.symlink(f"../../../devices/pci0000:00/{address}", self.sys / "bus/pci/devices" / address)
        if self._iommu:
            members = self.sys / "kernel/iommu_groups" / str(group) / "devices"
            members.mkdir(parents=True, exist_ok=True)
            os.symlink(f"../../../kernel/iommu_groups/{group}", real / "iommu_group")
            os.symlink(f"../../../../devices/pci0000:00/{address}", members / address)
        self.native[address] = driver
        if driver is not None:
            self.add_driver(driver)
            self.link_driver(address, driver)
            if driver == "vfio-pci" and self._iommu:
                (self.dev / "vfio" / str(group)).touch()
        return address

    def fall_off_the_bus(self, address: str) -> None:
        """The device stops answering, as one does after a failed reset: reads of its config space return all
        ones. The cached ``vendor`` file keeps its value, as the kernel's does."""
        (self.device_dir(address) / "config").write_bytes(b"\xff" * 64)

    def link_driver(self, address: str, name: str | None) -> None:
        """Point the device's ``driver`` link at ``name`` (None removes it), as the kernel would."""
        link = self.device_dir(address) / "driver"
        if link.is_symlink():
            old = os.path.basename(os.readlink(link))
            (self.sys / "bus/pci/drivers" / old / address).unlink(missing_ok=True)
            link.unlink()
        if name is not None:
            self.add_driver(name)
            os.symlink(f"../../../bus/pci/drivers/{name}", link)
            os.symlink(
                f"../../../../devices/pci0000:00/{address}", self.sys / "bus/pci/drivers" / name / address
            )

    def driver(self, address: str) -> str | None:
        link = self.device_dir(address) / "driver"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None

    def override(self, address: str) -> str:
        return (self.device_dir(address) / "driver_override").read_text().strip()

    def group_of(self, address: str) -> int:
        return int(os.path.basename(os.readlink(self.device_dir(address) / "iommu_group")))

    def snapshot(self) -> dict[str, tuple[str | None, str]]:
        """Each device's (driver, driver_override file content): what a rollback must leave unchanged."""
        return {a: (self.driver(a), self.override(a)) for a in sorted(self.native)}

    def add_process(self, pid: int, comm: str, open_paths: tuple[str, ...]) -> None:
        fd_dir = self.proc / str(pid) / "fd"
        fd_dir.mkdir(parents=True)
        (self.proc / str(pid) / "comm").write_text(comm + "\n")
        for number, target in enumerate(open_paths, start=3):
            os.symlink(target, fd_dir / str(number))

    def nvidia_minor(self, address: str, minor: int) -> None:
        info = self.proc / "driver/nvidia/gpus" / address
        info.mkdir(parents=True)
        (info / "information").write_text(f"Model: \t\t NVIDIA H100\nDevice Minor: \t {minor}\n")


def _resource_text(bars: tuple[FakeBar, ...]) -> str:
    # Thirteen lines like a real endpoint: BARs 0-5, the ROM, then six SR-IOV lines, all zero if unused.
    lines = ["0x0000000000000000 0x0000000000000000 0x0000000000000000"] * 13
    base = 0x38000000000
    for bar in bars:
        lines[bar.index] = f"0x{base:016x} 0x{base + bar.size - 1:016x} 0x{bar.flags:016x}"
        base += max(bar.size, 1 << 30)
    lines[6] = f"0x{0xFB000000:016x} 0x{0xFB07FFFF:016x} 0x{ROM:016x}"
    return "\n".join(lines) + "\n"


class SimulatedCrash(Exception):
    """Raised by FakeKernel to stand for hvctl dying mid-bind; the binder must not catch it."""


@dataclass
class FakeKernel:
    """A ``SysfsWriter`` that applies the effect a write would have in the real kernel.

    ``fail`` holds (address, operation) pairs that raise OSError; operations are ``driver_override``,
    ``unbind``, ``bind`` and ``drivers_probe``. ``crash`` holds pairs that raise SimulatedCrash instead.
    ``ignore_probe`` addresses are never claimed by a probe, like a driver that refuses the device.
    """

    host: FakeHost
    fail: set[tuple[str, str]] = field(default_factory=set)
    crash: set[tuple[str, str]] = field(default_factory=set)
    ignore_probe: set[str] = field(default_factory=set)
    make_devnodes: bool = True
    writes: list[tuple[str, str, str]] = field(default_factory=list)

    def write(self, path: Path, value: str) -> None:
        parts = path.relative_to(self.host.sys).parts
        if parts[-1] == "driver_override":
            operation, address = "driver_override", parts[-2]
        else:
            operation, address = parts[-1], value.strip()
        self.writes.append((address, operation, value))
        if (address, operation) in self.crash:
            raise SimulatedCrash(f"{operation} {address}")
        if (address, operation) in self.fail:
            raise OSError(errno.EIO, f"injected failure: {operation} {address}")
        if not (self.host.sys / "bus/pci/devices" / address).exists():
            raise OSError(errno.ENODEV, f"no such device {address}")
        if operation == "driver_override":
            text = value.strip()
            (self.host.device_dir(address) / "driver_override").write_text((text or "(null)") + "\n")
        elif operation == "unbind":
            if self.host.driver(address) != parts[-2]:
                raise OSError(errno.ENODEV, f"{address} is not bound to {parts[-2]}")
            self._attach(address, None)
        elif operation == "bind":
            self._bind(address, parts[-2])
        elif operation == "drivers_probe":
            if self.host.driver(address) is None and address not in self.ignore_probe:
                override = self.host.override(address)
                target = self.host.native[address] if override == "(null)" else override
                if target is not None and (self.host.sys / "bus/pci/drivers" / target).is_dir():
                    self._attach(address, target)
        else:
            raise AssertionError(f"unexpected sysfs write to {path}")

    def _bind(self, address: str, name: str) -> None:
        if self.host.driver(address) is not None:
            raise OSError(errno.EBUSY, f"{address} already has a driver")
        override = self.host.override(address)
        if override not in ("(null)", name):
            raise OSError(errno.ENODEV, f"driver_override {override} forbids {name}")
        self._attach(address, name)

    def _attach(self, address: str, name: str | None) -> None:
        group = self.host.group_of(address)
        self.host.link_driver(address, name)
        on_vfio = any(
            self.host.driver(a) == "vfio-pci" and self.host.group_of(a) == group for a in self.host.native
        )
        node = self.host.dev / "vfio" / str(group)
        # The kernel creates the group's character device when its first device joins vfio and removes
        # it when the last one leaves.
        if on_vfio and self.make_devnodes:
            node.touch()
        elif not on_vfio:
            node.unlink(missing_ok=True)


# Addresses of the standard host, named for what the tests use them for.
BRIDGE = "0000:00:01.0"
GPU = "0000:01:00.0"  # consumer GPU on nvidia, sharing group 12 with its HDMI audio function
AUDIO = "0000:01:00.1"
H100 = "0000:02:00.0"  # datacenter GPU sharing group 7 with a NIC the host uses
NIC = "0000:03:00.0"
BMC_VGA = "0000:04:00.0"  # the board's VGA, drawing the host console
EDU = "0000:05:00.0"  # QEMU's edu device, the nested test's stand-in accelerator
NVME = "0000:06:00.0"
IDLE_GPU = "0000:07:00.0"  # a GPU and audio function with no driver loaded, plus a driverless group mate
IDLE_AUDIO = "0000:07:00.1"
IDLE_USB = "0000:08:00.0"

H100_BARS = (FakeBar(0, 16 << 20, MEM32), FakeBar(1, 128 << 30), FakeBar(3, 32 << 20))


def standard_host(base: Path) -> FakeHost:
    """A two-socket GPU server in miniature, covering every case the tests need."""
    host = FakeHost(base)
    gpu_bars = (FakeBar(0, 16 << 20, MEM32), FakeBar(1, 32 << 30), FakeBar(3, 32 << 20), FakeBar(5, 128, IO))
    # (address, vendor, device, class, group, driver, extra keyword arguments)
    table: list[tuple[str, int, int, int, int, str | None, dict[str, Any]]] = [
        (BRIDGE, 0x8086, 0x1901, 0x060400, 12, "pcieport", {}),
        (
            GPU,
            0x10DE,
            0x2684,
            0x030000,
            12,
            "nvidia",
            {"boot_vga": False, "drm": ("card1", "renderD129"), "bars": gpu_bars},
        ),
        (AUDIO, 0x10DE, 0x22BA, 0x040300, 12, "snd_hda_intel", {"bars": (FakeBar(0, 16 << 10, MEM32),)}),
        (H100, 0x10DE, 0x2330, 0x030200, 7, "nvidia", {"numa_node": 1, "bars": H100_BARS}),
        (NIC, 0x8086, 0x10D3, 0x020000, 7, "e1000e", {"numa_node": 1}),
        (BMC_VGA, 0x1A03, 0x2000, 0x030000, 20, "ast", {"boot_vga": True, "numa_node": -1}),
        (EDU, 0x1234, 0x11E8, 0x00FF00, 30, None, {}),
        (NVME, 0x144D, 0xA808, 0x010802, 40, "nvme", {}),
        (IDLE_GPU, 0x10DE, 0x2684, 0x030000, 50, None, {}),
        (IDLE_AUDIO, 0x10DE, 0x22BA, 0x040300, 50, None, {}),
        (IDLE_USB, 0x1912, 0x0014, 0x0C0330, 50, None, {}),
    ]
    for address, vendor, device, class_code, group, driver, extra in table:
        host.add_device(
            address, vendor=vendor, device=device, class_code=class_code, group=group, driver=driver, **extra
        )
    return host
