"""What is enforced on a running VM: through libvirt on any host (``libvirt_mismatches`` over ``Guest.live_tuning``),
and, on this machine, read from its QEMU process's cgroups (v1 or v2) as a cross-check.

libvirt turns <cputune>/<memtune> into cgroup settings on the domain's cgroup. Reading them back, rather than
trusting the XML, catches a host where a controller is not delegated or libvirt silently skipped a setting.
libvirt puts QEMU's main thread in the domain cgroup's ``emulator`` child; the domain-wide limits live one level up.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvctl.domain import Tuning
from hvctl.domain.tuning import LiveTuning, cpuset_text, parse_cpuset

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Enforced:
    version: int
    cpu_quota_us: int | None
    cpu_period_us: int | None
    cpu_weight: int | None
    memory_limit_bytes: int | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def find_qemu_pid(name: str, proc: Path = Path("/proc")) -> int | None:
    """The local QEMU process running domain ``name`` (libvirt names it with -name guest=NAME,...)."""
    needle = f"guest={name},".encode()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmdline and needle in cmdline:
            return int(entry.name)
    return None


class QemuCgroups:
    def __init__(self, pid: int, root: Path = CGROUP_ROOT) -> None:
        self.pid = pid
        self.root = root
        self.v1: dict[str, str] = {}
        self.v2: str | None = None
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _hier, controllers, path = line.split(":", 2)
            if controllers == "":
                self.v2 = path
            for controller in controllers.split(","):
                if controller:
                    self.v1[controller] = path

    @staticmethod
    def _domain_level(path: str) -> str:
        return path.rsplit("/", 1)[0] if path.endswith("/emulator") else path

    def _dir(self, controller: str) -> tuple[int, Path] | None:
        if controller in self.v1:
            mount = self.root / controller
            if not mount.exists():
                mount = next((p for p in self.root.glob(f"*{controller}*") if controller in p.name.split(",")), mount)
            return 1, mount / self._domain_level(self.v1[controller]).lstrip("/")
        if self.v2 is not None:
            base = self.root / "unified" if (self.root / "unified").is_dir() else self.root
            return 2, base / self._domain_level(self.v2).lstrip("/")
        return None

    def enforced(self) -> Enforced:
        cpu = self._dir("cpu")
        quota = period = weight = None
        version = cpu[0] if cpu else 0
        if cpu and cpu[0] == 1:
            quota_raw = int(_read(cpu[1] / "cpu.cfs_quota_us") or "-1")
            quota = None if quota_raw < 0 else quota_raw
            period = int(_read(cpu[1] / "cpu.cfs_period_us") or "0") or None
            weight = int(_read(cpu[1] / "cpu.shares") or "0") or None
        elif cpu:
            max_raw = (_read(cpu[1] / "cpu.max") or "max 100000").split()
            quota = None if max_raw[0] == "max" else int(max_raw[0])
            period = int(max_raw[1])
            weight = int(_read(cpu[1] / "cpu.weight") or "0") or None
        memory = self._dir("memory")
        limit = None
        if memory:
            raw = _read(memory[1] / ("memory.limit_in_bytes" if memory[0] == 1 else "memory.max"))
            # cgroup v1 reports "no limit" as a huge page-rounded number, v2 as "max".
            if raw and raw != "max" and int(raw) < 1 << 60:
                limit = int(raw)
        return Enforced(version, quota, period, weight, limit)

    def cpu_seconds(self) -> tuple[float, str]:
        """Total CPU time of the domain so far, and where it was read from."""
        cpu = self._dir("cpu")
        if cpu and cpu[0] == 2:
            for line in (_read(cpu[1] / "cpu.stat") or "").splitlines():
                if line.startswith("usage_usec"):
                    return int(line.split()[1]) / 1e6, "cgroup v2 cpu.stat"
        acct = self._dir("cpuacct")
        if acct and acct[0] == 1 and self.v1.get("cpuacct", "/") != "/":
            return int(_read(acct[1] / "cpuacct.usage") or "0") / 1e9, "cgroup v1 cpuacct.usage"
        # libvirt did not place QEMU in a cpuacct group (cgroup v1 with cpuacct not delegated): count the
        # process's own threads instead, which is the same thing for a domain that is a single process.
        ticks = 0
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            fields = _read(task / "stat").rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK"), "/proc/PID/task/*/stat"

    def cpu_fraction(self, window_s: float) -> tuple[float, str]:
        start, source = self.cpu_seconds()
        started = time.monotonic()
        time.sleep(window_s)
        end, _ = self.cpu_seconds()
        return (end - start) / (time.monotonic() - started), source


def libvirt_mismatches(configured: Tuning, live: LiveTuning) -> list[str]:
    """Each configured setting that the host's libvirt does not report as applied, or could not read back."""
    problems = []
    refused = dict(live.unreadable)

    def check(what: str, area: str, want: object, got: object) -> None:
        if area in refused:
            problems.append(f"{what} {want} configured; libvirt cannot read it back: {refused[area]}")
        elif got != want:
            problems.append(f"{what} {want} configured, libvirt reports {got}")

    if configured.cpu_shares is not None:
        check("CPU shares", "scheduler", configured.cpu_shares, live.cpu_shares)
    if configured.global_quota_us is not None:
        check("CPU quota", "scheduler", (configured.global_quota_us, configured.global_period_us or 100_000),
              (live.global_quota_us, live.global_period_us))
    if configured.memory_hard_limit_kib is not None:
        check("memory hard limit (KiB)", "memory", configured.memory_hard_limit_kib, live.memory_hard_limit_kib)
    if configured.blkio_weight is not None:
        check("blkio weight", "blkio", configured.blkio_weight, live.blkio_weight)
    for vcpu, cpuset in configured.vcpupin:
        got = live.vcpupin[vcpu] if vcpu < len(live.vcpupin) else None
        check(f"vCPU {vcpu} pinning", "vcpupin", cpuset_text(parse_cpuset(cpuset)),
              cpuset_text(got) if got is not None else None)
    if configured.emulatorpin is not None:
        check("emulator pinning", "emulatorpin", cpuset_text(parse_cpuset(configured.emulatorpin)),
              cpuset_text(live.emulatorpin) if live.emulatorpin is not None else None)
    if configured.numa_nodeset is not None:
        check("NUMA memory", "numa", (configured.numa_mode, cpuset_text(parse_cpuset(configured.numa_nodeset))),
              (live.numa_mode, cpuset_text(parse_cpuset(live.numa_nodeset or ""))))
    return problems


def mismatches(configured: Tuning, enforced: Enforced) -> list[str]:
    problems = []
    if configured.global_quota_us is not None:
        want = (configured.global_quota_us, configured.global_period_us or 100_000)
        got = (enforced.cpu_quota_us, enforced.cpu_period_us)
        if got != want:
            problems.append(f"CPU quota {want[0]}/{want[1]} us configured, {got[0]}/{got[1]} enforced")
    if configured.memory_hard_limit_kib is not None and enforced.memory_limit_bytes != \
            configured.memory_hard_limit_kib * 1024:
        problems.append(f"memory limit {configured.memory_hard_limit_kib * 1024} configured, "
                        f"{enforced.memory_limit_bytes} enforced")
    return problems


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
