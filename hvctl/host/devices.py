"""PCI devices of any host through libvirt's node-device API: the inventory, and moving a device to vfio-pci and back
(``virNodeDeviceDetachFlags``, ``virNodeDeviceReAttach``), for hosts whose sysfs is on another machine.

The binder here is vfio's ``DeviceBinder`` with libvirt doing each move: the same transaction, checks, journal
(the ledger's) and rollback as the sysfs binder on the machine hvctl runs on. libvirt does the sysfs writes on the
host, waits for the driver, and refuses to take a device an active domain of that daemon uses.
"""

from __future__ import annotations

from collections.abc import Callable

import libvirt

from hvctl.host._errors import _msg
from vfio import NodeDeviceInventory, PciInventory, node_device_name
from vfio.binding import BindingJournal, BoundDevice, DeviceBinder, OwnerOf, StepFailed
from vfio.sysfs import VFIO_DRIVER


def pci_inventory(conn: libvirt.virConnect) -> NodeDeviceInventory:
    """Every PCI function of the host behind ``conn``, as its libvirt describes it now."""
    devices = conn.listAllDevices(libvirt.VIR_CONNECT_LIST_NODE_DEVICES_CAP_PCI_DEV)
    return NodeDeviceInventory(dev.XMLDesc(0) for dev in devices)


class NodeDeviceBinder(DeviceBinder):
    """Moves a host's devices between their drivers and vfio-pci through its libvirt.

    What libvirt cannot tell is not checked here: processes holding a device open on the host (sysfs's binder scans
    /proc for them) and the boot-VGA flag. libvirt's own refusal (a device an active domain uses) still applies."""

    def __init__(self, conn: libvirt.virConnect, *, journal: BindingJournal | None = None,
                 owner_of: Callable[[str], str | None] | None = None) -> None:
        owner: OwnerOf = owner_of or (lambda address: None)
        super().__init__(journal=journal, owner_of=owner)
        self.conn = conn

    def inventory(self) -> PciInventory:
        return pci_inventory(self.conn)

    def _driver(self, address: str) -> str | None:
        """The device's driver now: libvirt re-reads the driver link at each XMLDesc."""
        try:
            xml = self.conn.nodeDeviceLookupByName(node_device_name(address)).XMLDesc(0)
        except libvirt.libvirtError as exc:
            raise StepFailed(address, "read", f"reading node device {node_device_name(address)}: {_msg(exc)}") \
                from None
        return NodeDeviceInventory([xml]).device(address).driver

    def _call(self, address: str, step: str, what: str, action: Callable[[libvirt.virNodeDevice], object]) -> None:
        try:
            action(self.conn.nodeDeviceLookupByName(node_device_name(address)))
        except libvirt.libvirtError as exc:
            raise StepFailed(address, step, f"{what} {node_device_name(address)}: {_msg(exc)}") from None

    def _move_to_vfio(self, item: BoundDevice) -> None:
        self.journal.record(item.address, "detach", item.original_driver, "detaching")
        self._call(item.address, "detach", "libvirt's detach of", lambda dev: dev.detachFlags("vfio", 0))
        now = self._driver(item.address)
        if now != VFIO_DRIVER:
            raise StepFailed(item.address, "verify", f"on {now or 'no driver'} after libvirt's detach, not vfio-pci")
        self.journal.record(item.address, "verify", item.original_driver, "bound")

    def _restore(self, item: BoundDevice, step: str) -> None:
        if self._driver(item.address) == item.original_driver:
            return  # never moved, or on vfio-pci from the start
        # libvirt unbinds from vfio-pci, clears the override and lets the host's drivers probe the device again.
        self._call(item.address, step, "libvirt's reattach of", lambda dev: dev.reAttach())
        now = self._driver(item.address)
        if now != item.original_driver:
            raise StepFailed(item.address, step, f"expected {item.original_driver or 'no driver'} but found "
                                                 f"{now or 'no driver'} after libvirt's reattach")
