"""What a host's libvirt says it is: its capabilities XML (virConnectGetCapabilities), read once into one value.

Pure: no libvirt call here, so the same reader serves a live connection and a recorded file (tests/golden/caps/).
"""

from __future__ import annotations

from dataclasses import dataclass
from xml.etree import ElementTree as ET

from hvctl.domain.xmlmap import in_unit


@dataclass(frozen=True)
class Cell:
    """One NUMA cell of the host's topology."""

    cpus: int
    memory_mib: int


@dataclass(frozen=True)
class Capabilities:
    arch: str
    cpu_model: str
    # The domain types libvirt offers for the host's own architecture ("qemu", and "kvm" where /dev/kvm opens: which
    # does not prove a guest can run under it; hvctl.host's accelerator probe decides that).
    domain_types: frozenset[str]
    cells: tuple[Cell, ...]
    # The group QEMU runs as (the gid of the DAC driver's base label), None where the DAC driver is off or it is root.
    qemu_gid: int | None
    # The host CPU element as libvirt wrote it, for virConnectCompareCPU on another host.
    cpu_xml: str | None

    @property
    def cpus(self) -> int:
        return sum(cell.cpus for cell in self.cells)

    @property
    def memory_mib(self) -> int:
        return sum(cell.memory_mib for cell in self.cells)


def parse(xml: str) -> Capabilities:
    root = ET.fromstring(xml)
    arch = root.findtext("host/cpu/arch") or "x86_64"
    types = frozenset(d.get("type", "") for guest in root.iterfind("guest") for a in guest.iterfind("arch")
                      if a.get("name") == arch for d in a.iterfind("domain"))
    cells = []
    for cell in root.iterfind("host/topology/cells/cell"):
        cells.append(Cell(cpus=len(cell.findall("cpus/cpu")),
                          memory_mib=_mib(cell.find("memory"))))
    cpu = root.find("host/cpu")
    return Capabilities(arch=arch, cpu_model=root.findtext("host/cpu/model") or "", domain_types=types,
                        cells=tuple(cells), qemu_gid=_dac_gid(root),
                        cpu_xml=ET.tostring(cpu, encoding="unicode") if cpu is not None else None)


def _mib(memory: ET.Element | None) -> int:
    if memory is None or not (memory.text or "").strip().isdigit():
        return 0
    return in_unit((memory.text or "").strip(), memory.get("unit"), "MiB")


def _dac_gid(root: ET.Element) -> int | None:
    label = next((el.text or "" for el in root.iterfind("host/secmodel/baselabel") if el.get("type") == "qemu"), "")
    _, _, gid = label.partition(":")
    gid = gid.lstrip("+")
    return int(gid) if gid.isdigit() and int(gid) != 0 else None
