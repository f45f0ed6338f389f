"""What the VM benchmarks share: a scratch directory QEMU can traverse, and a report printed as it is written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hvctl.context import Context


def scratch_dir(prefix: str) -> Path:
    """0755 under /var/tmp: QEMU runs as libvirt-qemu and must reach disks and sockets inside."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    root.chmod(0o755)
    return root


class Report:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(self.lines) + "\n")


def share_test_images(ctx: Context) -> None:
    """Point ``ctx``'s image store at the tests' shared one (HVCTL_TEST_IMAGES), so built images are reused."""
    images = Path(os.environ.get("HVCTL_TEST_IMAGES", "/var/tmp/hvctl-test-images"))
    images.mkdir(parents=True, exist_ok=True)
    images.chmod(0o755)
    ctx.paths.images.rmdir()
    ctx.paths.images.symlink_to(images)


# A baseline's domain, written by hand as a libvirt user would, not by hvctl's designer (so that a designer
# regression slows hvctl's side only): the machine hvctl makes, device for device, without its resource tuning.
RAW_DOMAIN = """<domain type='{accel}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>{vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <cpu mode='{cpu_mode}'/>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{vm_dir}/disk.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>{seed}
    <serial type='pty'><log file='{vm_dir}/console.log' append='on'/><target port='0'/></serial>
    <channel type='unix'>
      <source mode='bind' path='{vm_dir}/agent.sock'/>
      <target type='virtio' name='org.hvctl.agent.0'/>
    </channel>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-netdev'/>
    <qemu:arg value='user,id=net0,hostfwd=tcp:127.0.0.1:{port}-:22,restrict=on'/>
    <qemu:arg value='-device'/>
    <qemu:arg value='virtio-net-pci,netdev=net0,bus=pcie.0,addr=0x9'/>
  </qemu:commandline>
</domain>"""
SEED_DISK = """
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{vm_dir}/seed.iso'/>
      <target dev='vdb' bus='virtio'/>
      <readonly/>
    </disk>"""
CMDLINE = "console=ttyS0 quiet i8042.noaux i8042.nokbd i8042.nopnp tsc=reliable no_timer_check"


def raw_domain_xml(kvm: bool, name: str, memory_mib: int, kernel: Path, initrd: Path, vm_dir: Path, port: int,
                   vcpus: int = 1, root_on_disk: bool = False, seed: bool = False) -> str:
    """RAW_DOMAIN for a VM whose files are vm_dir/disk.qcow2, console.log, agent.sock (and seed.iso)."""
    cmdline = f"{CMDLINE} hvctl.name={name}" + (" root=/dev/vda rw" if root_on_disk else "")
    return RAW_DOMAIN.format(accel="kvm" if kvm else "qemu", cpu_mode="host-passthrough" if kvm else "maximum",
                             name=name, memory_mib=memory_mib, vcpus=vcpus, kernel=kernel, initrd=initrd,
                             cmdline=cmdline, vm_dir=vm_dir, port=port,
                             seed=SEED_DISK.format(vm_dir=vm_dir) if seed else "")
