"""One class per device kind, each with its XML declared once (``hvctl.domain.xmlmap``): where each field lives in
the device's libvirt element, and the element's fixed parts. ``to_xml`` and ``from_xml`` both read that; none
decides."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import ClassVar, Protocol, Self
from xml.etree import ElementTree as ET

from hvctl.domain.xmlmap import INT, Fixed, Flag, Item, Nested, Pairs, Quantity, Value, emit, hex_width, parse


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


PATH = (str, Path)


class Declared:
    """A device whose XML is its ``xml`` declarations."""

    tag: ClassVar[str]
    xml: ClassVar[tuple[Item, ...]]

    def to_xml(self) -> ET.Element:
        return emit(self.tag, self)

    @classmethod
    def from_xml(cls, el: ET.Element) -> Self:
        return parse(el, cls)


@dataclass(frozen=True)
class Disk(Declared):
    tag: ClassVar[str] = "disk"
    xml: ClassVar[tuple[Item, ...]] = (
        Fixed(".", (("type", "file"), ("device", "disk"))), Fixed("driver", (("name", "qemu"),)),
        Value("fmt", "driver", "type"), Value("source", "source", "file", PATH), Value("target", "target", "dev"),
        Value("bus", "target", "bus"), Flag("readonly", "readonly"))
    source: Path
    target: str = "vda"
    fmt: str = "qcow2"
    bus: str = "virtio"
    readonly: bool = False


@dataclass(frozen=True)
class SerialConsole(Declared):
    """The guest's first serial port: a pty that ``virDomain.openConsole`` attaches to (``hvctl console``), with
    everything the guest prints also logged to a file on the host, which hvctl reads for readiness and
    ``console-log``. The log is appended to, never truncated: virtlogd (which writes it for libvirt, and rotates
    it) would otherwise let an incoming migration's QEMU empty the file the source still writes, and a boot's
    readiness is read from where the file ended. A domain defined by an older hvctl has a plain file serial
    (``<serial type='file'>``); it parses to the same thing."""

    tag: ClassVar[str] = "serial"
    xml: ClassVar[tuple[Item, ...]] = (
        Fixed(".", (("type", "pty"),)), Value("path", "log", "file", PATH, also=(("append", "on"),)),
        Fixed("target", (("port", "0"),)))
    path: Path

    @classmethod
    def from_xml(cls, el: ET.Element) -> Self:
        if el.get("type") == "file":
            return cls(path=Path(req(el, "source", "path")))
        return parse(el, cls)


@dataclass(frozen=True)
class UnixChannel(Declared):
    """A virtio-serial port whose host side is a unix socket; the agent RPC needs no guest network."""

    tag: ClassVar[str] = "channel"
    xml: ClassVar[tuple[Item, ...]] = (
        Fixed(".", (("type", "unix"),)), Fixed("source", (("mode", "bind"),)), Value("path", "source", "path", PATH),
        Fixed("target", (("type", "virtio"),)), Value("name", "target", "name"))
    path: Path
    name: str


@dataclass(frozen=True)
class Rng(Declared):
    tag: ClassVar[str] = "rng"
    xml: ClassVar[tuple[Item, ...]] = (
        Fixed(".", (("model", "virtio"),)), Value("backend", "backend", also=(("model", "random"),)))
    backend: str = "/dev/urandom"


@dataclass(frozen=True)
class PciAddress:
    domain: int
    bus: int
    slot: int
    function: int

    xml: ClassVar[tuple[Item, ...]] = (
        Value("domain", ".", "domain", hex_width(4)), Value("bus", ".", "bus", hex_width(2)),
        Value("slot", ".", "slot", hex_width(2)), Value("function", ".", "function", hex_width(1)))

    @classmethod
    def parse(cls, text: str) -> Self:
        dom, bus, rest = text.split(":")
        slot, fn = rest.split(".")
        return cls(int(dom, 16), int(bus, 16), int(slot, 16), int(fn, 16))

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.slot:02x}.{self.function:x}"


@dataclass(frozen=True)
class PciHostdev(Declared):
    """A host PCI function passed through with VFIO. ``managed='no'``: hvctl binds and releases it itself."""

    tag: ClassVar[str] = "hostdev"
    xml: ClassVar[tuple[Item, ...]] = (
        Fixed(".", (("mode", "subsystem"), ("type", "pci"), ("managed", "no"))), Fixed("driver", (("name", "vfio"),)),
        Nested("address", "source/address", PciAddress))
    address: PciAddress


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
class NetInterface(Declared):
    """A virtio NIC on a host bridge (``kind='bridge'``) or a libvirt network (``kind='network'``), optionally with a
    libvirt nwfilter and its parameters (``<filterref>``)."""

    tag: ClassVar[str] = "interface"
    xml: ClassVar[tuple[Item, ...]] = (
        Value("kind", ".", "type"), Value("mac", "mac", "address"), Value("source", "source", attr_from="kind"),
        Fixed("model", (("type", "virtio"),)), Value("mtu", "mtu", "size", INT), Value("filter", "filterref", "filter"),
        Pairs("filter_params", "filterref/parameter", "name", "value"))
    kind: str
    source: str
    mac: str
    filter: str | None = None
    filter_params: tuple[tuple[str, str], ...] = ()
    mtu: int | None = None  # given to the guest too (virtio's host_mtu)


@dataclass(frozen=True)
class PcieRoot(Declared):
    """The q35 root complex. ``pcihole64_kib`` enlarges the 64-bit MMIO window that large-BAR GPUs need."""

    tag: ClassVar[str] = "controller"
    xml: ClassVar[tuple[Item, ...]] = (
        Fixed(".", (("type", "pci"), ("index", "0"), ("model", "pcie-root"))),
        Quantity("pcihole64_kib", "pcihole64", "KiB"))
    pcihole64_kib: int | None = None


DEVICE_PARSERS: dict[str, DeviceParser] = {
    "disk": Disk.from_xml, "serial": SerialConsole.from_xml, "channel": UnixChannel.from_xml, "rng": Rng.from_xml,
    "hostdev": PciHostdev.from_xml, "interface": NetInterface.from_xml,
}
