"""hvctl host prepare: make a fresh Debian 12 machine a hypervisor host, over the admin's SSH, with fabric.

Each step is a check and an action: the check runs first, and the action only where the check fails, so a second
run changes nothing (every step reports "ok"). With ``dry_run`` nothing is changed and each step that would act
says so. Steps:

- the machine is Debian 12 (anything else is refused before any step acts);
- packages: QEMU, libvirt, OVMF, qemu-utils, genisoimage (apt-get, non-interactive);
- libvirtd answers on qemu:///system (else it is enabled and started with systemd);
- hvctl's storage pool directory, /var/lib/libvirt/images/hvctl (0711);
- with ``vfio``: vfio-pci loaded now and at boot (/etc/modules-load.d/hvctl-vfio.conf);
- with ``hugepages``: that many 2 MiB huge pages now and at boot (/etc/sysctl.d/80-hvctl-hugepages.conf).

TLS for libvirtd (certificates, listen_tls) is not made here yet: hosts are reached over qemu+ssh.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvctl.errors import HostUnreachable, HvctlError

PACKAGES = ("qemu-system-x86", "qemu-utils", "libvirt-daemon-system", "libvirt-clients", "ovmf", "genisoimage")
POOL_DIR = "/var/lib/libvirt/images/hvctl"
VFIO_CONF = "/etc/modules-load.d/hvctl-vfio.conf"
HUGEPAGES_CONF = "/etc/sysctl.d/80-hvctl-hugepages.conf"


@dataclass(frozen=True)
class Step:
    name: str
    check: str  # a shell command: exit 0 means the step is already done
    action: str  # what makes it so
    describe: str


def steps(vfio: bool, hugepages: int | None) -> list[Step]:
    missing = " ".join(PACKAGES)
    plan = [
        Step("packages", f"for p in {missing}; do dpkg-query -W -f='${{Status}}' $p 2>/dev/null | "
                         "grep -q 'install ok installed' || exit 1; done",
             f"apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "
             f"{missing}", f"install {missing}"),
        Step("libvirtd", "virsh -c qemu:///system version >/dev/null 2>&1",
             "systemctl enable --now libvirtd && virsh -c qemu:///system version >/dev/null",
             "enable and start libvirtd"),
        Step("storage pool directory", f"[ -d {POOL_DIR} ]", f"install -d -m 0711 {POOL_DIR}",
             f"make {POOL_DIR}"),
    ]
    if vfio:
        plan.append(Step("vfio-pci", f"[ -d /sys/module/vfio_pci ] && grep -qx vfio-pci {VFIO_CONF} 2>/dev/null",
                         f"modprobe vfio-pci && printf 'vfio-pci\\n' > {VFIO_CONF}",
                         f"load vfio-pci and write {VFIO_CONF}"))
    if hugepages is not None:
        plan.append(Step("hugepages", f"[ \"$(cat /proc/sys/vm/nr_hugepages)\" -ge {hugepages} ] && "
                                      f"grep -qx 'vm.nr_hugepages = {hugepages}' {HUGEPAGES_CONF} 2>/dev/null",
                         f"printf 'vm.nr_hugepages = {hugepages}\\n' > {HUGEPAGES_CONF} && "
                         f"sysctl -q -w vm.nr_hugepages={hugepages} && "
                         f"[ \"$(cat /proc/sys/vm/nr_hugepages)\" -ge {hugepages} ]",
                         f"reserve {hugepages} huge pages now and at boot"))
    return plan


def connect(address: str, user: str = "root", port: int = 22, identity: Path | None = None,
            known_hosts: Path | None = None, timeout: float = 30.0) -> Any:
    """A fabric Connection that checks the host's key strictly: against ``known_hosts`` if given, else the
    admin's own (~/.ssh/known_hosts). An unknown key is refused, never added."""
    import paramiko
    from fabric import Connection

    connection = Connection(address, user=user, port=port, connect_timeout=timeout,
                            connect_kwargs={"key_filename": str(identity)} if identity else {})
    connection.client.set_missing_host_key_policy(paramiko.RejectPolicy())
    if known_hosts is not None:
        connection.client.load_host_keys(str(known_hosts))
    else:
        connection.client.load_system_host_keys()
    return connection


def prepare(connection: Any, vfio: bool = False, hugepages: int | None = None, dry_run: bool = False,
            say: Callable[[str], None] = lambda _: None) -> list[dict[str, str]]:
    """Run the steps on ``connection``; returns each step with its outcome: ok, changed, or would change."""
    import paramiko

    def sh(command: str) -> Any:
        try:
            return connection.run(f"sh -c {shlex.quote(command)}", hide=True, warn=True, in_stream=False)
        except (paramiko.SSHException, OSError) as exc:
            raise HostUnreachable(f"cannot run commands on {connection.host} over SSH: {exc}",
                                  hint="check the address, the key (-i) and that its host key is in known_hosts "
                                       "(--known-hosts)") from None

    release = sh(". /etc/os-release && echo \"$ID $VERSION_ID\"").stdout.strip()
    if release != "debian 12":
        raise HvctlError(f"{connection.host} runs {release or 'an unknown system'}, not Debian 12; "
                         "hvctl host prepare only knows Debian 12")
    done = []
    for step in steps(vfio, hugepages):
        if sh(step.check).ok:
            done.append({"step": step.name, "outcome": "ok", "detail": "already so"})
            continue
        if dry_run:
            done.append({"step": step.name, "outcome": "would change", "detail": step.describe})
            continue
        say(f"{step.name}: {step.describe}")
        applied = sh(step.action)
        if not applied.ok or not sh(step.check).ok:
            error = (applied.stderr or applied.stdout).strip().splitlines()[-1:] or ["its check still fails"]
            raise HvctlError(f"host prepare on {connection.host}: {step.name} failed: {error[0]}",
                             hint="the steps before it are done; fix this one and run prepare again")
        done.append({"step": step.name, "outcome": "changed", "detail": step.describe})
    return done
