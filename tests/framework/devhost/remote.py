"""A remote-style host on this machine: a libvirtd and an sshd that share nothing with the controller but the
kernel, reached only over the network, as a real remote host is.

* Network: their own network namespace, reached over a veth pair this module makes, one /30 per host in
  198.18.0.0/15 (RFC 2544's range for test networks): the controller at 198.18.N.1, the host at 198.18.N.2.
* Filesystem: a private mount namespace with the host's own /etc/libvirt, /run (libvirt's and sshd's sockets and
  pids), /var/lib/libvirt (its storage), /var/log/libvirt and /var/cache/libvirt, and an empty tmpfs over each
  path in ``hide`` (the controller's state dir), so the host cannot see the controller's files. The rest of /etc is
  an overlay on this machine's: what is written there (``host prepare --tls``'s certificates) stays the host's.
* Access: ``qemu+ssh://root@198.18.N.2/system`` through an OpenSSH sshd in the same namespaces, key-only, with a
  host key the client pins. Plain ``qemu+ssh`` runs the ``ssh`` binary, which ignores libvirt's ``known_hosts=``
  and reads the user's own file, so the URI names a wrapper (``command=``) that gives ssh this host's known_hosts,
  strict checking and the client key.

Made as ENVIRONMENT.md measured it: a holder process owns the namespaces (``unshare --mount --net --uts``), the
veth's inner end is moved into its netns by pid (``ip netns add`` would leave a mount of /run/netns behind), and
the daemons are started inside with ``nsenter``. ``stop`` terminates every process by its own pid, the holder last;
the netns, its veth and every mount go with the holder. Nothing is written outside ``root``.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from framework.devhost import _alive, _read_pid, _set_conf, _terminate
from framework.devhost.cgroups import CgroupTree, supported
from hvctl.errors import HostUnreachable
from hvctl.host import DEFAULT_POOL_PATH

# Bind-mounted from ``root`` over the same path inside the host's mount namespace.
_HOST_DIRS = ("etc/libvirt", "run", "var/lib/libvirt", "var/log/libvirt", "var/cache/libvirt")
# Inside the host: where its daemons keep their pid files (its private /run).
_PIDFILES = ("libvirtd.pid", "virtlogd.pid", "sshd.pid")


@dataclass
class RemoteStyleHost:
    root: Path
    index: int  # the host's /30 is 198.18.<index>.0
    hide: tuple[Path, ...] = ()
    host_uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    # Also listen for qemu+tls on 16514, with a CA, server and client certificates made for this host.
    tls: bool = False
    # libvirt's cgroups on this host, in a cgroup tree of its own (framework.devhost.cgroups), where this machine
    # allows one; otherwise off, and ``cgroups_off`` says why.
    cgroups: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.index <= 254:
            raise ValueError(f"index {self.index}: must be 1..254 (one /30 of 198.18.0.0/16 each)")
        self.cgroups_off = "turned off" if not self.cgroups else supported()
        self._tree = CgroupTree(f"hvctl-remote-{self.index}")

    # -- names --------------------------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"198.18.{self.index}.2"

    @property
    def controller_address(self) -> str:
        return f"198.18.{self.index}.1"

    @property
    def veth(self) -> tuple[str, str]:
        """(the controller's end, the host's end)."""
        return f"hvt{self.index}h", f"hvt{self.index}g"

    @property
    def client_key(self) -> Path:
        return self.root / "controller" / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.root / "controller" / "known_hosts"

    @property
    def ssh_wrapper(self) -> Path:
        return self.root / "controller" / "ssh"

    @property
    def uri(self) -> str:
        return f"qemu+ssh://root@{self.address}/system?command={self.ssh_wrapper}"

    @property
    def tls_uri(self) -> str:
        """``qemu+tls`` with the client's certificate, key and the CA in ``pkipath`` (libvirt's file names)."""
        return f"qemu+tls://{self.address}/system?pkipath={self.root / 'controller' / 'pki'}"

    @property
    def holder_pidfile(self) -> Path:
        return self.root / "holder.pid"

    @property
    def storage(self) -> Path:
        """The host's storage directory, as the host sees it (its libvirt's default pool path)."""
        return Path("/var/lib/libvirt/images")

    # -- start ----------------------------------------------------------------------------------------------------

    def _prepare(self) -> Path:
        r = self.root
        # run/lock: /var/lock points there, and libvirt locks a console or channel it opens for a client there.
        for rel in (*_HOST_DIRS, "run/libvirt", "run/sshd", "run/lock", "var/lib/libvirt/images",
                    "var/lib/libvirt/qemu", "var/log/libvirt/qemu", "ssh", "controller"):
            (r / rel).mkdir(parents=True, exist_ok=True)
        (r / "run/sshd").chmod(0o755)  # sshd's privilege-separation directory
        for rel in ("ssh", "controller"):
            (r / rel).chmod(0o700)
        etc = r / "etc/libvirt"
        if not (etc / "libvirtd.conf").exists():
            # /etc/libvirt/qemu holds the machine daemon's persistent domains: a new host starts with none.
            shutil.copytree("/etc/libvirt", etc, symlinks=True, dirs_exist_ok=True,
                            ignore=lambda d, names: ["qemu"] if Path(d) == Path("/etc/libvirt") else [])
            (etc / "qemu").mkdir(exist_ok=True)
            (etc / "qemu.conf").write_text(_set_conf(Path("/etc/libvirt/qemu.conf").read_text(), {
                # libvirtd already runs in a private mount namespace; QEMU's own per-domain one would try to move
                # this host's bind mounts.
                "namespaces": "[ ]",
            } | ({} if self.cgroups_off is None else {
                # Without a cgroup tree of its own, this host would share /machine with the controller's daemon,
                # and a domain of the same name on both (a migration) would collide there.
                "cgroup_controllers": "[ ]",
            })))
            (etc / "libvirtd.conf").write_text(_set_conf(Path("/etc/libvirt/libvirtd.conf").read_text(), {
                "host_uuid": f'"{self.host_uuid}"',
                "unix_sock_rw_perms": '"0700"', "unix_sock_ro_perms": '"0700"', "auth_unix_rw": '"none"',
                "auth_unix_ro": '"none"',
            } | ({
                "listen_tls": "1", "listen_tcp": "0", "listen_addr": f'"{self.address}"', "auth_tls": '"none"',
                "key_file": f'"{r}/pki/serverkey.pem"', "cert_file": f'"{r}/pki/servercert.pem"',
                "ca_file": f'"{r}/pki/cacert.pem"',
                # libvirt's order, as virt-pki-query-dn prints it: in the other order the client learns only
                # "Unable to read TLS confirmation".
                "tls_allowed_dn_list": '["O=hvctl,CN=hvctl-controller"]',
            } if self.tls else {})))
        for key, comment in ((r / "ssh/host_ed25519", "hvctl-remote-host"), (self.client_key, "hvctl-controller")):
            if not key.exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)],
                               check=True)
        if self.tls:
            self._make_pki()
        (r / "ssh/authorized_keys").write_text(self.client_key.with_suffix(".pub").read_text())
        (r / "ssh/authorized_keys").chmod(0o600)
        (r / "ssh/sshd_config").write_text(
            f"ListenAddress {self.address}:22\nHostKey {r}/ssh/host_ed25519\n"
            f"AuthorizedKeysFile {r}/ssh/authorized_keys\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "PidFile /run/sshd.pid\nSubsystem sftp internal-sftp\n")
        host_pub = (r / "ssh/host_ed25519.pub").read_text().split()
        self.known_hosts.write_text(f"{self.address} {host_pub[0]} {host_pub[1]}\n")
        self.ssh_wrapper.write_text(
            "#!/bin/sh\n# libvirt's qemu+ssh runs this in place of ssh: this host's pinned key and the client key.\n"
            f"exec ssh -o UserKnownHostsFile={shlex.quote(str(self.known_hosts))} -o StrictHostKeyChecking=yes "
            f"-o GlobalKnownHostsFile=/dev/null -o BatchMode=yes -o ConnectTimeout=10 "
            f"-o IdentitiesOnly=yes -i {shlex.quote(str(self.client_key))} \"$@\"\n")
        self.ssh_wrapper.chmod(0o700)
        blocker = r / "kvm-hidden"
        blocker.touch()
        blocker.chmod(0)
        for rel in ("etc-upper", "etc-work"):
            (r / rel).mkdir(exist_ok=True)
        lines = ["set -eu", "mount --make-rprivate /"]
        if self.cgroups_off is None:
            lines += self._tree.mount_lines()
        lines.append(f"mount -t overlay hvctl-etc -o lowerdir=/etc,upperdir={shlex.quote(str(r / 'etc-upper'))},"
                     f"workdir={shlex.quote(str(r / 'etc-work'))} /etc")
        lines += [f"mount --bind {shlex.quote(str(r / rel))} /{rel}" for rel in _HOST_DIRS]
        lines += [f"mount -t tmpfs -o mode=0700,size=1m hvctl-hidden {shlex.quote(str(p))}"
                  for p in self.hide if p.exists()]
        if Path("/dev/kvm").exists():
            # As for PrivateLibvirtd: a /dev/kvm that opens but cannot run a guest costs ~44 s per create.
            lines.append(f"mount --bind {shlex.quote(str(blocker))} /dev/kvm")
        lines += [f"hostname hvctl-remote-{self.index}", "ip link set lo up",
                  f"echo $$ > {shlex.quote(str(self.holder_pidfile))}", "exec sleep infinity"]
        init = r / "holder.sh"
        init.write_text("\n".join(lines) + "\n")
        return init

    def start(self, timeout: float = 60.0) -> RemoteStyleHost:
        if self.running():
            return self
        init = self._prepare()
        self.holder_pidfile.unlink(missing_ok=True)
        argv = ["unshare", "--mount", "--net", "--uts", "--propagation", "private", "sh", str(init)]
        if self.cgroups_off is None:
            self._tree.create()
            argv = self._tree.enter(["unshare", "--cgroup", *argv[1:]])
        log = open(self.root / "holder.log", "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            subprocess.Popen(["setsid", *argv], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                             start_new_session=True)
        finally:
            log.close()
        try:
            holder = self._wait_for_holder(timeout)
            outer, inner = self.veth
            _run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner, "netns", str(holder))
            _run("ip", "addr", "add", f"{self.controller_address}/30", "dev", outer)
            _run("ip", "link", "set", outer, "up")
            self._inside(f"ip addr add {self.address}/30 dev {inner}", f"ip link set {inner} up",
                         "virtlogd -d -p /run/virtlogd.pid",
                         f"libvirtd -d {'-l ' if self.tls else ''}-p /run/libvirtd.pid", self._sshd_command())
            self._wait_until_answering(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def listen_tls_from_etc_pki(self, timeout: float = 60.0) -> None:
        """Restart libvirtd listening for TLS with its default certificate paths under /etc/pki, as
        libvirtd-tls.socket does on a systemd host (this host has no systemd): for ``host prepare --tls``."""
        conf = self.root / "etc/libvirt/libvirtd.conf"
        conf.write_text(_set_conf(conf.read_text(), {"listen_tls": "1", "listen_tcp": "0",
                                                     "listen_addr": f'"{self.address}"'}))
        _terminate(self.pids().get("libvirtd.pid"), timeout)
        self._inside("libvirtd -d -l -p /run/libvirtd.pid")
        self._wait_until_answering(timeout)

    def read(self, path: str) -> str:
        """A file as the host itself sees it, inside its mount namespace."""
        holder = _read_pid(self.holder_pidfile)
        assert holder is not None
        return subprocess.run(["nsenter", "-t", str(holder), "-m", "cat", path], capture_output=True, text=True,
                              check=True, timeout=30).stdout

    def _make_pki(self) -> None:
        """A CA, the host's server certificate (its address as subjectAltName, as GnuTLS requires) and the
        controller's client certificate, with the key usages and purposes libvirt checks for each, by openssl."""
        server, client = self.root / "pki", self.root / "controller" / "pki"
        if (client / "clientcert.pem").exists():
            return
        for d in (server, client):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)

        def openssl(*args: str) -> None:
            _run("openssl", *args)

        ca_key, ca = server / "cakey.pem", server / "cacert.pem"
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
                "-days", "30", "-subj", "/O=hvctl/CN=hvctl test CA",
                "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        for key, cert, subject, extensions in (
            (server / "serverkey.pem", server / "servercert.pem", f"/O=hvctl/CN=hvctl-remote-{self.index}",
             f"subjectAltName=IP:{self.address}\nextendedKeyUsage=serverAuth\n"
             "keyUsage=critical,digitalSignature,keyEncipherment\nbasicConstraints=critical,CA:FALSE\n"),
            (client / "clientkey.pem", client / "clientcert.pem", "/O=hvctl/CN=hvctl-controller",
             "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
             "basicConstraints=critical,CA:FALSE\n"),
        ):
            request, ext = key.with_suffix(".csr"), key.with_suffix(".ext")
            ext.write_text(extensions)
            openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(request),
                    "-subj", subject)
            openssl("x509", "-req", "-in", str(request), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
                    "-out", str(cert), "-days", "30", "-extfile", str(ext))
            request.unlink()
            ext.unlink()
        shutil.copy2(ca, client / "cacert.pem")

    def _sshd_command(self) -> str:
        return (f"/usr/sbin/sshd -f {shlex.quote(str(self.root / 'ssh/sshd_config'))} "
                f"-E {shlex.quote(str(self.root / 'var/log/libvirt/sshd.log'))}")

    def stop_sshd(self, timeout: float = 15.0) -> None:
        """Take the host off the network as its admins see it: its sshd stops listening, so no new connection to
        its libvirt can be made. (Sessions already open keep their own sshd process, as on a real host.)"""
        _terminate(self.pids().get("sshd.pid"), timeout)

    def start_sshd(self, timeout: float = 60.0) -> None:
        self._inside(self._sshd_command())
        self._wait_until_answering(timeout)

    def _inside(self, *commands: str) -> None:
        holder = _read_pid(self.holder_pidfile)
        assert holder is not None
        argv = ["nsenter", "-t", str(holder), "-m", "-n", "-u", "sh", "-ec", "; ".join(commands)]
        if self.cgroups_off is None:
            # Into the host's cgroup tree first, then its cgroup namespace: its daemons see that tree as the root.
            argv = self._tree.enter([*argv[:6], "-C", *argv[6:]])
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise HostUnreachable(f"remote-style host {self.index}: {result.stderr.strip()}")

    def _wait_for_holder(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = _read_pid(self.holder_pidfile)
            if pid is not None and _alive(pid):
                return pid
            time.sleep(0.05)
        log = (self.root / "holder.log").read_text(errors="replace").strip()
        raise HostUnreachable(f"remote-style host {self.index}: its namespaces did not come up ({log[-300:]})")

    def _wait_until_answering(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            probe = subprocess.run(["virsh", "-q", "-c", self.uri, "version"], capture_output=True, text=True,
                                   timeout=max(deadline - time.monotonic(), 5.0))
            if probe.returncode == 0:
                return
            last = probe.stderr.strip()
            time.sleep(0.3)
        raise HostUnreachable(f"remote-style host {self.index} did not answer on {self.uri} within "
                              f"{timeout:.0f} s: {last}")

    # -- stop -----------------------------------------------------------------------------------------------------

    def running(self) -> bool:
        holder = _read_pid(self.holder_pidfile)
        return holder is not None and _alive(holder)

    def pids(self) -> dict[str, int]:
        """The host's processes by role, from their pid files (its /run is ``root``/run outside)."""
        found = {name: pid for name in _PIDFILES if (pid := _read_pid(self.root / "run" / name)) is not None}
        found |= {f"qemu:{p.stem}": pid for p in (self.root / "run/libvirt/qemu").glob("*.pid")
                  if (pid := _read_pid(p)) is not None}
        holder = _read_pid(self.holder_pidfile)
        if holder is not None:
            found["holder"] = holder
        return {name: pid for name, pid in found.items() if _alive(pid)}

    def listdir(self, path: str) -> list[str]:
        """The names in ``path`` as the host itself sees it, inside its mount namespace (its pool, say)."""
        holder = _read_pid(self.holder_pidfile)
        assert holder is not None
        listed = subprocess.run(["nsenter", "-t", str(holder), "-m", "ls", "-A", path], capture_output=True,
                                text=True, check=True, timeout=30)
        return listed.stdout.split()

    def pool_listing(self) -> list[str]:
        """The files in hvctl's storage pool on this host."""
        return self.listdir(str(DEFAULT_POOL_PATH))

    def stop(self, timeout: float = 15.0) -> None:
        """Guests first (QEMU outlives libvirtd), then sshd, libvirtd and virtlogd, then the holder, whose exit takes
        the netns, the veth pair and every mount with it."""
        pids = self.pids()
        for name, pid in pids.items():
            if name.startswith("qemu:"):
                _terminate(pid, timeout)
        for name in ("sshd.pid", "libvirtd.pid", "virtlogd.pid", "holder"):
            _terminate(pids.get(name), timeout)
        outer, _ = self.veth
        deadline = time.monotonic() + timeout
        # The kernel removes the veth pair with the netns, a moment after its last process exits.
        while subprocess.run(["ip", "link", "show", outer], capture_output=True).returncode == 0:
            if time.monotonic() > deadline:
                _run("ip", "link", "del", outer)
                break
            time.sleep(0.05)
        # What the daemons left running in the host's tree (libvirt's dnsmasq for a network it started) ends with
        # the host, as a machine's shutdown ends it.
        for pid in self._tree.processes() if self.cgroups_off is None else []:
            _terminate(pid, timeout)
        self._tree.remove(timeout)


def _run(*argv: str) -> None:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise HostUnreachable(f"`{' '.join(argv)}` failed: {result.stderr.strip()}")


def link_hosts(first: RemoteStyleHost, second: RemoteStyleHost, subnet_index: int) -> tuple[str, str]:
    """A wire between two remote-style hosts' network namespaces, as two machines on one LAN have: a veth pair with
    198.19.<subnet_index>.1/30 on ``first`` and .2 on ``second``. Nothing of it is in this machine's namespace; it
    goes with either host. Returns the two addresses (each host's underlay)."""
    one, two = _read_pid(first.holder_pidfile), _read_pid(second.holder_pidfile)
    assert one is not None and two is not None, "both hosts must be running"
    a, b = f"198.19.{subnet_index}.1", f"198.19.{subnet_index}.2"
    name_a, name_b = f"hvu{subnet_index}a", f"hvu{subnet_index}b"
    _run("nsenter", "-t", str(one), "-n", "ip", "link", "add", name_a, "type", "veth", "peer", "name", name_b,
         "netns", str(two))
    for pid, name, address in ((one, name_a, a), (two, name_b, b)):
        _run("nsenter", "-t", str(pid), "-n", "ip", "addr", "add", f"{address}/30", "dev", name)
        _run("nsenter", "-t", str(pid), "-n", "ip", "link", "set", name, "up")
    return a, b
