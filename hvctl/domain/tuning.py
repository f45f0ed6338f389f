"""Resource tuning elements: <cputune>, <memtune>, <blkiotune>, <numatune>, declared once (``hvctl.domain.xmlmap``).
Values only; the designer decides them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Self
from xml.etree import ElementTree as ET

from hvctl.domain.xmlmap import INT, Item, Pairs, Quantity, Value, parse, write


@dataclass(frozen=True)
class Tuning:
    xml: ClassVar[tuple[Item, ...]] = (  # below <domain>
        Value("cpu_shares", "cputune/shares", conv=INT),
        Value("global_period_us", "cputune/global_period", conv=INT, when="global_quota_us"),
        Value("global_quota_us", "cputune/global_quota", conv=INT),
        Pairs("vcpupin", "cputune/vcpupin", "vcpu", "cpuset", key_conv=INT),
        Value("emulatorpin", "cputune/emulatorpin", "cpuset"),
        Quantity("memory_hard_limit_kib", "memtune/hard_limit", "KiB"),
        Value("blkio_weight", "blkiotune/weight", conv=INT),
        Value("numa_mode", "numatune/memory", "mode", when="numa_nodeset"),
        Value("numa_nodeset", "numatune/memory", "nodeset"))
    cpu_shares: int | None = None
    # The whole domain's CFS bandwidth (all vCPU and emulator threads together), in microseconds per period.
    global_period_us: int | None = None
    global_quota_us: int | None = None
    vcpupin: tuple[tuple[int, str], ...] = ()
    emulatorpin: str | None = None
    memory_hard_limit_kib: int | None = None
    blkio_weight: int | None = None
    numa_nodeset: str | None = None
    numa_mode: str = "strict"

    def append_to(self, root: ET.Element) -> None:
        write(root, self, self.xml)

    @classmethod
    def from_xml(cls, root: ET.Element) -> Self:
        return parse(root, cls)


@dataclass(frozen=True)
class LiveTuning:
    """What a host's libvirt reports it applied to a running domain (its scheduler, memory, blkio and NUMA
    parameters and its pinning), in the units of ``Tuning``. None: no limit. ``unreadable``: the reads libvirt
    refused, with its reason (a host without that cgroup controller, say)."""

    cpu_shares: int | None = None
    global_period_us: int | None = None
    global_quota_us: int | None = None
    memory_hard_limit_kib: int | None = None
    blkio_weight: int | None = None
    vcpupin: tuple[frozenset[int], ...] = ()
    emulatorpin: frozenset[int] | None = None
    numa_nodeset: str | None = None
    numa_mode: str | None = None
    unreadable: tuple[tuple[str, str], ...] = ()

    def as_dict(self) -> dict[str, object]:
        def cpus(found: frozenset[int] | None) -> str | None:
            return cpuset_text(found) if found is not None else None

        data = dict(self.__dict__)
        data["vcpupin"] = [cpus(p) for p in self.vcpupin]
        data["emulatorpin"] = cpus(self.emulatorpin)
        data["unreadable"] = dict(self.unreadable)
        return data


def parse_cpuset(text: str) -> frozenset[int]:
    """libvirt's cpuset syntax: "0-3,6,^2" → {0, 1, 3, 6}."""
    found: set[int] = set()
    excluded: set[int] = set()
    for part in (p.strip() for p in text.split(",") if p.strip()):
        target = excluded if part.startswith("^") else found
        first, _, last = part.lstrip("^").partition("-")
        target.update(range(int(first), int(last or first) + 1))
    return frozenset(found - excluded)


def cpuset_text(cpus: frozenset[int]) -> str:
    """The shortest cpuset for ``cpus``: {0, 1, 2, 5} → "0-2,5"."""
    ranges: list[str] = []
    for cpu in sorted(cpus):
        if ranges and int(ranges[-1].rpartition("-")[2]) == cpu - 1:
            ranges[-1] = f"{ranges[-1].partition('-')[0]}-{cpu}"
        else:
            ranges.append(str(cpu))
    return ",".join(ranges)
