"""A host's PCI devices as libvirt's node-device API describes them: the inventory of a host whose sysfs hvctl cannot
read, because it runs on another machine.

This module reads node-device XML as text (what ``virNodeDevice.XMLDesc`` returns) and never calls libvirt itself,
so it is tested against recorded XML. The XML carries what GPU choice and group viability need: address, vendor,
device, class, driver, NUMA node and the IOMMU group with its members. It does not carry BAR sizes,
``driver_override`` or the kernel's reset methods, so those read as empty here, nor the boot-VGA flag, which reads
as unknown (None) for a VGA-compatible device; hvctl's README says what replaces each on a remote host.
"""

from __future__ import annotations

from collections.abc import Iterable
from xml.etree import ElementTree as ET

from .errors import DeviceNotFound
from .sysfs import VGA_CLASS, PciDevice, PciInventory, normalize_address


def node_device_name(address: str) -> str:
    """libvirt's name for the PCI function at ``address``: 0000:41:00.1 is ``pci_0000_41_00_1``."""
    return "pci_" + normalize_address(address).replace(":", "_").replace(".", "_")


def _int(text: str | None, base: int = 10) -> int:
    return int(text, base) if text else 0


def parse_pci_node_device(xml: str) -> PciDevice | None:
    """One PCI function from its node-device XML; None for a node device that is not a PCI function."""
    root = ET.fromstring(xml)
    cap = root.find("capability[@type='pci']")
    if cap is None:
        return None
    address = (f"{_int(cap.findtext('domain')):04x}:{_int(cap.findtext('bus')):02x}:"
               f"{_int(cap.findtext('slot')):02x}.{_int(cap.findtext('function')):x}")
    vendor, product, group, numa = cap.find("vendor"), cap.find("product"), cap.find("iommuGroup"), cap.find("numa")
    # libvirt leaves <class> out when sysfs has none to give; a device then reads as class 0, never a GPU by class.
    class_code = int(cap.findtext("class") or "0", 16)
    return PciDevice(
        address=address,
        vendor=int(vendor.get("id", "0"), 16) if vendor is not None else 0,
        device=int(product.get("id", "0"), 16) if product is not None else 0,
        class_code=class_code,
        driver=root.findtext("driver/name") or None,
        driver_override=None,
        iommu_group=int(group.get("number", "")) if group is not None and group.get("number") else None,
        numa_node=int(numa.get("node", "-1")) if numa is not None and int(numa.get("node", "-1")) >= 0 else None,
        boot_vga=None if class_code >> 8 == VGA_CLASS else False,
        bars=(),
    )


class NodeDeviceInventory(PciInventory):
    """The PCI functions of one host, from the node-device XML of each (``listAllDevices`` with the PCI flag).

    A snapshot: it holds the XML it was given and reads nothing later. The members of an IOMMU group are the
    functions whose XML names that group, so a bridge in the group counts as it does in sysfs."""

    def __init__(self, xmls: Iterable[str]) -> None:
        self._devices: dict[str, PciDevice] = {}
        for xml in xmls:
            device = parse_pci_node_device(xml)
            if device is not None:
                self._devices[device.address] = device

    def addresses(self) -> list[str]:
        return sorted(self._devices)

    def device(self, address: str) -> PciDevice:
        address = normalize_address(address)
        if address not in self._devices:
            raise DeviceNotFound(address)
        return self._devices[address]

    def group_members(self, group: int) -> list[PciDevice]:
        return [self._devices[a] for a in self.addresses() if self._devices[a].iommu_group == group]

    @property
    def iommu_enabled(self) -> bool:
        """True when the host's kernel put its devices in IOMMU groups (libvirt names none otherwise)."""
        return any(d.iommu_group is not None for d in self._devices.values())
