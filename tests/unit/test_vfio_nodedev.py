"""A remote host's PCI devices read from libvirt's node-device XML give GPU choice and group viability the same
answers as sysfs gives on the machine hvctl runs on.

The XML here is what libvirt 9 emits for a PCI function (the layout of `virsh nodedev-dumpxml`, as this machine's
libvirtd printed it, with the <iommuGroup> and <numa> elements libvirt's own schema tests show). The comparison
runs over the fake sysfs tree of tests/fakesysfs.py, a FAKE host: each of its devices is written out as libvirt
would describe it, and both inventories are read back by the same code.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from xml.sax.saxutils import escape

import libvirt
import pytest
from fakesysfs import (
    AUDIO,
    BMC_VGA,
    BRIDGE,
    EDU,
    GPU,
    H100,
    IDLE_GPU,
    IDLE_USB,
    NIC,
    FakeHost,
    FakeKernel,
    standard_host,
)

from hvctl.host.devices import NodeDeviceBinder
from hvctl.ops.gpus import UNKNOWN_CONSOLE, gpu_rows
from vfio import (
    Bar,
    BindError,
    DeviceInUse,
    DeviceNotFound,
    GroupNotViable,
    MemoryJournal,
    NodeDeviceInventory,
    PciDevice,
    PciSysfs,
    check_group,
    node_device_name,
    parse_pci_node_device,
    plan_devices,
)

H100_XML = """<device>
  <name>pci_0000_41_00_0</name>
  <path>/sys/devices/pci0000:40/0000:40:01.1/0000:41:00.0</path>
  <parent>pci_0000_40_01_1</parent>
  <driver>
    <name>nvidia</name>
  </driver>
  <capability type='pci'>
    <class>0x030200</class>
    <domain>0</domain>
    <bus>65</bus>
    <slot>0</slot>
    <function>0</function>
    <product id='0x2330'>GH100 [H100 SXM5 80GB]</product>
    <vendor id='0x10de'>NVIDIA Corporation</vendor>
    <iommuGroup number='23'>
      <address domain='0x0000' bus='0x41' slot='0x00' function='0x0'/>
    </iommuGroup>
    <numa node='1'/>
    <pci-express>
      <link validity='cap' port='0' speed='32' width='16'/>
      <link validity='sta' speed='32' width='16'/>
    </pci-express>
  </capability>
</device>
"""


def libvirt_xml(device: PciDevice, group: list[PciDevice]) -> str:
    """``device`` as libvirt's node-device XML describes a PCI function (no BARs, boot-VGA flag or reset methods:
    libvirt reports none of them)."""
    domain, bus, rest = device.address.split(":")
    slot, function = rest.split(".")
    driver = f"<driver><name>{escape(device.driver)}</name></driver>" if device.driver else ""
    members = "".join(f"<address domain='0x{m.address[:4]}' bus='0x{m.address[5:7]}' slot='0x{m.address[8:10]}' "
                      f"function='0x{m.address[11]}'/>" for m in group)
    iommu = f"<iommuGroup number='{device.iommu_group}'>{members}</iommuGroup>" if device.iommu_group is not None \
        else ""
    numa = f"<numa node='{device.numa_node}'/>" if device.numa_node is not None else ""
    return (f"<device><name>{node_device_name(device.address)}</name><parent>computer</parent>{driver}"
            f"<capability type='pci'><class>0x{device.class_code:06x}</class><domain>{int(domain, 16)}</domain>"
            f"<bus>{int(bus, 16)}</bus><slot>{int(slot, 16)}</slot><function>{int(function, 16)}</function>"
            f"<product id='0x{device.device:04x}'/><vendor id='0x{device.vendor:04x}'/>{iommu}{numa}"
            "</capability></device>")


def as_node_devices(sysfs: PciSysfs) -> NodeDeviceInventory:
    return NodeDeviceInventory(
        libvirt_xml(d, sysfs.group_members(d.iommu_group) if d.iommu_group is not None else [])
        for d in sysfs.devices())


def test_a_pci_function_is_read_from_libvirts_xml() -> None:
    device = parse_pci_node_device(H100_XML)
    assert device is not None
    assert (device.address, device.ids, device.class_code, device.driver) == \
        ("0000:41:00.0", "10de:2330", 0x030200, "nvidia")
    assert (device.iommu_group, device.numa_node, device.is_display) == (23, 1, True)
    assert device.bars == () and device.boot_vga is False and device.reset_method == ()  # a 3D controller
    assert node_device_name("41:00.0") == "pci_0000_41_00_0" and node_device_name("0000:41:00.1") == \
        "pci_0000_41_00_1"
    # A node device that is not a PCI function (the host itself, a USB device) is not one of the inventory's.
    assert parse_pci_node_device("<device><name>computer</name><capability type='system'/></device>") is None
    inventory = NodeDeviceInventory([H100_XML, "<device><name>computer</name><capability type='system'/></device>"])
    assert inventory.addresses() == ["0000:41:00.0"] and inventory.iommu_enabled
    with pytest.raises(DeviceNotFound):
        inventory.device("0000:99:00.0")


def test_a_driverless_device_with_no_iommu_or_numa_reads_as_such() -> None:
    xml = ("<device><name>pci_0000_00_0a_0</name><parent>computer</parent><capability type='pci'>"
           "<class>0x00ff00</class><domain>0</domain><bus>0</bus><slot>10</slot><function>0</function>"
           "<product id='0x11e8'/><vendor id='0x1234'/></capability></device>")
    inventory = NodeDeviceInventory([xml])
    edu = inventory.device("0000:00:0a.0")
    assert (edu.driver, edu.iommu_group, edu.numa_node, edu.ids) == (None, None, None, "1234:11e8")
    assert not inventory.iommu_enabled and inventory.gpus() == []
    assert [g.address for g in inventory.gpus(accelerator_allowlist=[(0x1234, 0x11E8)])] == ["0000:00:0a.0"]


def test_node_device_xml_and_sysfs_give_the_same_gpus_groups_and_viability(tmp_path: Path) -> None:
    host = standard_host(tmp_path)
    sysfs = PciSysfs(host.sys)
    remote = as_node_devices(sysfs)
    allow = [(0x1234, 0x11E8)]
    assert remote.addresses() == sysfs.addresses()
    assert [g.address for g in remote.gpus(allow)] == [g.address for g in sysfs.gpus(allow)]
    assert [d.address for d in remote.gpu(GPU).functions] == [GPU, AUDIO]
    for group in (7, 12, 50):
        assert [d.address for d in remote.group_members(group)] == [d.address for d in sysfs.group_members(group)]
    for gpu in (GPU, H100, IDLE_GPU, EDU):
        local_plan = plan_devices(sysfs, sysfs.gpu(gpu, allow))
        remote_plan = plan_devices(remote, remote.gpu(gpu, allow))
        assert [d.address for d in remote_plan] == [d.address for d in local_plan]
        group = sysfs.device(gpu).iommu_group
        assert group is not None
        here = check_group(sysfs, group, [d.address for d in local_plan])
        there = check_group(remote, group, [d.address for d in remote_plan])
        assert [b.describe() for b in there.blockers] == [b.describe() for b in here.blockers]
    assert IDLE_USB in [d.address for d in plan_devices(remote, remote.gpu(IDLE_GPU))]  # the driverless group mate
    assert BRIDGE not in [d.address for d in plan_devices(remote, remote.gpu(GPU))]

    local_rows = {r.address: r for r in gpu_rows(sysfs, allowlist=tuple(allow))}
    remote_rows = {r.address: r for r in gpu_rows(remote, allowlist=tuple(allow))}
    assert set(remote_rows) == set(local_rows)
    for address, row in remote_rows.items():
        for field in ("ids", "functions", "iommu_group", "driver", "numa_node", "owner", "health"):
            assert getattr(row, field) == getattr(local_rows[address], field), (address, field)
        if address not in (BMC_VGA, GPU, IDLE_GPU):  # VGA-compatible: below
            assert (row.passable, row.why_not) == (local_rows[address].passable, local_rows[address].why_not), \
                address
    # The H100 shares its group with a NIC the host uses: refused from either source, with the NIC named.
    assert not remote_rows[H100].passable and NIC in (remote_rows[H100].why_not or "") and \
        "e1000e" in (remote_rows[H100].why_not or "")
    # What libvirt cannot say: which VGA device draws the host's console. sysfs refuses the BMC's VGA for being it;
    # from the XML every VGA-compatible device is refused as possibly it, until the policy names its model.
    assert "boot VGA" in (local_rows[BMC_VGA].why_not or "") and local_rows[GPU].passable
    for address in (BMC_VGA, GPU, IDLE_GPU):
        assert not remote_rows[address].passable and remote_rows[address].why_not == UNKNOWN_CONSOLE
    named = {r.address: r for r in gpu_rows(remote, allowlist=(*allow, (0x10DE, 0x2684)))}
    assert named[GPU].passable and named[IDLE_GPU].passable and not named[BMC_VGA].passable
    assert remote_rows[H100].passable is False  # a 3D controller: refused for its group alone (above)
    assert remote_rows[GPU].reset_method == ()


class FakeLibvirt:
    """A STAND-IN for a remote host's libvirt connection, over the FAKE kernel of tests/fakesysfs.py: node devices
    are the fake sysfs tree written as libvirt's XML, ``detachFlags`` and ``reAttach`` make the sysfs writes
    libvirt's virPCIDeviceDetach and virPCIDeviceReattach make. It models only what hvctl's node-device binder
    relies on; the real API is exercised by the remote GPU VM test (tests/functional/test_vm_remote_gpu.py)."""

    def __init__(self, host: FakeHost) -> None:
        self.host, self.sysfs, self.kernel = host, PciSysfs(host.sys), FakeKernel(host)
        self.refuse: set[tuple[str, str]] = set()  # (address, "detach" | "reattach") answered with libvirt's error
        self.calls: list[tuple[str, str]] = []

    def listAllDevices(self, flags: int) -> list[FakeNodeDevice]:  # noqa: N802 - libvirt's name
        return [FakeNodeDevice(self, a) for a in self.sysfs.addresses()]

    def nodeDeviceLookupByName(self, name: str) -> FakeNodeDevice:  # noqa: N802
        (address,) = [a for a in self.sysfs.addresses() if node_device_name(a) == name]
        return FakeNodeDevice(self, address)


class FakeNodeDevice:
    def __init__(self, libvirt_: FakeLibvirt, address: str) -> None:
        self.libvirt, self.address = libvirt_, address

    def XMLDesc(self, flags: int) -> str:  # noqa: N802
        device = self.libvirt.sysfs.device(self.address)
        return libvirt_xml(device, self.libvirt.sysfs.group_members(device.iommu_group or -1))

    def _act(self, what: str) -> None:
        self.libvirt.calls.append((self.address, what))
        if (self.address, what) in self.libvirt.refuse:
            raise libvirt.libvirtError(f"injected: {what} of {self.address} refused")

    def detachFlags(self, driver: str, flags: int) -> int:  # noqa: N802
        self._act("detach")
        assert driver == "vfio"
        kernel, sysfs = self.libvirt.kernel, self.libvirt.sysfs
        kernel.write(sysfs.device_dir(self.address) / "driver_override", "vfio-pci")
        current = sysfs.current_driver(self.address)
        if current is not None:
            kernel.write(sysfs.drivers_dir / current / "unbind", self.address)
        kernel.write(sysfs.root / "bus/pci/drivers_probe", self.address)
        return 0

    def reAttach(self) -> int:  # noqa: N802
        self._act("reattach")
        kernel, sysfs = self.libvirt.kernel, self.libvirt.sysfs
        if sysfs.current_driver(self.address) == "vfio-pci":
            kernel.write(sysfs.drivers_dir / "vfio-pci" / "unbind", self.address)
        kernel.write(sysfs.device_dir(self.address) / "driver_override", "\n")
        kernel.write(sysfs.root / "bus/pci/drivers_probe", self.address)
        return 0


def node_binder(fake: FakeLibvirt, journal: MemoryJournal, owners: dict[str, str] | None = None) -> NodeDeviceBinder:
    return NodeDeviceBinder(fake, journal=journal, owner_of=(owners or {}).get)  # type: ignore[arg-type]


def test_the_node_device_binder_moves_a_gpu_through_libvirt_and_back(tmp_path: Path) -> None:
    fake = FakeLibvirt(standard_host(tmp_path))
    before = fake.host.snapshot()
    journal = MemoryJournal()
    binding = node_binder(fake, journal).bind([GPU, AUDIO])
    assert fake.host.driver(GPU) == fake.host.driver(AUDIO) == "vfio-pci"
    assert fake.calls == [(GPU, "detach"), (AUDIO, "detach")]
    assert journal.states(GPU) == ["original", "detaching", "bound"]
    assert [d.original_driver for d in binding.devices] == ["nvidia", "snd_hda_intel"]
    node_binder(fake, journal).release(binding)
    assert fake.host.snapshot() == before
    assert journal.states(GPU)[-2:] == ["restoring", "released"]


def test_a_refused_detach_rolls_the_others_back_through_libvirt(tmp_path: Path) -> None:
    fake = FakeLibvirt(standard_host(tmp_path))
    before = fake.host.snapshot()
    fake.refuse.add((AUDIO, "detach"))
    journal = MemoryJournal()
    with pytest.raises(BindError) as raised:
        node_binder(fake, journal).bind([GPU, AUDIO])
    assert "libvirt's detach of pci_0000_01_00_1" in str(raised.value) and "injected" in str(raised.value)
    assert fake.host.snapshot() == before
    assert fake.calls == [(GPU, "detach"), (AUDIO, "detach"), (GPU, "reattach")]
    # The refused device never left its driver: journaled as failed, then found where it started.
    assert journal.states(GPU)[-1] == "restored" and journal.states(AUDIO)[-3:] == ["failed", "restoring", "restored"]


def test_the_node_device_binder_refuses_a_group_with_a_host_driver_and_a_held_device(tmp_path: Path) -> None:
    fake = FakeLibvirt(standard_host(tmp_path))
    with pytest.raises(GroupNotViable) as raised:
        node_binder(fake, MemoryJournal()).bind([H100])
    assert NIC in str(raised.value) and "e1000e" in str(raised.value)
    with pytest.raises(DeviceInUse) as held:
        node_binder(fake, MemoryJournal(), {GPU: "other"}).bind([GPU, AUDIO])
    assert "held by VM 'other'" in str(held.value)
    assert fake.calls == []  # nothing was asked of libvirt


def test_recovery_reattaches_what_a_crash_left_on_vfio(tmp_path: Path) -> None:
    fake = FakeLibvirt(standard_host(tmp_path))
    before = fake.host.snapshot()
    journal = MemoryJournal()
    node_binder(fake, journal).bind([GPU, AUDIO])  # and the controller died before the VM was defined
    done = node_binder(fake, MemoryJournal()).recover(journal.entries)
    assert sorted(done) == [GPU, AUDIO] and fake.host.snapshot() == before


def test_a_remote_gpus_64_bit_hole_is_sized_from_the_policys_mmio64_fact(tmp_path: Path) -> None:
    from hvctl.context import Context
    from hvctl.passthrough import sized_by_policy
    from vfio import pcihole64_kib

    (tmp_path / "policy.yaml").write_text(
        "accelerators:\n  h100: {vendor: 0x10de, device: 0x2330, mmio64_gib: 128}\n"
        "tenants:\n  default: {quota: {vcpus: 1, memory_mib: 1, disk_gib: 1, vms: 1}}\n")
    ctx = Context(state_dir=tmp_path)
    try:
        h100 = parse_pci_node_device(H100_XML)
        assert h100 is not None and h100.bars == ()
        assert pcihole64_kib([h100]) is None  # no BARs known: QEMU's default hole
        sized = sized_by_policy(ctx, h100)
        # 128 GiB of BAR and 1 GiB of headroom, rounded to a power of two: 256 GiB, as sysfs's BARs would give.
        assert pcihole64_kib([sized]) == 256 * 2**20
        from fakesysfs import H100_BARS
        from_sysfs = pcihole64_kib([dataclasses.replace(h100, bars=tuple(
            Bar(b.index, 0, b.size, b.flags) for b in H100_BARS))])
        assert pcihole64_kib([sized]) == from_sysfs
        edu = NodeDeviceInventory([libvirt_xml(dataclasses.replace(h100, address="0000:00:0a.0", vendor=0x1234,
                                                                   device=0x11E8, class_code=0x00FF00), [])])
        plain = edu.device("0000:00:0a.0")
        assert sized_by_policy(ctx, plain) == plain  # a model the policy gives no fact for stays unsized
    finally:
        ctx.close()
