"""IOMMU group viability: can VFIO take a whole group without taking a device from the host?

The kernel only lets a VM open a group when every endpoint in it is bound to vfio-pci or pci-stub or has
no driver at all. Checking that ourselves, before touching any driver, turns the kernel's opaque
"group is not viable" (kubevirt#6718) into a message that names the device in the way and why.
It also holds the default "who on the host is using this device" probe (``ProcfsUsers``), because
unbinding a GPU that a process still has open hangs or crashes that process (gpu-operator#2079).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import GroupNotViable, IommuUnavailable
from .sysfs import INERT_DRIVERS, IOMMU_HINT, Gpu, PciDevice, PciInventory, PciSysfs


@dataclass(frozen=True)
class Blocker:
    device: PciDevice
    reason: str

    def describe(self) -> str:
        return f"{self.device.describe()} {self.reason}"


@dataclass(frozen=True)
class GroupReport:
    group: int
    members: tuple[PciDevice, ...]
    blockers: tuple[Blocker, ...]

    @property
    def viable(self) -> bool:
        return not self.blockers

    def raise_if_not_viable(self) -> None:
        if self.blockers:
            raise GroupNotViable(self.group, [b.describe() for b in self.blockers])


def _blocker(device: PciDevice, to_bind: set[str]) -> Blocker | None:
    # Bridges are never handed to the guest and the kernel ignores them for viability too.
    if device.is_bridge or device.address in to_bind:
        return None
    if device.driver is None or device.driver in INERT_DRIVERS:
        return None
    return Blocker(device, f"is bound to host driver {device.driver}")


def check_group(inventory: PciInventory, group: int, to_bind: Iterable[str]) -> GroupReport:
    """Report whether ``group`` becomes viable once the addresses in ``to_bind`` are on vfio-pci."""
    members = tuple(inventory.group_members(group))
    if not members:
        raise IommuUnavailable(f"IOMMU group {group} does not exist or is empty", hint=IOMMU_HINT)
    wanted = set(to_bind)
    blockers = tuple(b for b in (_blocker(d, wanted) for d in members) if b is not None)
    return GroupReport(group=group, members=members, blockers=blockers)


def group_of(device: PciDevice) -> int:
    if device.iommu_group is None:
        raise IommuUnavailable(f"{device.describe()} is not in any IOMMU group", hint=IOMMU_HINT)
    return device.iommu_group


def check_devices(inventory: PciInventory, devices: Sequence[PciDevice]) -> list[GroupReport]:
    """Check every group the devices belong to, treating all of ``devices`` as about to be bound."""
    addresses = {d.address for d in devices}
    groups = sorted({group_of(d) for d in devices})
    return [check_group(inventory, group, addresses) for group in groups]


def require_viable(inventory: PciInventory, devices: Sequence[PciDevice]) -> list[GroupReport]:
    """Like ``check_devices`` but raises GroupNotViable for the first group that is not viable."""
    reports = check_devices(inventory, devices)
    for report in reports:
        report.raise_if_not_viable()
    return reports


def plan_devices(inventory: PciInventory, gpu: Gpu, extra: Iterable[str] = ()) -> list[PciDevice]:
    """The devices to move to vfio-pci for ``gpu``.

    That is every function of the card, any addresses the caller explicitly adds (to seize a group mate
    the operator agreed to give up), and every driverless endpoint of the same groups. The driverless
    ones are pinned to vfio-pci too so that a host driver loaded later cannot claim a device whose group
    a guest already owns. Endpoints bound to a host driver are not taken silently: they are reported by
    ``require_viable`` instead.
    """
    chosen: dict[str, PciDevice] = {d.address: d for d in gpu.functions}
    for address in extra:
        device = inventory.device(address)
        chosen[device.address] = device
    for group in sorted({group_of(d) for d in chosen.values()}):
        for member in inventory.group_members(group):
            if not member.is_bridge and member.driver is None:
                chosen.setdefault(member.address, member)
    return sorted(chosen.values(), key=lambda d: d.address)


class ProcfsUsers:
    """Lists host processes holding a device node of a PCI device open, by scanning ``/proc/*/fd``.

    It is a heuristic: it sees DRM nodes (``/dev/dri/card*``, ``renderD*``) found under the device's
    ``drm`` directory and the NVIDIA per-GPU node ``/dev/nvidia<minor>``, whose minor the nvidia driver
    publishes under ``/proc/driver/nvidia/gpus/<address>``. In-kernel users (fbcon, for instance) are
    invisible to it, which is why the boot VGA device is refused separately. The fd links in procfs
    always carry the absolute ``/dev/...`` path, so they are matched literally even under a test root.
    """

    def __init__(self, sysfs: PciSysfs, proc_root: Path | str = Path("/proc")) -> None:
        self.sysfs = sysfs
        self.proc_root = Path(proc_root)

    def device_nodes(self, device: PciDevice) -> set[str]:
        nodes: set[str] = set()
        drm = self.sysfs.device_dir(device.address) / "drm"
        if drm.is_dir():
            nodes.update(f"/dev/dri/{entry.name}" for entry in drm.iterdir())
        info = self.proc_root / "driver" / "nvidia" / "gpus" / device.address / "information"
        if info.is_file():
            for line in info.read_text().splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "Device Minor" and value.strip().isdigit():
                    nodes.add(f"/dev/nvidia{int(value)}")
        return nodes

    def __call__(self, device: PciDevice) -> list[str]:
        nodes = self.device_nodes(device)
        if not nodes or not self.proc_root.is_dir():
            return []
        users: list[str] = []
        for proc in sorted(self.proc_root.iterdir(), key=lambda p: p.name):
            if not proc.name.isdigit():
                continue
            try:
                targets = {str(fd.readlink()) for fd in (proc / "fd").iterdir()}
                comm = (proc / "comm").read_text().strip() if (proc / "comm").exists() else "?"
            except OSError:
                # The process exited mid-scan or is not ours to inspect; neither is evidence of use.
                continue
            for node in sorted(nodes & targets):
                users.append(f"pid {proc.name} ({comm}) has {node} open")
        return users
