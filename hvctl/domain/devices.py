"""One class per device kind. Each turns itself into its libvirt XML element and parses it back; none decides."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import ClassVar, Protocol, Self
from xml.etree import ElementTree as ET


class Device(Protocol):
    tag: ClassVar[str]

    def to_xml(self) -> ET.Element: ...


class DeviceParser(Protocol):
    def __call__(self, el: ET.Element) -> Device: ...


def sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def req(el: ET.Element, path: str, attr: str | None = None) -> str:
    """A required value from parsed XML; a missing one is a bug in whoever wrote the XML, so fail loudly."""
    found = el.find(path) if path != "." else el
    if found is None:
        raise ValueError(f"<{el.tag}> lacks <{path}>")
    value = found.get(attr) if attr else found.text
    if value is None:
        raise ValueError(f"<{el.tag}>/{path} lacks {attr or 'text'}")
    return value


@dataclass(frozen=True)
class Disk:
    tag: ClassVar[str] = "disk"
    source: Path
    target: str = "vda"
    fmt: str = "qcow2"
    bus: str = "virtio"
    readonly: bool = False

    def to_xml(self) -> ET.Element:
        el = ET.Element("disk", type="file", device="disk")
        sub(el, "driver", name="qemu", type=self.fmt)
        sub(el, "source", file=str(self.source))
        sub(el, "target", dev=self.target, bus=self.bus)
        if self.readonly:
            sub(el, "readonly")
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> Self:
        return cls(source=Path(req(el, "source", "file")), target=req(el, "target", "dev"),
                   fmt=req(el, "driver", "type"), bus=req(el, "target", "bus"),
                   readonly=el.find("readonly") is not None)


@dataclass(frozen=True)
class SerialConsole:
    """The guest's first serial port: a pty that ``virDomain.openConsole`` attaches to (``hvctl console``), with
    everything the guest prints also logged to a file on the host, which hvctl reads for readiness and
    ``console-log``. The log is appended to, never truncated: virtlogd (which writes it for libvirt, and rotates
    it) would otherwise let an incoming migration's QEMU empty the file the source still writes, and a boot's
    readiness is read from where the file ended. A domain defined by an older hvctl has a plain file serial
    (``<serial type='file'>``); it parses to the same thing."""

    tag: ClassVar[str] = "serial"
    path: Path

    def to_xml(self) -> ET.Element:
        el = ET.Element("serial", type="pty")
        sub(el, "log", file=str(self.path), append="on")
        sub(el, "target", port="0")
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> Self:
        if el.get("type") == "file":
            return cls(path=Path(req(el, "source", "path")))
        return cls(path=Path(req(el, "log", "file")))


@dataclass(frozen=True)
class UnixChannel:
    """A virtio-serial port whose host side is a unix socket; the agent RPC needs no guest network."""

    tag: ClassVar[str] = "channel"
    path: Path
    name: str

    def to_xml(self) -> ET.Element:
        el = ET.Element("channel", type="unix")
        sub(el, "source", mode="bind", path=str(self.path))
        sub(el, "target", type="virtio", name=self.name)
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> Self:
        return cls(path=Path(req(el, "source", "path")), name=req(el, "target", "name"))


@dataclass(frozen=True)
class Rng:
    tag: ClassVar[str] = "rng"
    backend: str = "/dev/urandom"

    def to_xml(self) -> ET.Element:
        el = ET.Element("rng", model="virtio")
        sub(el, "backend", self.backend, model="random")
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> Self:
        return cls(backend=req(el, "backend"))


@dataclass(frozen=True)
class PciAddress:
    domain: int
    bus: int
    slot: int
    function: int

    @classmethod
    def parse(cls, text: str) -> Self:
        dom, bus, rest = text.split(":")
        slot, fn = rest.split(".")
        return cls(int(dom, 16), int(bus, 16), int(slot, 16), int(fn, 16))

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.slot:02x}.{self.function:x}"


@dataclass(frozen=True)
class PciHostdev:
    """A host PCI function passed through with VFIO. ``managed='no'``: hvctl binds and releases it itself."""

    tag: ClassVar[str] = "hostdev"
    address: PciAddress

    def to_xml(self) -> ET.Element:
        el = ET.Element("hostdev", mode="subsystem", type="pci", managed="no")
        sub(el, "driver", name="vfio")
        source = sub(el, "source")
        a = self.address
        sub(source, "address", domain=f"0x{a.domain:04x}", bus=f"0x{a.bus:02x}", slot=f"0x{a.slot:02x}",
            function=f"0x{a.function:x}")
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> Self:
        def num(attr: str) -> int:
            return int(req(el, "source/address", attr), 16)

        return cls(PciAddress(num("domain"), num("bus"), num("slot"), num("function")))


# The nwfilter on every NIC of a tenant network (its rules: hvctl.host.networks.TENANT_FILTERS). Versioned: a change of
# the rules is a new filter, never a redefinition under the VMs that use the old one.
TENANT_FILTER = "hvctl-tenant-v2"
# A tenant network's MTU: room for VXLAN's 50 bytes on a 1500-byte underlay when it spans hosts.
TENANT_MTU = 1450


def tenant_server(subnet: IPv4Network) -> IPv4Address:
    """A tenant network's own address on each host, where its DHCP server listens: the subnet's first, which
    hvctl's IPAM never gives a VM."""
    return next(subnet.hosts())


@dataclass(frozen=True)
class NetInterface:
    """A virtio NIC on a host bridge (``kind='bridge'``) or a libvirt network (``kind='network'``), optionally with a
    libvirt nwfilter and its parameters (``<filterref>``)."""

    tag: ClassVar[str] = "interface"
    kind: str
    source: str
    mac: str
    filter: str | None = None
    filter_params: tuple[tuple[str, str], ...] = ()
    mtu: int | None = None  # given to the guest too (virtio's host_mtu)

    def to_xml(self) -> ET.Element:
        el = ET.Element("interface", type=self.kind)
        sub(el, "mac", address=self.mac)
        sub(el, "source", **{self.kind: self.source})
        sub(el, "model", type="virtio")
        if self.mtu is not None:
            sub(el, "mtu", size=str(self.mtu))
        if self.filter is not None:
            ref = sub(el, "filterref", filter=self.filter)
            for name, value in self.filter_params:
                sub(ref, "parameter", name=name, value=value)
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> Self:
        kind = req(el, ".", "type")
        ref = el.find("filterref")
        mtu = el.find("mtu")
        return cls(kind=kind, source=req(el, "source", kind), mac=req(el, "mac", "address"),
                   mtu=int(mtu.get("size", "0")) if mtu is not None else None,
                   filter=ref.get("filter") if ref is not None else None,
                   filter_params=tuple((p.get("name", ""), p.get("value", "")) for p in ref.iterfind("parameter"))
                   if ref is not None else ())


@dataclass(frozen=True)
class PcieRoot:
    """The q35 root complex. ``pcihole64_kib`` enlarges the 64-bit MMIO window that large-BAR GPUs need."""

    tag: ClassVar[str] = "controller"
    pcihole64_kib: int | None = None

    def to_xml(self) -> ET.Element:
        el = ET.Element("controller", type="pci", index="0", model="pcie-root")
        if self.pcihole64_kib is not None:
            sub(el, "pcihole64", str(self.pcihole64_kib), unit="KiB")
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> Self:
        hole = el.find("pcihole64")
        return cls(pcihole64_kib=int(hole.text) if hole is not None and hole.text else None)


DEVICE_PARSERS: dict[str, DeviceParser] = {
    "disk": Disk.from_xml, "serial": SerialConsole.from_xml, "channel": UnixChannel.from_xml, "rng": Rng.from_xml,
    "hostdev": PciHostdev.from_xml, "interface": NetInterface.from_xml,
}
