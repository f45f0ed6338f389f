"""The bind/rollback/release/recover state machine, driven against FakeKernel (tests/fakesysfs.py).

FakeKernel simulates the kernel's reaction to sysfs writes; these tests check the binder's decisions and
the state it leaves behind, not any real kernel's behaviour.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fakesysfs import (
    AUDIO,
    BMC_VGA,
    GPU,
    H100,
    IDLE_AUDIO,
    IDLE_GPU,
    IDLE_USB,
    NIC,
    FakeHost,
    FakeKernel,
    SimulatedCrash,
    standard_host,
)

from vfio import (
    BindError,
    DeviceInUse,
    GroupNotViable,
    KernelWriter,
    MemoryJournal,
    PciDevice,
    PciSysfs,
    ProcfsUsers,
    ReleaseError,
    VfioBinder,
    plan_devices,
)


class Rig:
    """One fake host with its kernel, journal and a binder wired to all three."""

    def __init__(self, base: Path) -> None:
        self.host = standard_host(base)
        self.sysfs = PciSysfs(self.host.sys)
        self.kernel = FakeKernel(self.host)
        self.journal = MemoryJournal()
        self.owners: dict[str, str] = {}
        self.binder = self.make_binder()

    def make_binder(self) -> VfioBinder:
        return VfioBinder(
            self.sysfs,
            writer=self.kernel,
            journal=self.journal,
            users_of=ProcfsUsers(self.sysfs, self.host.proc),
            owner_of=self.owners.get,
            dev_root=self.host.dev,
            bind_timeout=0.05,
            poll_interval=0.01,
        )

    def plan(self, address: str) -> list[PciDevice]:
        return plan_devices(self.sysfs, self.sysfs.gpu(address))


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def test_bind_moves_gpu_and_audio_then_release_returns_them(rig: Rig) -> None:
    binding = rig.binder.bind(rig.plan(GPU))
    assert binding.addresses == (GPU, AUDIO) and binding.groups == (12,)
    assert rig.host.driver(GPU) == rig.host.driver(AUDIO) == "vfio-pci"
    assert rig.host.override(GPU) == "vfio-pci"
    assert (rig.host.dev / "vfio" / "12").exists()
    assert [d.original_driver for d in binding.devices] == ["nvidia", "snd_hda_intel"]
    assert rig.journal.states(GPU) == ["original", "override-set", "unbound", "probing", "bound"]
    # The order of writes is the one the kernel needs: override first, so the probe picks vfio-pci.
    assert [op for addr, op, _ in rig.kernel.writes if addr == GPU] == [
        "driver_override",
        "unbind",
        "drivers_probe",
    ]

    rig.binder.release(binding)
    assert rig.host.driver(GPU) == "nvidia" and rig.host.driver(AUDIO) == "snd_hda_intel"
    assert rig.host.override(GPU) == rig.host.override(AUDIO) == "(null)"
    assert not (rig.host.dev / "vfio" / "12").exists()
    assert rig.journal.states(GPU)[-2:] == ["restoring", "released"]


def test_release_leaves_originally_driverless_devices_unbound(rig: Rig) -> None:
    before = rig.host.snapshot()
    binding = rig.binder.bind(rig.plan(IDLE_GPU))
    assert binding.addresses == (IDLE_GPU, IDLE_AUDIO, IDLE_USB)
    assert {rig.host.driver(a) for a in binding.addresses} == {"vfio-pci"}
    assert not any(op == "unbind" for _, op, _ in rig.kernel.writes)  # nothing to unbind from
    rig.binder.release(binding)
    assert rig.host.snapshot() == before
    assert rig.host.driver(IDLE_GPU) is None


def test_device_already_on_vfio_is_left_alone(rig: Rig) -> None:
    rig.host.link_driver(IDLE_GPU, "vfio-pci")
    (rig.host.dev / "vfio" / "50").touch()
    binding = rig.binder.bind([IDLE_GPU])
    assert not any(addr == IDLE_GPU for addr, _, _ in rig.kernel.writes)
    rig.binder.release(binding)
    assert rig.host.driver(IDLE_GPU) == "vfio-pci"
    assert not any(addr == IDLE_GPU for addr, _, _ in rig.kernel.writes)


def test_group_with_host_nic_is_refused_before_any_write(rig: Rig) -> None:
    with pytest.raises(GroupNotViable, match=r"0000:03:00.0 \(8086:10d3, class 0x020000\) .* e1000e"):
        rig.binder.bind(rig.plan(H100))
    assert rig.kernel.writes == [] and rig.journal.entries == []


def test_boot_vga_is_refused(rig: Rig) -> None:
    with pytest.raises(DeviceInUse, match="0000:04:00.0 cannot be passed through: it is the boot VGA"):
        rig.binder.bind(rig.plan(BMC_VGA))
    assert rig.kernel.writes == []


def test_device_with_open_handles_is_refused(rig: Rig) -> None:
    rig.host.add_process(4242, "python3", ("/dev/dri/renderD129",))
    with pytest.raises(DeviceInUse) as err:
        rig.binder.bind(rig.plan(GPU))
    assert err.value.address == GPU
    assert "pid 4242 (python3) has /dev/dri/renderD129 open" in str(err.value)
    assert rig.kernel.writes == [] and rig.host.driver(GPU) == "nvidia"


def test_device_owned_by_another_vm_is_refused(rig: Rig) -> None:
    rig.owners[AUDIO] = "trainer-3"
    with pytest.raises(
        DeviceInUse, match="0000:01:00.1 cannot be passed through: it is held by VM 'trainer-3'"
    ):
        rig.binder.bind(rig.plan(GPU))
    assert rig.kernel.writes == []


def test_failure_halfway_rolls_everything_back(rig: Rig) -> None:
    before = rig.host.snapshot()
    rig.kernel.fail.add((AUDIO, "unbind"))
    with pytest.raises(BindError) as err:
        rig.binder.bind(rig.plan(GPU))
    assert (err.value.address, err.value.step) == (AUDIO, "unbind")
    assert err.value.rollback_failures == ()
    assert "binding 0000:01:00.1 to vfio-pci failed at step 'unbind'" in str(err.value)
    # The GPU had reached vfio-pci and the audio function had its override set; both are undone.
    assert rig.host.snapshot() == before
    assert not (rig.host.dev / "vfio" / "12").exists()
    assert rig.journal.states(GPU)[-1] == "restored" and rig.journal.states(AUDIO)[-1] == "restored"
    assert "failed" in rig.journal.states(AUDIO)


def test_probe_that_never_binds_times_out_and_rolls_back(rig: Rig) -> None:
    before = rig.host.snapshot()
    rig.kernel.ignore_probe.add(AUDIO)
    with pytest.raises(BindError, match="still on no driver .* not vfio-pci") as err:
        rig.binder.bind(rig.plan(GPU))
    assert err.value.step == "verify"
    assert rig.host.snapshot() == before


def test_missing_vfio_group_node_rolls_back(rig: Rig) -> None:
    before = rig.host.snapshot()
    rig.kernel.make_devnodes = False
    with pytest.raises(BindError, match="vfio/12 did not appear") as err:
        rig.binder.bind(rig.plan(GPU))
    assert err.value.step == "devnode"
    assert rig.host.snapshot() == before


def test_failed_rollback_is_reported_by_device(rig: Rig) -> None:
    rig.kernel.fail |= {(AUDIO, "unbind"), (GPU, "bind")}
    with pytest.raises(BindError) as err:
        rig.binder.bind(rig.plan(GPU))
    assert len(err.value.rollback_failures) == 1 and err.value.rollback_failures[0].startswith(GPU)
    assert "rollback also failed for: 0000:01:00.0" in str(err.value)
    assert err.value.hint is not None and "by hand" in err.value.hint
    assert rig.journal.states(GPU)[-1] == "restore-failed"


def test_release_reports_devices_the_host_driver_refused(rig: Rig) -> None:
    binding = rig.binder.bind(rig.plan(GPU))
    rig.kernel.fail.add((AUDIO, "bind"))
    with pytest.raises(ReleaseError, match="0000:01:00.1") as err:
        rig.binder.release(binding)
    assert len(err.value.failures) == 1
    # The other device was still given back: one failure does not strand the rest.
    assert rig.host.driver(GPU) == "nvidia"


def test_recover_after_crash_mid_bind(rig: Rig) -> None:
    before = rig.host.snapshot()
    rig.kernel.crash.add((AUDIO, "drivers_probe"))
    with pytest.raises(SimulatedCrash):
        rig.binder.bind(rig.plan(GPU))
    # The process "died" with the GPU on vfio-pci and the audio function unbound with an override.
    assert rig.host.driver(GPU) == "vfio-pci" and rig.host.driver(AUDIO) is None
    assert rig.journal.states(AUDIO)[-1] == "probing"
    rig.kernel.crash.clear()

    fresh = rig.make_binder()  # a new hvctl process, reading the persisted journal
    recovered = fresh.recover(list(rig.journal.entries))
    assert sorted(recovered) == [GPU, AUDIO]
    assert rig.host.snapshot() == before
    # Finished entries need no second pass.
    assert fresh.recover(list(rig.journal.entries)) == []


def test_recover_skips_devices_never_touched(rig: Rig) -> None:
    rig.kernel.crash.add((GPU, "driver_override"))
    with pytest.raises(SimulatedCrash):
        rig.binder.bind(rig.plan(GPU))
    assert rig.journal.states(AUDIO) == ["original"]
    assert rig.binder.recover(rig.journal.entries) == [GPU]
    assert rig.host.driver(AUDIO) == "snd_hda_intel" and rig.host.override(GPU) == "(null)"


def test_kernel_writer_writes_the_attribute(tmp_path: Path) -> None:
    target = tmp_path / "driver_override"
    target.write_text("(null)\n")
    KernelWriter().write(target, "vfio-pci")
    assert target.read_text() == "vfio-pci"


def test_binder_refuses_a_nic_bound_group_even_when_asked_for_the_gpu_only(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    host.add_device(H100, vendor=0x10DE, device=0x2330, class_code=0x030200, group=7, driver="nvidia")
    host.add_device(NIC, vendor=0x8086, device=0x10D3, class_code=0x020000, group=7, driver="e1000e")
    binder = VfioBinder(PciSysfs(host.sys), writer=FakeKernel(host), users_of=lambda d: [], dev_root=host.dev)
    with pytest.raises(GroupNotViable, match="IOMMU group 7 is not viable"):
        binder.bind([H100])
    assert host.driver(H100) == "nvidia"
