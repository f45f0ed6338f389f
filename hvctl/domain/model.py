"""The libvirt domain as typed objects. ``Domain.to_xml()`` and ``Domain.from_xml()`` are inverses; no policy here.

XML is built with ElementTree, never from string templates, so no value can change the document's structure.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any, ClassVar, Self
from xml.etree import ElementTree as ET

from hvctl.domain.devices import DEVICE_PARSERS, TENANT_FILTER, Device, PcieRoot, req, sub, tenant_server
from hvctl.domain.tuning import Tuning
from hvctl.domain.xmlmap import INT, Custom, Fixed, Flag, Item, Nested, Quantity, Value, emit, enum_of, parse

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
HVCTL_NS = "https://hvctl.dev/xmlns/vm/1"
ET.register_namespace("qemu", QEMU_NS)
ET.register_namespace("hvctl", HVCTL_NS)


class Accel(enum.StrEnum):
    KVM = "kvm"
    # libvirt calls TCG, QEMU's software emulation, domain type "qemu".
    TCG = "qemu"


class CpuMode(enum.StrEnum):
    HOST_PASSTHROUGH = "host-passthrough"
    MAXIMUM = "maximum"


@dataclass(frozen=True)
class DirectBoot:
    kernel: Path
    initrd: Path
    cmdline: str


@dataclass(frozen=True)
class FirmwareBoot:
    """Boot through the firmware and the disk's own bootloader, as a stock cloud image does: SeaBIOS ("bios"), or
    OVMF ("efi", chosen by libvirt from the firmware descriptors Debian's ``ovmf`` installs, without Secure Boot)."""

    firmware: str = "bios"


@dataclass(frozen=True)
class UserNetwork:
    """QEMU user-mode networking with an SSH forward, through <qemu:commandline>.

    This libvirt rejects <interface type='user'> with the passt backend, and the built-in slirp interface cannot
    forward host ports, so the NIC is passed to QEMU directly. It gets an explicit PCI slot on pcie.0; without one
    it collides with the pcie-root-ports libvirt adds. ``restrict`` cuts the guest off from the host and from every
    other VM's forwarded port; inbound forwards still work.
    """

    ssh_port: int
    bind_address: str
    restrict: bool
    pci_slot: int

    def qemu_args(self) -> list[str]:
        netdev = f"user,id=hvctl-net0,hostfwd=tcp:{self.bind_address}:{self.ssh_port}-:22"
        if self.restrict:
            netdev += ",restrict=on"
        device = f"virtio-net-pci,netdev=hvctl-net0,bus=pcie.0,addr=0x{self.pci_slot:x}"
        return ["-netdev", netdev, "-device", device]

    @classmethod
    def from_args(cls, args: list[str]) -> Self | None:
        for i, arg in enumerate(args[:-1]):
            if arg == "-netdev" and args[i + 1].startswith("user,id=hvctl-net0,"):
                opts = dict(o.split("=", 1) for o in args[i + 1].split(",")[1:])
                _proto, addr, ports = opts["hostfwd"].split(":", 2)
                device = next(a for a in args if a.startswith("virtio-net-pci,netdev=hvctl-net0"))
                slot = int(device.rsplit("addr=", 1)[1], 16)
                return cls(ssh_port=int(ports.split("-")[0]), bind_address=addr,
                           restrict=opts.get("restrict") == "on", pci_slot=slot)
        return None


def _extra_args(args: list[str]) -> tuple[str, ...]:
    """QEMU arguments other than the user network's four (-netdev X -device Y)."""
    rest: list[str] = []
    skip = 0
    for i, arg in enumerate(args):
        if skip:
            skip -= 1
            continue
        if arg in ("-netdev", "-device") and i + 1 < len(args) and "hvctl-net0" in args[i + 1]:
            skip = 1
            continue
        rest.append(arg)
    return tuple(rest)


def retarget_ssh_forward(xml: str, port: int) -> str:
    """The same domain XML with its user-mode network's SSH forward moved to ``port``.

    A migration's destination XML must be libvirt's own migratable XML, unchanged but for what differs per host
    (libvirt checks the rest for ABI stability), so this edits that document instead of regenerating it.
    """
    root = ET.fromstring(xml)
    for arg in root.iterfind(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg"):
        value = arg.get("value", "")
        if value.startswith("user,id=hvctl-net0,"):
            opts = value.split(",")
            for i, opt in enumerate(opts):
                if opt.startswith("hostfwd="):
                    proto, addr, rest = opt.split(":", 2)
                    opts[i] = f"{proto}:{addr}:{port}-{rest.split('-', 1)[1]}"
            arg.set("value", ",".join(opts))
    return ET.tostring(root, encoding="unicode")


def retarget_tenant_filter(xml: str) -> str:
    """The same domain XML with every NIC that names an earlier version of hvctl's tenant filter moved to today's
    (``TENANT_FILTER``), given the parameter it adds: the network's own address on the host (GW). ``xml`` itself
    when none does.

    The first version (``hvctl-tenant-v1``, from before tenant networks served DHCP) lets a VM send anything to its
    own subnet, and the host's address on the segment is in that subnet: such a VM on a network that has DHCP now
    reaches the host's own stack. A stopped VM is redefined with this before it starts, and a migration's
    destination XML goes through it (a filter is no part of the guest's ABI).
    """
    root = ET.fromstring(xml)
    changed = False
    for ref in root.iterfind("devices/interface/filterref"):
        name = ref.get("filter", "")
        if not name.startswith("hvctl-tenant-v") or name == TENANT_FILTER:
            continue
        params = {p.get("name"): p.get("value") for p in ref.iterfind("parameter")}
        subnet = IPv4Network(f"{params.get('NET')}/{params.get('MASK')}")
        ref.set("filter", TENANT_FILTER)
        if "GW" not in params:
            gw = ET.Element("parameter", name="GW", value=str(tenant_server(subnet)))
            ref.insert(0, gw)
        changed = True
    return ET.tostring(root, encoding="unicode") if changed else xml


def retarget_paths(xml: str, moves: dict[str, str]) -> str:
    """The same domain XML with every host path in ``moves`` (disk and cdrom sources and their backing chains, the
    console log, the agent channel's socket, the kernel and initrd) replaced: a migration that copies storage puts
    the VM's files somewhere new, on another host maybe. Only values equal to a whole old path change, never a
    substring."""
    root = ET.fromstring(xml)
    devices = root.find("devices")
    for el in (*devices.iter("source"), *devices.iter("log")) if devices is not None else ():
        for attr in ("file", "path"):
            value = el.get(attr)
            if value in moves:
                el.set(attr, moves[value])
    for el in root.iterfind("os/*"):
        if el.tag in ("kernel", "initrd") and el.text in moves:
            el.text = moves[el.text]
    return ET.tostring(root, encoding="unicode")


@dataclass(frozen=True)
class Viommu:
    """A virtual Intel IOMMU among the devices, with its driver's options (the designer chooses them)."""

    tag: ClassVar[str] = "iommu"
    xml: ClassVar[tuple[Item, ...]] = (
        Fixed(".", (("model", "intel"),)), Value("intremap", "driver", "intremap"),
        Value("caching_mode", "driver", "caching_mode"))
    intremap: str
    caching_mode: str


def _write_metadata(root: ET.Element, d: Domain) -> None:
    if d.metadata:
        vm = sub(sub(root, "metadata"), f"{{{HVCTL_NS}}}vm")
        for key, value in d.metadata:
            sub(vm, f"{{{HVCTL_NS}}}{key}", value)


def _read_metadata(root: ET.Element) -> dict[str, Any]:
    meta = root.find(f"metadata/{{{HVCTL_NS}}}vm")
    return {"metadata": tuple((child.tag.split("}")[1], child.text or "") for child in
                              (meta if meta is not None else []))}


def _write_os(root: ET.Element, d: Domain) -> None:
    os_el = sub(root, "os")
    if isinstance(d.boot, FirmwareBoot) and d.boot.firmware == "efi":
        os_el.set("firmware", "efi")
    sub(os_el, "type", "hvm", arch=d.arch, machine=d.machine)
    if isinstance(d.boot, DirectBoot):
        sub(os_el, "kernel", str(d.boot.kernel))
        sub(os_el, "initrd", str(d.boot.initrd))
        sub(os_el, "cmdline", d.boot.cmdline)
    else:
        if d.boot.firmware == "efi":
            sub(sub(os_el, "firmware"), "feature", enabled="no", name="secure-boot")
        sub(os_el, "boot", dev="hd")


def _read_os(root: ET.Element) -> dict[str, Any]:
    os_el = root.find("os")
    boot: DirectBoot | FirmwareBoot = (
        DirectBoot(Path(req(root, "os/kernel")), Path(req(root, "os/initrd")), req(root, "os/cmdline"))
        if root.find("os/kernel") is not None
        else FirmwareBoot("efi" if os_el is not None and os_el.get("firmware") == "efi" else "bios"))
    return {"boot": boot, "machine": req(root, "os/type", "machine"), "arch": req(root, "os/type", "arch")}


def _write_devices(root: ET.Element, d: Domain) -> None:
    devices = sub(root, "devices")
    devices.append(d.root_controller.to_xml())
    for device in d.devices:
        devices.append(device.to_xml())
    if d.viommu is not None:
        devices.append(emit(Viommu.tag, d.viommu))


def _read_devices(root: ET.Element) -> dict[str, Any]:
    devices: list[Device] = []
    root_controller = PcieRoot()
    for el in root.find("devices") or []:
        if el.tag == "controller" and el.get("model") == "pcie-root":
            root_controller = PcieRoot.from_xml(el)
        elif el.tag in DEVICE_PARSERS and not (el.tag == "serial" and el.get("type") not in ("file", "pty")):
            devices.append(DEVICE_PARSERS[el.tag](el))
    iommu = root.find("devices/iommu[@model='intel']")
    return {"devices": tuple(devices), "root_controller": root_controller,
            "viommu": parse(iommu, Viommu) if iommu is not None else None}


def _write_qemu_args(root: ET.Element, d: Domain) -> None:
    args = [*(d.network.qemu_args() if d.network else []), *d.extra_qemu_args]
    if args:
        cmdline = sub(root, f"{{{QEMU_NS}}}commandline")
        for arg in args:
            sub(cmdline, f"{{{QEMU_NS}}}arg", value=arg)


def _read_qemu_args(root: ET.Element) -> dict[str, Any]:
    args = [a.get("value", "") for a in root.iterfind(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg")]
    return {"network": UserNetwork.from_args(args), "extra_qemu_args": _extra_args(args)}


@dataclass(frozen=True)
class Domain:
    """A libvirt domain, as values: what each is, the designer decides (the defaults are libvirt's own)."""

    xml: ClassVar[tuple[Item, ...]] = (
        Value("accel", ".", "type", enum_of(Accel)), Value("name", "name"), Value("uuid", "uuid"),
        Custom(("metadata",), _write_metadata, _read_metadata),
        Quantity("memory_mib", "memory", "MiB"), Value("vcpus", "vcpu", conv=INT), Nested("tuning", ".", Tuning),
        Custom(("boot", "machine", "arch"), _write_os, _read_os),
        Flag("acpi", "features/acpi"), Value("cpu_mode", "cpu", "mode", enum_of(CpuMode)),
        Value("on_poweroff", "on_poweroff"), Value("on_reboot", "on_reboot"), Value("on_crash", "on_crash"),
        Custom(("root_controller", "devices", "viommu"), _write_devices, _read_devices),
        Custom(("network", "extra_qemu_args"), _write_qemu_args, _read_qemu_args))
    name: str
    accel: Accel
    memory_mib: int
    vcpus: int
    boot: DirectBoot | FirmwareBoot
    machine: str = "q35"
    arch: str = "x86_64"
    cpu_mode: CpuMode = CpuMode.MAXIMUM
    uuid: str | None = None
    devices: tuple[Device, ...] = ()
    root_controller: PcieRoot = field(default_factory=PcieRoot)
    network: UserNetwork | None = None
    metadata: tuple[tuple[str, str], ...] = ()
    tuning: Tuning = field(default_factory=Tuning)
    acpi: bool = False
    on_poweroff: str = "destroy"
    on_reboot: str = "restart"
    on_crash: str = "destroy"
    # A virtual Intel IOMMU, so the guest can itself use VFIO (nested passthrough, or testing vfio/ on a real kernel).
    viommu: Viommu | None = None
    # Further QEMU arguments after the network's, for emulated devices libvirt has no element for (QEMU's edu).
    extra_qemu_args: tuple[str, ...] = ()

    def to_xml(self) -> str:
        root = emit("domain", self)
        ET.indent(root)
        return ET.tostring(root, encoding="unicode") + "\n"

    @classmethod
    def from_xml(cls, xml: str) -> Self:
        return parse(ET.fromstring(xml), cls)
