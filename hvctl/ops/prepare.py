"""hvctl host prepare: make a fresh Debian 12 machine a hypervisor host, over the admin's SSH, with fabric.

Each step is a check and an action: the check runs first, and the action only where the check fails, so a second
run changes nothing (every step reports "ok"). With ``dry_run`` nothing is changed and each step that would act
says so. Steps:

- the machine is Debian 12 (anything else is refused before any step acts);
- packages: QEMU, libvirt, OVMF, qemu-utils, genisoimage (apt-get, non-interactive);
- libvirtd answers on qemu:///system (else it is enabled and started with systemd);
- hvctl's storage pool directory, /var/lib/libvirt/images/hvctl (0711);
- with ``vfio``: vfio-pci loaded now and at boot (/etc/modules-load.d/hvctl-vfio.conf);
- with ``hugepages``: that many 2 MiB huge pages now and at boot (/etc/sysctl.d/80-hvctl-hugepages.conf);
- with ``tls`` (an ``hvctl.pki.Authority``): hvctl's CA and a server certificate for the address prepare reaches the
  host at, where libvirtd looks for them (/etc/pki/CA/cacert.pem, /etc/pki/libvirt/servercert.pem,
  /etc/pki/libvirt/private/serverkey.pem), then libvirtd listening for TLS on 16514 through systemd's
  libvirtd-tls.socket (libvirt's socket activation on Debian 12; ``listen_tls`` in libvirtd.conf is ignored there).
"""

from __future__ import annotations

import hashlib
import io
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hvctl.errors import HostUnreachable, HvctlError
from hvctl.ops import Say

if TYPE_CHECKING:
    from hvctl.pki import Authority

PACKAGES = ("qemu-system-x86", "qemu-utils", "libvirt-daemon-system", "libvirt-clients", "ovmf", "genisoimage")
POOL_DIR = "/var/lib/libvirt/images/hvctl"
VFIO_CONF = "/etc/modules-load.d/hvctl-vfio.conf"
HUGEPAGES_CONF = "/etc/sysctl.d/80-hvctl-hugepages.conf"
# libvirtd's default certificate paths (libvirtd.conf's ca_file, cert_file, key_file).
CA_FILE = "/etc/pki/CA/cacert.pem"
SERVER_CERT = "/etc/pki/libvirt/servercert.pem"
SERVER_KEY = "/etc/pki/libvirt/private/serverkey.pem"
TLS_PORT = 16514


# A shell command, and what its standard input carries (a secret never goes on a command line, where the host's
# other users could read it in ps).
Command = tuple[str, str | None]


@dataclass(frozen=True)
class Step:
    name: str
    # check: exit 0 means the step is already done; action: what makes it so. Either may be made only when it runs
    # (a key is generated for an action; a check reads the CA made since).
    check: str | Callable[[], str]
    action: str | Callable[[], Command]
    describe: str

    def check_command(self) -> str:
        return self.check if isinstance(self.check, str) else self.check()

    def action_command(self) -> Command:
        return (self.action, None) if isinstance(self.action, str) else self.action()


def steps(vfio: bool, hugepages: int | None, tls: tuple[Authority, str] | None = None) -> list[Step]:
    """The steps in order; ``tls`` is hvctl's CA and the address the host's certificate names."""
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
    if tls is not None:
        plan += tls_steps(*tls)
    return plan


def tls_steps(authority: Authority, address: str) -> list[Step]:
    def installed() -> str:
        # Done when the host trusts this CA and has a certificate and key (hvctl's CA there: hvctl put them there).
        ca = authority.existing_ca_pem()
        if ca is None:
            return "false"  # no CA yet, so no host can have it
        return (f"echo {hashlib.sha256(ca.encode()).hexdigest()}' *{CA_FILE}' | sha256sum -c --status - && "
                f"[ -s {SERVER_CERT} ] && [ -s {SERVER_KEY} ]")

    def install() -> Command:
        pair = authority.server_pair(address)
        return (f"install -d -m 0755 /etc/pki/CA /etc/pki/libvirt && install -d -m 0700 /etc/pki/libvirt/private && "
                f"(umask 077 && cat > {SERVER_KEY}.new) && "  # the key comes on stdin
                f"printf %s {shlex.quote(pair.cert_pem)} > {SERVER_CERT}.new && "
                f"printf %s {shlex.quote(authority.ca_pem())} > {CA_FILE}.new && "
                f"mv {SERVER_KEY}.new {SERVER_KEY} && mv {SERVER_CERT}.new {SERVER_CERT} && mv {CA_FILE}.new {CA_FILE}"
                # A libvirtd already listening read the old ones at start.
                " && if [ -d /run/systemd/system ] && systemctl is-active --quiet libvirtd-tls.socket; then "
                "systemctl restart libvirtd.service; fi", pair.key_pem)

    return [
        Step("tls certificates", installed, install,
             f"install hvctl's CA and a server certificate for {address} in /etc/pki"),
        Step("libvirtd tls listener", f"ss -Hltn 'sport = :{TLS_PORT}' | grep -q .",
             "if [ ! -d /run/systemd/system ]; then echo 'libvirtd is not run by systemd here: start it with "
             "--listen and listen_tls = 1' >&2; exit 1; fi; systemctl stop libvirtd.service; "
             "systemctl enable --now libvirtd-tls.socket && systemctl start libvirtd.service",
             f"enable libvirtd-tls.socket (TLS on {TLS_PORT})"),
    ]


def connect(address: str, user: str = "root", port: int = 22, identity: Path | None = None,
            known_hosts: Path | None = None, timeout: float = 30.0) -> Any:
    """A fabric Connection that checks the host's key strictly: against ``known_hosts`` if given, else the
    admin's own (~/.ssh/known_hosts). An unknown key is refused, never added."""
    import paramiko  # fabric and paramiko load only for `host prepare`, the one command that needs them
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
            say: Say = lambda _: None,
            tls: tuple[Authority, str] | None = None) -> list[dict[str, str]]:
    """Run the steps on ``connection``; returns each step with its outcome: ok, changed, or would change."""
    import paramiko

    def sh(command: str, stdin: str | None = None) -> Any:
        try:
            return connection.run(f"sh -c {shlex.quote(command)}", hide=True, warn=True,
                                  in_stream=io.StringIO(stdin) if stdin is not None else False)
        except (paramiko.SSHException, OSError) as exc:
            raise HostUnreachable(f"cannot run commands on {connection.host} over SSH: {exc}",
                                  hint="check the address, the key (-i) and that its host key is in known_hosts "
                                       "(--known-hosts)") from None

    release = sh(". /etc/os-release && echo \"$ID $VERSION_ID\"").stdout.strip()
    if release != "debian 12":
        raise HvctlError(f"{connection.host} runs {release or 'an unknown system'}, not Debian 12; "
                         "hvctl host prepare only knows Debian 12")
    done = []
    for step in steps(vfio, hugepages, tls):
        if sh(step.check_command()).ok:
            done.append({"step": step.name, "outcome": "ok", "detail": "already so"})
            continue
        if dry_run:
            done.append({"step": step.name, "outcome": "would change", "detail": step.describe})
            continue
        say(f"{step.name}: {step.describe}")
        applied = sh(*step.action_command())
        if not applied.ok or not sh(step.check_command()).ok:
            error = (applied.stderr or applied.stdout).strip().splitlines()[-1:] or ["its check still fails"]
            raise HvctlError(f"host prepare on {connection.host}: {step.name} failed: {error[0]}",
                             hint="the steps before it are done; fix this one and run prepare again")
        done.append({"step": step.name, "outcome": "changed", "detail": step.describe})
    return done
