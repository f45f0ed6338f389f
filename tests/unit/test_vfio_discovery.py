"""Discovery and IOMMU viability against fake sysfs trees (see tests/fakesysfs.py: no kernel involved)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakesysfs import (
    AUDIO,
    BMC_VGA,
    BRIDGE,
    EDU,
    GPU,
    H100,
    IDLE_AUDIO,
    IDLE_GPU,
    IDLE_USB,
    NIC,
    NVME,
    FakeHost,
    standard_host,
)

from vfio import (
    IOMMU_HINT,
    VFIO_PCI_HINT,
    DeviceNotFound,
    GroupNotViable,
    InvalidAddress,
    IommuUnavailable,
    NotAGpu,
    PciSysfs,
    ProcfsUsers,
    check_group,
    host_checks,
    iommu_enabled,
    normalize_address,
    plan_devices,
    require_viable,
    vfio_pci_available,
)
from vfio.sysfs import parse_resource

EDU_IDS = {(0x1234, 0x11E8)}


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return standard_host(tmp_path)


@pytest.fixture
def sysfs(host: FakeHost) -> PciSysfs:
    return PciSysfs(host.sys)


def test_device_fields_are_read_from_sysfs(sysfs: PciSysfs) -> None:
    gpu = sysfs.device(GPU)
    assert (gpu.vendor, gpu.device, gpu.class_code) == (0x10DE, 0x2684, 0x030000)
    assert gpu.driver == "nvidia" and gpu.driver_override is None
    assert gpu.iommu_group == 12 and gpu.numa_node == 0 and gpu.boot_vga is False
    assert gpu.ids == "10de:2684" and gpu.slot == "0000:01:00" and gpu.is_display
    # BAR0 32-bit, BAR1 and BAR3 64-bit prefetchable, BAR5 I/O; the ROM line is not a BAR.
    assert [(b.index, b.size) for b in gpu.bars] == [(0, 16 << 20), (1, 32 << 30), (3, 32 << 20), (5, 128)]
    bar1 = gpu.bars[1]
    assert bar1.is_memory and bar1.is_64bit and bar1.is_prefetchable
    assert not gpu.bars[0].is_64bit and not gpu.bars[0].is_prefetchable
    bar3, bar5 = gpu.bars[2], gpu.bars[3]
    assert bar3.index == 3 and bar3.is_memory and bar3.is_64bit
    assert bar5.index == 5 and not bar5.is_memory


def test_absent_boot_vga_and_unknown_numa(sysfs: PciSysfs) -> None:
    assert sysfs.device(AUDIO).boot_vga is False  # the file does not exist for audio functions
    vga = sysfs.device(BMC_VGA)
    assert vga.boot_vga is True and vga.numa_node is None
    assert sysfs.device(EDU).driver is None


def test_parse_resource_skips_empty_lines_and_rom() -> None:
    bar0 = "0x00000000fa000000 0x00000000faffffff 0x0000000000040200\n"
    empty = "0x0000000000000000 0x0000000000000000 0x0000000000000000\n"
    rom = "0x00000000fb000000 0x00000000fb07ffff 0x0000000000046200\n"
    text = bar0 + empty * 5 + rom + empty * 6
    bars = parse_resource(text)
    assert len(bars) == 1 and bars[0].size == 16 << 20 and bars[0].start == 0xFA000000


def test_gpus_lists_one_entry_per_card_with_companions(sysfs: PciSysfs) -> None:
    gpus = {g.address: g for g in sysfs.gpus()}
    assert set(gpus) == {GPU, H100, BMC_VGA, IDLE_GPU}
    assert [c.address for c in gpus[GPU].companions] == [AUDIO]
    assert gpus[GPU].companions[0].class_code == 0x040300
    assert [f.address for f in gpus[IDLE_GPU].functions] == [IDLE_GPU, IDLE_AUDIO]
    assert gpus[H100].companions == ()


def test_allowlist_turns_edu_into_an_accelerator(sysfs: PciSysfs) -> None:
    assert EDU not in {g.address for g in sysfs.gpus()}
    assert EDU in {g.address for g in sysfs.gpus(EDU_IDS)}
    assert sysfs.gpu(EDU, EDU_IDS).primary.ids == "1234:11e8"


def test_non_gpu_and_unknown_addresses_give_clear_errors(sysfs: PciSysfs) -> None:
    with pytest.raises(NotAGpu, match=r"0000:06:00.0 \(144d:a808, class 0x010802\) is not a GPU"):
        sysfs.gpu(NVME)
    with pytest.raises(DeviceNotFound, match="no PCI device 0000:0a:00.0") as err:
        sysfs.gpu("0000:0a:00.0")
    assert err.value.hint is not None and "lspci" in err.value.hint
    with pytest.raises(InvalidAddress, match="'gpu0' is not a PCI address"):
        sysfs.device("gpu0")


def test_short_addresses_are_normalised(sysfs: PciSysfs) -> None:
    assert normalize_address("01:00.0") == GPU
    assert normalize_address("0000:01:00.1") == AUDIO
    assert sysfs.device("01:00.0").address == GPU


def test_host_checks(tmp_path: Path, host: FakeHost) -> None:
    assert iommu_enabled(host.sys) and vfio_pci_available(host.sys)
    bare = FakeHost(tmp_path / "bare", iommu=False, vfio_loaded=False)
    assert not iommu_enabled(bare.sys) and not vfio_pci_available(bare.sys)
    checks = {c.name: c for c in host_checks(bare.sys)}
    assert not checks["iommu"].ok and "intel_iommu=on" in IOMMU_HINT and "amd_iommu=on" in IOMMU_HINT
    assert not checks["vfio-pci"].ok and checks["vfio-pci"].hint == VFIO_PCI_HINT
    assert "modprobe vfio-pci" in VFIO_PCI_HINT


def test_group_with_gpu_and_audio_is_viable_once_both_are_bound(sysfs: PciSysfs) -> None:
    before = check_group(sysfs, 12, [])
    assert not before.viable
    assert {b.device.address for b in before.blockers} == {GPU, AUDIO}  # the bridge is ignored
    assert check_group(sysfs, 12, [GPU]).blockers[0].device.address == AUDIO
    assert check_group(sysfs, 12, [GPU, AUDIO]).viable
    assert BRIDGE in {m.address for m in check_group(sysfs, 12, []).members}


def test_group_with_host_nic_is_not_viable_and_names_the_nic(sysfs: PciSysfs) -> None:
    devices = list(sysfs.gpu(H100).functions)
    with pytest.raises(GroupNotViable) as err:
        require_viable(sysfs, devices)
    assert str(err.value) == (
        "IOMMU group 7 is not viable: 0000:03:00.0 (8086:10d3, class 0x020000) is bound to host driver e1000e"
    )
    assert err.value.group == 7


def test_driverless_and_stub_endpoints_do_not_block(host: FakeHost, sysfs: PciSysfs) -> None:
    host.link_driver(NIC, "pci-stub")
    assert check_group(sysfs, 7, [H100]).viable
    host.link_driver(NIC, None)
    assert check_group(sysfs, 7, [H100]).viable


def test_plan_pins_driverless_group_mates_but_not_host_devices(sysfs: PciSysfs) -> None:
    idle = plan_devices(sysfs, sysfs.gpu(IDLE_GPU))
    assert [d.address for d in idle] == [IDLE_GPU, IDLE_AUDIO, IDLE_USB]
    h100 = plan_devices(sysfs, sysfs.gpu(H100))
    assert [d.address for d in h100] == [H100]
    seized = plan_devices(sysfs, sysfs.gpu(H100), extra=[NIC])
    assert [d.address for d in seized] == [H100, NIC]
    assert require_viable(sysfs, seized)[0].viable


def test_missing_iommu_group_is_reported(tmp_path: Path) -> None:
    bare = FakeHost(tmp_path, iommu=False)
    bare.add_device(GPU, vendor=0x10DE, device=0x2684, class_code=0x030000, group=1, driver="nvidia")
    sysfs = PciSysfs(bare.sys)
    with pytest.raises(IommuUnavailable, match="not in any IOMMU group") as err:
        plan_devices(sysfs, sysfs.gpu(GPU))
    assert err.value.hint == IOMMU_HINT


def test_procfs_users_maps_drm_and_nvidia_nodes_to_the_device(host: FakeHost, sysfs: PciSysfs) -> None:
    users = ProcfsUsers(sysfs, host.proc)
    assert users(sysfs.device(GPU)) == []
    host.add_process(4242, "python3", ("/dev/dri/renderD129", "/tmp/log"))
    host.add_process(77, "Xorg", ("/dev/dri/card0",))  # another card's node: not a user of GPU
    assert users(sysfs.device(GPU)) == ["pid 4242 (python3) has /dev/dri/renderD129 open"]
    host.nvidia_minor(H100, 3)
    host.add_process(900, "nvidia-smi", ("/dev/nvidiactl", "/dev/nvidia3"))
    assert users(sysfs.device(H100)) == ["pid 900 (nvidia-smi) has /dev/nvidia3 open"]
    assert users(sysfs.device(NIC)) == []
