"""Resource tuning elements: <cputune>, <memtune>, <blkiotune>, <numatune>. Values only; the designer decides them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Self
from xml.etree import ElementTree as ET

from hvctl.domain.devices import sub


@dataclass(frozen=True)
class Tuning:
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
        if self.cpu_shares or self.global_quota_us or self.vcpupin or self.emulatorpin:
            cputune = sub(root, "cputune")
            if self.cpu_shares:
                sub(cputune, "shares", str(self.cpu_shares))
            if self.global_quota_us:
                sub(cputune, "global_period", str(self.global_period_us or 100_000))
                sub(cputune, "global_quota", str(self.global_quota_us))
            for vcpu, cpuset in self.vcpupin:
                sub(cputune, "vcpupin", vcpu=str(vcpu), cpuset=cpuset)
            if self.emulatorpin:
                sub(cputune, "emulatorpin", cpuset=self.emulatorpin)
        if self.memory_hard_limit_kib:
            sub(sub(root, "memtune"), "hard_limit", str(self.memory_hard_limit_kib), unit="KiB")
        if self.blkio_weight:
            sub(sub(root, "blkiotune"), "weight", str(self.blkio_weight))
        if self.numa_nodeset:
            sub(sub(root, "numatune"), "memory", mode=self.numa_mode, nodeset=self.numa_nodeset)

    @classmethod
    def from_xml(cls, root: ET.Element) -> Self:
        def num(path: str) -> int | None:
            text = root.findtext(path)
            return int(text) if text else None

        hard = root.find("memtune/hard_limit")
        hard_kib = None
        if hard is not None and hard.text:
            scale = {"KiB": 1, "k": 1, "MiB": 1024, "M": 1024, "GiB": 1024**2, "G": 1024**2}
            hard_kib = int(hard.text) * scale.get(hard.get("unit", "KiB"), 1)
        numa = root.find("numatune/memory")
        return cls(
            cpu_shares=num("cputune/shares"),
            global_period_us=num("cputune/global_period"),
            global_quota_us=num("cputune/global_quota"),
            vcpupin=tuple((int(p.get("vcpu", "0")), p.get("cpuset", "")) for p in root.iterfind("cputune/vcpupin")),
            emulatorpin=(root.find("cputune/emulatorpin").get("cpuset")  # type: ignore[union-attr]
                         if root.find("cputune/emulatorpin") is not None else None),
            memory_hard_limit_kib=hard_kib,
            blkio_weight=num("blkiotune/weight"),
            numa_nodeset=numa.get("nodeset") if numa is not None else None,
            numa_mode=numa.get("mode", "strict") if numa is not None else "strict",
        )


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
