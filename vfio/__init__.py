"""Host-side VFIO support: find GPUs in sysfs, check IOMMU groups, bind to vfio-pci and size BAR windows.

This package knows nothing of hvctl and never calls libvirt. It reads and writes sysfs (under an injectable root,
so that it is tested against fake trees) and reads libvirt's node-device XML as text (``nodedev``: the same
inventory for a host whose sysfs is on another machine); any hypervisor front end can reuse it.
"""

from .bars import pcihole64_kib, required_mmio64_bytes
from .binding import (
    Binding,
    BindingJournal,
    BoundDevice,
    JournalEntry,
    KernelWriter,
    MemoryJournal,
    SysfsWriter,
    VfioBinder,
)
from .errors import (
    BindError,
    DeviceInUse,
    DeviceNotFound,
    GroupNotViable,
    InvalidAddress,
    IommuUnavailable,
    NotAGpu,
    ReleaseError,
    VfioError,
)
from .nodedev import NodeDeviceInventory, node_device_name, parse_pci_node_device
from .sysfs import (
    IOMMU_HINT,
    VFIO_PCI_HINT,
    Bar,
    Gpu,
    HostCheck,
    PciDevice,
    PciInventory,
    PciSysfs,
    host_checks,
    iommu_enabled,
    normalize_address,
    vfio_pci_available,
)
from .viability import GroupReport, ProcfsUsers, check_devices, check_group, plan_devices, require_viable

__all__ = [
    "IOMMU_HINT",
    "VFIO_PCI_HINT",
    "Bar",
    "BindError",
    "Binding",
    "BindingJournal",
    "BoundDevice",
    "DeviceInUse",
    "DeviceNotFound",
    "Gpu",
    "GroupNotViable",
    "GroupReport",
    "HostCheck",
    "InvalidAddress",
    "IommuUnavailable",
    "JournalEntry",
    "KernelWriter",
    "MemoryJournal",
    "NotAGpu",
    "NodeDeviceInventory",
    "PciDevice",
    "PciInventory",
    "PciSysfs",
    "ProcfsUsers",
    "ReleaseError",
    "SysfsWriter",
    "VfioBinder",
    "VfioError",
    "check_devices",
    "check_group",
    "host_checks",
    "iommu_enabled",
    "node_device_name",
    "normalize_address",
    "parse_pci_node_device",
    "pcihole64_kib",
    "plan_devices",
    "require_viable",
    "required_mmio64_bytes",
    "vfio_pci_available",
]
