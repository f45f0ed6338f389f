"""Decisions: a VMSpec plus a host's capabilities plus what the ledger allocated becomes a Domain.

The domain model only describes; every choice of accelerator, CPU model, devices and boot arguments is made here.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from guest.rpc import AGENT_CHANNEL
from hvctl.domain import (
    Accel,
    CpuMode,
    DirectBoot,
    Disk,
    Domain,
    FirmwareBoot,
    NetInterface,
    PcieRoot,
    PciHostdev,
    Rng,
    SerialConsole,
    Tuning,
    UnixChannel,
    UserNetwork,
    Viommu,
)
from hvctl.domain.devices import TENANT_FILTER, TENANT_MTU, Device, tenant_server
from hvctl.spec import VMSpec

if TYPE_CHECKING:
    from hvctl.host.capabilities import Capabilities

CFS_PERIOD_US = 100_000
# The user-mode NIC's slot on pcie.0.
USER_NIC_SLOT = 0x9


def qemu_overhead_mib(spec: VMSpec) -> int:
    """QEMU's own memory beyond the guest's RAM: device emulation, the TCG code cache, page tables.

    A coarse bound, 256 MiB plus 2% of guest RAM; it only ever adds to host-side accounting and the hard limit,
    never to what counts against a tenant's quota (harvester#6293: a VM sized exactly to its quota must start).
    """
    return 256 + spec.memory_mib // 50


def design_tuning(spec: VMSpec, host: HostCapabilities) -> Tuning:
    pins = spec.pin_cpus
    return Tuning(
        # Proportional weight by size, so that under contention a 4-vCPU VM gets four times a 1-vCPU VM's time.
        cpu_shares=1024 * spec.vcpus,
        global_period_us=CFS_PERIOD_US if spec.cpu_limit else None,
        global_quota_us=round(spec.cpu_limit * CFS_PERIOD_US) if spec.cpu_limit else None,
        vcpupin=tuple((vcpu, str(pins[vcpu % len(pins)])) for vcpu in range(spec.vcpus)) if pins else (),
        emulatorpin=",".join(map(str, sorted(set(pins)))) if pins else None,
        memory_hard_limit_kib=(spec.memory_mib + qemu_overhead_mib(spec)) * 1024 if host.memory_limits else None,
        blkio_weight=spec.io_weight,
        numa_nodeset=str(spec.numa_node) if spec.numa_node is not None else None,
    )


@dataclass(frozen=True)
class HostCapabilities:
    """What the designer needs to know of a host; gathered by the host layer."""

    name: str
    accel: Accel
    arch: str = "x86_64"
    cpus: int = 1
    memory_mib: int = 1024
    # Whether libvirt may set a memory hard limit there: it must raise RLIMIT_MEMLOCK for QEMU, which needs
    # CAP_SYS_RESOURCE; sandboxes without it refuse every domain that has <memtune><hard_limit>.
    memory_limits: bool = True

    @classmethod
    def of(cls, name: str, caps: Capabilities, accel: Accel | None = None,
           memory_limits: bool = True) -> HostCapabilities:
        """From the host's libvirt capabilities. ``accel`` is the accelerator probe's verdict: libvirt offers "kvm"
        wherever /dev/kvm opens, which a nested hypervisor's /dev/kvm does without running a guest."""
        if accel is None:
            accel = Accel.KVM if "kvm" in caps.domain_types else Accel.TCG
        return cls(name=name, accel=accel, arch=caps.arch, cpus=caps.cpus, memory_mib=caps.memory_mib,
                   memory_limits=memory_limits)


@dataclass(frozen=True)
class BootArtifacts:
    kernel: Path
    initrd: Path
    # Images with a root filesystem on the disk boot with root=/dev/vda; an initramfs image runs from RAM.
    root_on_disk: bool = False
    # "bios" or "efi": a stock cloud image boots through the firmware and its own bootloader, not kernel and initrd.
    firmware: str | None = None


@dataclass(frozen=True)
class VMAllocation:
    """Per-VM resources the ledger handed out: paths on the host and the SSH forward port."""

    overlay: Path
    console_log: Path
    agent_socket: Path
    ssh_port: int
    ssh_bind_address: str = "127.0.0.1"
    hostdevs: tuple[PciHostdev, ...] = ()
    pcihole64_kib: int | None = None
    # The NoCloud seed ISO with keys and the agent token; attached read-only as the second disk.
    seed: Path | None = None


def production_nic(spec: VMSpec) -> NetInterface:
    """The VM's second NIC: on an admin's bridge or libvirt network as it is, or on hvctl's tenant network with the
    tenant filter (its own MAC and address only, IPv4 to its subnet only, the network's own address (GW) for DHCP
    only; ``hvctl.host.networks``) and the tenant
    MTU."""
    net = spec.network
    assert net is not None
    nic = NetInterface(kind="bridge" if net.bridge else "network", source=net.bridge or net.network or "",
                       mac=nic_mac(spec.name))
    if net.tenant_network is None or net.address is None:
        return nic
    # By name, as libvirt keeps them.
    return dataclasses.replace(nic, mtu=TENANT_MTU, filter=TENANT_FILTER, filter_params=(
        ("GW", str(tenant_server(net.address.network))), ("IP", str(net.address.ip)),
        ("MASK", str(net.address.network.netmask)), ("NET", str(net.address.network.network_address))))


def nic_mac(name: str) -> str:
    """The production NIC's MAC: fixed per VM name (so it survives migration and re-creation), in QEMU's
    locally administered 52:54:00 range; the guest and cloud-init find the NIC by it."""
    digest = hashlib.sha256(name.encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def kernel_cmdline(spec: VMSpec, boot: BootArtifacts, extra: tuple[str, ...] = ()) -> str:
    # Boot time under TCG is precious: skip probing a PS/2 controller no guest uses and re-checking the TSC and
    # timer, which saved 0.5-1 s of a ~6 s kernel boot in measurements; "quiet" because every console byte is
    # emulated serial I/O.
    args = ["console=ttyS0", "quiet", "i8042.noaux", "i8042.nokbd", "i8042.nopnp", "tsc=reliable",
            "no_timer_check", f"hvctl.name={spec.name}"]
    if boot.root_on_disk:
        args += ["root=/dev/vda", "rw"]
    return " ".join([*args, *extra])


def design(
    spec: VMSpec,
    host: HostCapabilities,
    boot: BootArtifacts,
    alloc: VMAllocation,
    extra_cmdline: tuple[str, ...] = (),
    extra_qemu_args: tuple[str, ...] = (),
) -> Domain:
    # Under TCG "maximum" gives the guest every feature QEMU can emulate (SSE4.2, AVX2: numpy 2 and torch need
    # them); under KVM the host's own CPU is passed through so workloads get the real instruction set.
    cpu_mode = CpuMode.HOST_PASSTHROUGH if host.accel is Accel.KVM else CpuMode.MAXIMUM
    devices: tuple[Device, ...] = (
        Disk(source=alloc.overlay),
        *((Disk(source=alloc.seed, target="vdb", fmt="raw", readonly=True),) if alloc.seed else ()),
        SerialConsole(path=alloc.console_log),
        UnixChannel(path=alloc.agent_socket, name=AGENT_CHANNEL),
        Rng(),
        *alloc.hostdevs,
        *((production_nic(spec),) if spec.network else ()),
    )
    return Domain(
        name=spec.name,
        accel=host.accel,
        memory_mib=spec.memory_mib,
        vcpus=spec.vcpus,
        boot=FirmwareBoot(boot.firmware) if boot.firmware else
        DirectBoot(boot.kernel, boot.initrd,
                   kernel_cmdline(spec, boot, (*(("intel_iommu=on",) if spec.viommu else ()), *extra_cmdline))),
        machine="q35",
        arch=host.arch,
        cpu_mode=cpu_mode,
        devices=devices,
        root_controller=PcieRoot(pcihole64_kib=alloc.pcihole64_kib),
        # The user-mode NIC cannot reach the host or other VMs' forwards (restrict), only be reached through its
        # own SSH forward; an explicit slot on pcie.0 keeps it off the root ports libvirt adds.
        network=UserNetwork(ssh_port=alloc.ssh_port, bind_address=alloc.ssh_bind_address, restrict=True,
                            pci_slot=USER_NIC_SLOT),
        metadata=(("tenant", spec.tenant), ("image", spec.image), ("spec", spec.model_dump_json())),
        tuning=design_tuning(spec, host),
        acpi=True,  # the power button: hvctl stop asks the guest to shut down through ACPI
        on_poweroff="destroy", on_reboot="restart", on_crash="destroy",
        # caching_mode: the guest's own VFIO needs QEMU to see its IOTLB updates; interrupt remapping would need a
        # split irqchip, which TCG guests do not need here.
        viommu=Viommu(intremap="off", caching_mode="on") if spec.viommu else None,
        extra_qemu_args=(*ovmf_mmio64_args(boot, alloc), *extra_qemu_args),
    )


def ovmf_mmio64_args(boot: BootArtifacts, alloc: VMAllocation) -> tuple[str, ...]:
    """OVMF sizes its 64-bit PCI MMIO aperture itself (PlatformDynamicMmioWindow: a share of the guest's physical
    address space, edk2 #9932 and PR #12997) and reads no ACPI ``pcihole64`` for it. The fw_cfg file
    ``opt/ovmf/X-PciMmio64Mb`` sets a minimum (edk2 PR #10856 describes it as the floor the dynamic size cannot go
    under): a guest with large-BAR GPUs gets at least the aperture their BARs need, the same figure the q35
    ``pcihole64`` carries for SeaBIOS."""
    if boot.firmware != "efi" or not alloc.pcihole64_kib:
        return ()
    return ("-fw_cfg", f"name=opt/ovmf/X-PciMmio64Mb,string={-(-alloc.pcihole64_kib // 1024)}")
