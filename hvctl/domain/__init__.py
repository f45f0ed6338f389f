"""Typed libvirt domain model: objects that turn into domain XML and back, with no decisions inside."""

from hvctl.domain.devices import Disk, NetInterface, PciAddress, PcieRoot, PciHostdev, Rng, SerialConsole, UnixChannel
from hvctl.domain.model import Accel, CpuMode, DirectBoot, Domain, FirmwareBoot, UserNetwork, Viommu
from hvctl.domain.tuning import Tuning

__all__ = [
    "Accel", "CpuMode", "DirectBoot", "Disk", "Domain", "FirmwareBoot", "NetInterface", "PciAddress", "PciHostdev",
    "PcieRoot", "Rng",
    "SerialConsole", "Tuning", "UnixChannel", "UserNetwork", "Viommu",
]
