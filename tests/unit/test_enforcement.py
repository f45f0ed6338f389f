"""Enforcement readback: libvirt's report of what it applied, compared with what the domain was configured with.
The live values come from libvirt's test driver (which reports fixed ones) and from hand-written LiveTuning; the
real readback on a running VM is checked in tests/functional/test_vm_lifecycle.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from hvctl.domain import Tuning
from hvctl.domain.tuning import LiveTuning, cpuset_text, parse_cpuset
from hvctl.enforcement import libvirt_mismatches
from hvctl.host import Host


@pytest.mark.parametrize("text,cpus,shortest", [
    ("0-3", {0, 1, 2, 3}, "0-3"), ("0-3,^2", {0, 1, 3}, "0-1,3"), ("5,1,2", {1, 2, 5}, "1-2,5"), ("", set(), ""),
    ("7", {7}, "7"),
])
def test_cpusets_parse_and_print_shortest(text: str, cpus: set[int], shortest: str) -> None:
    assert parse_cpuset(text) == cpus and cpuset_text(frozenset(cpus)) == shortest


def test_what_libvirt_reports_applied_matches_or_is_named() -> None:
    configured = Tuning(cpu_shares=512, global_period_us=100_000, global_quota_us=50_000,
                        vcpupin=((0, "2"), (1, "3")), emulatorpin="0-1", memory_hard_limit_kib=300_000,
                        blkio_weight=200, numa_nodeset="0")
    applied = LiveTuning(cpu_shares=512, global_period_us=100_000, global_quota_us=50_000,
                         memory_hard_limit_kib=300_000, blkio_weight=200,
                         vcpupin=(frozenset({2}), frozenset({3})), emulatorpin=frozenset({0, 1}), numa_nodeset="0",
                         numa_mode="strict")
    assert libvirt_mismatches(configured, applied) == []
    assert libvirt_mismatches(Tuning(), LiveTuning()) == []  # nothing configured, nothing to hold it to

    drifted = LiveTuning(cpu_shares=512, global_period_us=100_000, global_quota_us=None, memory_hard_limit_kib=None,
                         blkio_weight=200, vcpupin=(frozenset({2}), frozenset({0, 1, 2, 3})),
                         emulatorpin=frozenset({0, 1}), numa_nodeset="0", numa_mode="strict")
    problems = libvirt_mismatches(configured, drifted)
    assert problems == ["CPU quota (50000, 100000) configured, libvirt reports (None, 100000)",
                        "memory hard limit (KiB) 300000 configured, libvirt reports None",
                        "vCPU 1 pinning 3 configured, libvirt reports 0-3"]


def test_a_read_libvirt_refuses_is_a_mismatch_with_its_reason() -> None:
    refused = LiveTuning(unreadable=(("scheduler", "cgroup CPU controller is not mounted"),))
    assert libvirt_mismatches(Tuning(global_quota_us=50_000), refused) == [
        "CPU quota (50000, 100000) configured; libvirt cannot read it back: cgroup CPU controller is not mounted"]
    assert libvirt_mismatches(Tuning(), refused) == []


def test_live_tuning_reads_every_parameter_set_through_libvirt(tmp_path: Path) -> None:
    host = Host("test:///default")
    try:
        live = host.guest("test").live_tuning()  # the test driver's running domain
    finally:
        host.close()
    # The test driver reports no limits (libvirt's "unlimited") and pins both vCPUs and the emulator to every host
    # CPU; its scheduler has only a "weight", so no CFS values.
    assert live.unreadable == ()
    assert live.memory_hard_limit_kib is None and live.global_quota_us is None
    assert len(live.vcpupin) == 2 and live.vcpupin[0] == live.emulatorpin and len(live.vcpupin[0]) >= 2
    assert live.numa_mode == "strict" and live.numa_nodeset is None
    assert live.as_dict()["emulatorpin"] == cpuset_text(live.vcpupin[0])
