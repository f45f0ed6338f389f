"""Host-side VFIO support: find GPUs in sysfs, check IOMMU groups, bind to vfio-pci and size BAR windows.

This package knows nothing of libvirt or of hvctl; it only reads and writes sysfs (under an injectable
root) so that it can be tested against fake trees and reused by any hypervisor front end.
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
from .sysfs import (
    IOMMU_HINT,
    VFIO_PCI_HINT,
    Bar,
    Gpu,
    HostCheck,
    PciDevice,
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
    "PciDevice",
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
    "normalize_address",
    "pcihole64_kib",
    "plan_devices",
    "require_viable",
    "required_mmio64_bytes",
    "vfio_pci_available",
]
