"""Domain XML: golden files, parse-back, and define/undefine on libvirt's real test driver."""

from __future__ import annotations

from pathlib import Path

import pytest

from hvctl.designer import BootArtifacts, HostCapabilities, VMAllocation, design
from hvctl.domain import Accel, CpuMode, Domain, FirmwareBoot, PciAddress, PciHostdev
from hvctl.errors import NotFound
from hvctl.host import DomainState, Host, capabilities
from hvctl.spec import VMSpec

GOLDEN = Path(__file__).parents[1] / "golden"
# libvirt's capabilities as recorded on this project's build machine (libvirt 9.0.0, QEMU 7.2): by a daemon that
# does not see /dev/kvm, and by one that does (libvirt then offers "kvm"; hvctl's boot probe finds it unusable there).
TCG_ONLY = capabilities.parse((GOLDEN / "caps" / "tcg-only.xml").read_text())
KVM_OFFERED = capabilities.parse((GOLDEN / "caps" / "kvm-offered.xml").read_text())
TCG_HOST = HostCapabilities.of("local", TCG_ONLY)
KVM_HOST = HostCapabilities.of("local", KVM_OFFERED)
BOOT = BootArtifacts(Path("/var/lib/hvctl/images/minimal@0123/vmlinuz"),
                     Path("/var/lib/hvctl/images/minimal@0123/initrd.img"))


def alloc(name: str, **extra: object) -> VMAllocation:
    vm = Path("/var/lib/hvctl/vms") / name
    return VMAllocation(vm / "disk.qcow2", vm / "console.log", vm / "agent.sock", 22200, **extra)  # type: ignore[arg-type]


CASES = {
    "tcg-minimal": (VMSpec(name="tiny"), TCG_HOST, BOOT, alloc("tiny")),
    "kvm-4cpu-disk-root": (
        VMSpec(name="big-1", tenant="acme", vcpus=4, memory_mib=8192, disk_gib=20, image="base"),
        KVM_HOST,
        BootArtifacts(BOOT.kernel, BOOT.initrd, root_on_disk=True),
        alloc("big-1"),
    ),
    "kvm-tuned": (
        VMSpec(name="tuned", vcpus=2, memory_mib=2048, cpu_limit=1.5, pin_cpus=(2, 3), io_weight=300, numa_node=0),
        KVM_HOST, BOOT, alloc("tuned"),
    ),
    "tcg-viommu-edu": (
        VMSpec(name="l1", viommu=True), TCG_HOST, BOOT, alloc("l1"),
    ),
    "tcg-bridge-nic": (
        VMSpec(name="web", network={"bridge": "br-prod", "address": "198.18.77.10/24", "gateway": "198.18.77.1"}),
        TCG_HOST, BOOT, alloc("web"),
    ),
    "tcg-libvirt-network-nic": (
        VMSpec(name="natted", network={"network": "default"}), TCG_HOST, BOOT,
        alloc("natted"),
    ),
    "tcg-tenant-network-nic": (
        VMSpec(name="a1", tenant="acme", network={"network": "hvctl-net-blue", "tenant_network": "blue",
                                                  "address": "10.96.10.2/24"}),
        TCG_HOST, BOOT, alloc("a1"),
    ),
    "tcg-gpu-hostdev": (
        VMSpec(name="gpu-vm", gpus={"count": 1, "model": "H100"}),
        TCG_HOST, BOOT,
        alloc("gpu-vm", hostdevs=(PciHostdev(PciAddress.parse("0000:41:00.0")),
                                  PciHostdev(PciAddress.parse("0000:41:00.1"))), pcihole64_kib=256 * 1024 * 1024),
    ),
    "tcg-cloud-bios": (
        VMSpec(name="stock", image="debian-cloud", disk_gib=4),
        TCG_HOST, BootArtifacts(BOOT.kernel, BOOT.initrd, True, firmware="bios"),
        alloc("stock", seed=Path("/var/lib/hvctl/vms/stock/seed.iso")),
    ),
    "kvm-cloud-uefi-gpu": (
        VMSpec(name="stock-gpu", image="debian-cloud", disk_gib=40, gpus={"count": 1}),
        KVM_HOST, BootArtifacts(BOOT.kernel, BOOT.initrd, True, firmware="efi"),
        alloc("stock-gpu", hostdevs=(PciHostdev(PciAddress.parse("0000:41:00.0")),), pcihole64_kib=96 * 2**20),
    ),
}


@pytest.fixture(scope="module")
def test_host(tmp_path_factory: pytest.TempPathFactory) -> Host:
    # A private driver file, so the test driver starts from a known empty host rather than its default "test" VM.
    driver = tmp_path_factory.mktemp("drv") / "driver.xml"
    driver.write_text("<node><cpu><nodes>1</nodes><sockets>1</sockets><cores>4</cores><threads>1</threads></cpu>"
                      "<memory>16777216</memory></node>")
    return Host(f"test://{driver}")


EXTRA_ARGS = {"tcg-viommu-edu": ("-device", "edu,bus=pcie.0,addr=0xa")}


def designed(case: str) -> Domain:
    return design(*CASES[case], extra_qemu_args=EXTRA_ARGS.get(case, ()))


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_xml(case: str, update_golden: bool) -> None:
    xml = designed(case).to_xml()
    golden = GOLDEN / f"{case}.xml"
    if update_golden:
        golden.write_text(xml)
    assert golden.exists(), f"no golden file {golden.name}; run pytest --update-golden"
    assert xml == golden.read_text(), f"{case} XML changed; if intended, rerun with --update-golden and review"


@pytest.mark.parametrize("case", sorted(CASES))
def test_xml_parses_back_to_the_same_domain(case: str) -> None:
    domain = designed(case)
    assert Domain.from_xml(domain.to_xml()) == domain


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_generated_domain_defines_on_the_test_driver(case: str, test_host: Host) -> None:
    domain = designed(case)
    guest = test_host.define(domain.to_xml())
    try:
        assert test_host.state(domain.name) is DomainState.SHUTOFF
        back = Domain.from_xml(guest.xml())
        # libvirt adds a uuid and the test driver drops <qemu:commandline> (a QEMU-driver namespace); every other
        # field must survive libvirt's own parser and formatter unchanged.
        # libvirt formats devices grouped by kind, so compare them independent of order.
        assert sorted(map(repr, back.devices)) == sorted(map(repr, domain.devices))
        assert (back.name, back.accel, back.memory_mib, back.vcpus, back.boot, back.cpu_mode, back.metadata) == (
            domain.name, domain.accel, domain.memory_mib, domain.vcpus, domain.boot, domain.cpu_mode, domain.metadata)
        assert back.root_controller == domain.root_controller and back.viommu == domain.viommu
        assert domain.name in test_host.hvctl_domains()
    finally:
        guest.undefine()
    assert test_host.state(domain.name) is DomainState.MISSING


def test_a_guest_handle_never_acts_on_a_newcomer_of_the_same_name(test_host: Host) -> None:
    """A handle is bound to the domain it was looked up as, by UUID: once that domain is undefined and another is
    defined under its name, the old handle reports MISSING and refuses to act, while the name finds the new one."""
    domain = designed("tcg-minimal")
    old = test_host.define(domain.to_xml())
    old.undefine()
    new = test_host.define(domain.to_xml())
    try:
        assert new.uuid != old.uuid
        assert old.state() is DomainState.MISSING
        with pytest.raises(NotFound, match=old.uuid):
            old.undefine()
        with pytest.raises(NotFound):
            old.start()
        assert test_host.guest(domain.name).uuid == new.uuid and new.state() is DomainState.SHUTOFF
        new.start()
        assert new.state() is DomainState.RUNNING and new.made_by_hvctl()
        new.destroy()
        new.destroy()  # not running: nothing to do, no error
        assert new.state() is DomainState.SHUTOFF
    finally:
        new.undefine()
    assert test_host.find_guest(domain.name) is None
    with pytest.raises(NotFound, match="no domain"):
        test_host.guest(domain.name)


def test_designer_decisions() -> None:
    tcg = design(*CASES["tcg-minimal"])
    kvm = design(*CASES["kvm-4cpu-disk-root"])
    assert (tcg.accel, tcg.cpu_mode, tcg.machine) == (Accel.TCG, CpuMode.MAXIMUM, "q35")
    assert (kvm.accel, kvm.cpu_mode) == (Accel.KVM, CpuMode.HOST_PASSTHROUGH)
    assert "root=/dev/vda" in kvm.boot.cmdline and "root=" not in tcg.boot.cmdline
    assert tcg.network is not None and tcg.network.bind_address == "127.0.0.1" and tcg.network.restrict
    assert "hostfwd=tcp:127.0.0.1:22200-:22" in " ".join(tcg.network.qemu_args())


def test_recorded_capabilities_read_as_libvirt_wrote_them(test_host: Host) -> None:
    assert (TCG_ONLY.arch, TCG_ONLY.domain_types, TCG_ONLY.qemu_gid) == ("x86_64", {"qemu"}, 64055)
    assert KVM_OFFERED.domain_types == {"qemu", "kvm"}
    assert TCG_ONLY.cells == (capabilities.Cell(cpus=2, memory_mib=24683772 // 1024),)
    assert (TCG_ONLY.cpus, TCG_ONLY.memory_mib) == (2, 24683772 // 1024)
    assert TCG_ONLY.cpu_xml is not None and "<arch>x86_64</arch>" in TCG_ONLY.cpu_xml
    assert (TCG_HOST.accel, KVM_HOST.accel, KVM_HOST.cpus) == (Accel.TCG, Accel.KVM, 2)
    # The live reader is the same one: libvirt's test driver describes an i686 host with no NUMA topology.
    live = test_host.capabilities()
    assert (live.arch, live.domain_types, live.cells) == ("i686", {"test"}, ())
    assert test_host.facts().domain_types == live.domain_types and test_host.capabilities() is live


def test_the_accelerator_probe_overrules_what_libvirt_offers() -> None:
    """This machine's libvirt offers "kvm" when it sees /dev/kvm, yet no guest boots under it (a nested hypervisor's
    /dev/kvm): the probe's verdict, not the offer, decides the domain type and the CPU mode."""
    spec, _, boot, allocation = CASES["kvm-4cpu-disk-root"]
    domain = design(spec, HostCapabilities.of("local", KVM_OFFERED, Accel.TCG), boot, allocation)
    assert (domain.accel, domain.cpu_mode) == (Accel.TCG, CpuMode.MAXIMUM)


def test_tuning_maps_quotas_to_libvirt() -> None:
    tuned = design(*CASES["kvm-tuned"]).tuning
    assert (tuned.cpu_shares, tuned.global_period_us, tuned.global_quota_us) == (2048, 100_000, 150_000)
    assert tuned.vcpupin == ((0, "2"), (1, "3")) and tuned.emulatorpin == "2,3"
    # Hard limit = guest RAM + QEMU overhead (256 MiB + 2%), so QEMU itself is not what hits the limit.
    assert tuned.memory_hard_limit_kib == (2048 + 256 + 40) * 1024
    assert (tuned.blkio_weight, tuned.numa_nodeset) == (300, "0")
    spec, host, boot, allocation = CASES["kvm-tuned"]
    no_memlock = design(spec, HostCapabilities.of("local", KVM_OFFERED, memory_limits=False), boot, allocation)
    assert no_memlock.tuning.memory_hard_limit_kib is None
    plain = design(*CASES["tcg-minimal"]).tuning
    assert plain.global_quota_us is None and plain.vcpupin == () and plain.numa_nodeset is None


def test_viommu_guest_gets_an_intel_iommu_and_intel_iommu_on() -> None:
    domain = designed("tcg-viommu-edu")
    assert domain.viommu and "intel_iommu=on" in domain.boot.cmdline
    assert domain.extra_qemu_args == ("-device", "edu,bus=pcie.0,addr=0xa")
    assert "<iommu model=\"intel\">" in domain.to_xml()


def test_values_cannot_change_the_document_structure() -> None:
    # The spec refuses such names, but the model itself must also be safe against any string it is handed.
    domain = design(*CASES["tcg-minimal"])
    evil = Domain(**{**domain.__dict__, "name": "x'/><devices><hostdev/></devices><name>y"})
    parsed = Domain.from_xml(evil.to_xml())
    assert parsed.name == evil.name and not any(isinstance(d, PciHostdev) for d in parsed.devices)


def test_retargeting_paths_for_a_storage_copy_changes_whole_values_only() -> None:
    from hvctl.domain.model import retarget_paths

    old, new = Path("/var/lib/hvctl/vms/tiny"), Path("/var/lib/hvctl/vms/tiny.g1")
    xml = designed("tcg-minimal").to_xml()
    moves = {str(old / f): str(new / f) for f in ("disk.qcow2", "console.log", "agent.sock")}
    moved = Domain.from_xml(retarget_paths(xml, moves))
    assert moved == Domain.from_xml(xml.replace(str(old) + "/", str(new) + "/"))
    assert str(old) + "/" not in retarget_paths(xml, moves)
    # A path that merely starts like an old one is left alone.
    assert retarget_paths(xml, {str(old / "disk"): "/elsewhere"}) == retarget_paths(xml, {})


def test_retargeting_for_another_host_moves_the_kernel_initrd_and_backing_chain() -> None:
    """Moving to another host's pool: the kernel and initrd are its volumes, and a backing chain libvirt wrote into
    the live XML names the base image there."""
    from xml.etree import ElementTree as ET

    from hvctl.domain.model import retarget_paths

    domain = designed("tcg-minimal")
    root = ET.fromstring(domain.to_xml())
    disk = root.find("devices/disk/source/..")
    assert disk is not None
    chain = ET.SubElement(disk, "backingStore", type="file")
    ET.SubElement(chain, "source", file="/img/base.qcow2")
    kernel, initrd = str(domain.boot.kernel), str(domain.boot.initrd)
    moved = ET.fromstring(retarget_paths(ET.tostring(root, encoding="unicode"), {
        kernel: "/pool/img-k", initrd: "/pool/img-i", "/img/base.qcow2": "/pool/img-base"}))
    assert moved.findtext("os/kernel") == "/pool/img-k" and moved.findtext("os/initrd") == "/pool/img-i"
    assert moved.find("devices/disk/backingStore/source").get("file") == "/pool/img-base"  # type: ignore[union-attr]


def test_a_production_nic_is_a_bridge_xor_a_network_with_a_gateway_on_its_subnet() -> None:
    from hvctl.designer import nic_mac
    from hvctl.errors import InvalidSpec

    with pytest.raises(InvalidSpec, match="exactly one of bridge or network"):
        VMSpec.parse(name="x", network={"bridge": "br0", "network": "default"})
    with pytest.raises(InvalidSpec, match="not on the NIC's subnet"):
        VMSpec.parse(name="x", network={"bridge": "br0", "address": "198.18.77.10/24", "gateway": "10.0.0.1"})
    with pytest.raises(InvalidSpec, match="network.bridge"):
        VMSpec.parse(name="x", network={"bridge": "br0'/><evil"})
    nic = designed("tcg-bridge-nic").to_xml()
    assert f"<mac address=\"{nic_mac('web')}\" />" in nic and "<source bridge=\"br-prod\" />" in nic
    assert nic_mac("web") == nic_mac("web") != nic_mac("web2") and nic_mac("web").startswith("52:54:00:")


def test_the_console_is_a_pty_logged_to_a_file_and_an_older_file_serial_parses_the_same() -> None:
    from xml.etree import ElementTree as ET

    from hvctl.domain import SerialConsole

    console = SerialConsole(Path("/var/lib/hvctl/vms/tiny/console.log"))
    el = console.to_xml()
    assert el.get("type") == "pty"  # what virDomain.openConsole attaches to
    assert el.find("log") is not None and el.find("log").get("append") == "on"  # type: ignore[union-attr]
    legacy = ET.fromstring("<serial type='file'><source path='/var/lib/hvctl/vms/tiny/console.log' append='on'/>"
                           "<target port='0'/></serial>")
    assert SerialConsole.from_xml(legacy) == SerialConsole.from_xml(el) == console


def test_a_cloud_image_boots_through_its_firmware_and_uefi_gets_the_gpus_mmio_window() -> None:
    bios = designed("tcg-cloud-bios")
    assert isinstance(bios.boot, FirmwareBoot) and bios.boot.firmware == "bios"
    xml = bios.to_xml()
    assert "<kernel>" not in xml and "<boot dev=\"hd\" />" in xml and "firmware=" not in xml
    uefi = designed("kvm-cloud-uefi-gpu").to_xml()
    assert '<os firmware="efi">' in uefi and '<feature enabled="no" name="secure-boot" />' in uefi
    # 96 GiB of BARs: OVMF's aperture floor is set to that, in MiB, through fw_cfg.
    assert 'value="name=opt/ovmf/X-PciMmio64Mb,string=98304"' in uefi
    assert "X-PciMmio64Mb" not in design(*CASES["tcg-gpu-hostdev"]).to_xml()  # SeaBIOS: pcihole64 only


def test_a_nic_with_the_first_tenant_filter_is_given_the_current_one_and_nothing_else_changes() -> None:
    """A VM made before tenant networks served DHCP names hvctl-tenant-v1, which lets it reach the host's address on
    the segment; its XML is brought to the current filter (with GW, the network's first address) and is otherwise
    today's own."""
    from hvctl.domain.model import retarget_tenant_filter

    today = (GOLDEN / "tcg-tenant-network-nic.xml").read_text()
    older = today.replace('"hvctl-tenant-v2"', '"hvctl-tenant-v1"').replace(
        '<parameter name="GW" value="10.96.10.1" />', "")
    assert "hvctl-tenant-v1" in older and "GW" not in older
    assert Domain.from_xml(retarget_tenant_filter(older)) == Domain.from_xml(today)
    # Today's XML, and one with no tenant NIC, are returned as they are.
    assert retarget_tenant_filter(today) == today
    plain = designed("tcg-minimal").to_xml()
    assert retarget_tenant_filter(plain) == plain


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_golden_file_parses_to_a_domain_that_writes_it_again(case: str) -> None:
    golden = (GOLDEN / f"{case}.xml").read_text()
    assert Domain.from_xml(golden).to_xml() == golden


def test_every_declared_field_is_written_by_some_golden_file() -> None:
    """virtinst's check-props: a declaration that no golden file writes is one no test reads back. Each device,
    root controller and tuning of every golden file is written again, and each declaration must have put its value
    into at least one of those elements."""
    from xml.etree import ElementTree as ET

    from hvctl.domain.devices import Declared
    from hvctl.domain.tuning import Tuning
    from hvctl.domain.xmlmap import Fixed, Value, write

    seen: dict[type, list[object]] = {}
    for case in CASES:
        domain = Domain.from_xml((GOLDEN / f"{case}.xml").read_text())
        for obj in (*domain.devices, domain.root_controller, domain.tuning):
            seen.setdefault(type(obj), []).append(obj)
    classes: list[type] = [*Declared.__subclasses__(), Tuning]
    assert set(classes) <= set(seen), set(classes) - set(seen)

    def wrote(obj: object, item: object) -> bool:
        el = write(ET.Element("x"), obj, obj.xml)  # type: ignore[attr-defined]
        at = el if item.path == "." else el.find(item.path)  # type: ignore[attr-defined]
        if at is None or not isinstance(item, Value):
            return at is not None
        attr = getattr(obj, item.attr_from) if item.attr_from else item.attr
        return (at.text if attr is None else at.get(attr)) is not None

    unexercised = [f"{cls.__name__}.{item.field}" for cls in classes for item in cls.xml  # type: ignore[attr-defined]
                   if not isinstance(item, Fixed) and not any(wrote(obj, item) for obj in seen[cls])]
    assert unexercised == []
