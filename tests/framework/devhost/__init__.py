"""Run a libvirtd of our own: for tests, the demo, and "two hosts on one machine" migration setups.

Two shapes, both started inside a private mount namespace so that libvirtd never sees /dev/kvm. Where /dev/kvm exists
but cannot run a guest (a nested PVM hypervisor, as on the project's build machines), a libvirtd that sees it re-probes
QEMU on every capability lookup and a create takes ~44 s instead of ~0.3 s (measured, see ENVIRONMENT.md).

* ``private=True``: a daemon with its own /etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/log/libvirt and
  /var/cache/libvirt under ``root``, bind-mounted over the real paths inside its namespace. Nothing it does touches the
  machine's system daemon. Clients reach it only through its private unix socket (see ``uri``), which is root's
  alone (0700): a daemon that listened on TCP without authentication would give any local user root.
* ``private=False``: the machine's system daemon (default socket, ``qemu:///system``), with only /dev/kvm hidden and
  qemu.conf replaced inside the namespace. ``make demo`` uses this when no libvirtd answers.

The daemon is stopped by its own pid, never by name, and so is its virtlogd.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from hvctl.errors import HostUnreachable

_PRIVATE_DIRS = ("etc/libvirt", "run/libvirt", "var/lib/libvirt", "var/log/libvirt", "var/cache/libvirt")


def _set_conf(text: str, settings: dict[str, str]) -> str:
    """Append settings to a libvirt .conf file; later assignments win in libvirt's config parser."""
    lines = [text.rstrip("\n"), "", "# Set by framework.devhost"]
    lines += [f"{key} = {value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


@dataclass
class PrivateLibvirtd:
    root: Path
    private: bool = True
    # libvirt places each QEMU in a cgroup named after the domain. Two daemons on one machine would collide there
    # when they run a domain of the same name (as a migration does), so a second "host" turns cgroups off.
    cgroups: bool = True
    hide_kvm: bool = True
    host_uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def socket(self) -> Path:
        return (self.root / "run/libvirt/libvirt-sock") if self.private else Path("/run/libvirt/libvirt-sock")

    @property
    def uri(self) -> str:
        if not self.private:
            return "qemu:///system"
        return f"qemu:///system?socket={self.socket}"

    @property
    def pidfile(self) -> Path:
        return self.root / "libvirtd.pid"

    @property
    def virtlogd_pidfile(self) -> Path:
        return self.root / "virtlogd.pid"

    def _prepare(self) -> list[tuple[Path, str]]:
        """Write the daemon's config tree and return the (source, target) bind mounts."""
        self.root.mkdir(parents=True, exist_ok=True)
        binds: list[tuple[Path, str]] = []
        etc = self.root / "etc/libvirt"
        if not etc.exists():
            # /etc/libvirt/qemu holds the system daemon's persistent domain (and network) definitions; a private
            # "host" copying them would start life owning another daemon's VMs.
            shutil.copytree("/etc/libvirt", etc, symlinks=True,
                            ignore=lambda d, names: ["qemu"] if Path(d) == Path("/etc/libvirt") else [])
            (etc / "qemu").mkdir()
        if self.private:
            for rel in _PRIVATE_DIRS[1:]:
                (self.root / rel).mkdir(parents=True, exist_ok=True)
            (self.root / "var/lib/libvirt/qemu").mkdir(exist_ok=True)
            binds += [(self.root / rel, "/" + rel) for rel in _PRIVATE_DIRS]
        qemu_conf = {
            # With the daemon in a private mount namespace, QEMU's own per-domain namespace would try to move our
            # bind mounts and fail ("Unable to move ... mount to /dev/kvm").
            "namespaces": "[ ]",
            # Disks live in hvctl's state dir and are shared between "hosts" in migration tests; do not let the
            # destination's relabelling fight the source's.
            "remember_owner": "0",
            # stdio_handler stays libvirt's default, "logd": virtlogd, not QEMU, writes the console file and rotates
            # it at max_size, so a guest that prints without end cannot fill the host's disk.
        }
        # QEMU keeps running as the unprivileged libvirt-qemu user. That is not only safer: libvirt decides whether
        # KVM is usable by checking that user's access to /dev/kvm, and root could open the hidden mode-000 stand-in,
        # which makes libvirt re-probe QEMU (~30 s) on every create. Its VM directories are group-owned by it (0750).
        if not self.cgroups:
            qemu_conf["cgroup_controllers"] = "[ ]"
        (etc / "qemu.conf").write_text(_set_conf(Path("/etc/libvirt/qemu.conf").read_text(), qemu_conf))
        daemon_conf = {"host_uuid": f'"{self.host_uuid}"'}
        if self.private:
            # Root's alone: no read-only socket for everyone, and no polkit to ask (none runs here).
            daemon_conf |= {"unix_sock_rw_perms": '"0700"', "unix_sock_ro_perms": '"0700"',
                            "unix_sock_admin_perms": '"0700"', "auth_unix_rw": '"none"', "auth_unix_ro": '"none"'}
        (etc / "libvirtd.conf").write_text(_set_conf(Path("/etc/libvirt/libvirtd.conf").read_text(), daemon_conf))
        if not self.private:
            binds += [(etc / "qemu.conf", "/etc/libvirt/qemu.conf"),
                      (etc / "libvirtd.conf", "/etc/libvirt/libvirtd.conf")]
        if self.hide_kvm and Path("/dev/kvm").exists():
            blocker = self.root / "kvm-hidden"
            blocker.touch()
            blocker.chmod(0)
            binds.append((blocker, "/dev/kvm"))
        return binds

    def start(self, timeout: float = 30.0) -> PrivateLibvirtd:
        if self.running():
            return self
        binds = self._prepare()
        for stale in (self.pidfile, self.virtlogd_pidfile):
            stale.unlink(missing_ok=True)
        script = []
        for src, dst in binds:
            if src.is_dir():
                # The real target may not exist on a machine whose system libvirtd never ran.
                script.append(f"mkdir -p {shlex.quote(dst)}")
            script.append(f"mount --bind {shlex.quote(str(src))} {shlex.quote(dst)}")
        script.append(f"virtlogd -d -p {shlex.quote(str(self.virtlogd_pidfile))}")
        script.append(f"exec libvirtd -p {shlex.quote(str(self.pidfile))}")
        log = open(self.root / "libvirtd.log", "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            # `unshare` without --fork execs sh, which execs libvirtd: the Popen pid is libvirtd's own pid.
            self._proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-ec", "; ".join(script)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )
        finally:
            log.close()
        try:
            self._wait_until_answering(timeout)
        except BaseException:
            # Whatever went wrong (including Ctrl-C), leave no daemon behind.
            self.stop()
            raise
        return self

    def _wait_until_answering(self, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise HostUnreachable(f"libvirtd under {self.root} exited at start: {self._log_tail()}")
            if self.socket.exists() and self._answers(deadline - time.monotonic()):
                return
            time.sleep(0.1)
        raise HostUnreachable(f"libvirtd under {self.root} did not answer within {timeout:.0f} s")

    def _answers(self, timeout: float) -> bool:
        # A liveness check that does not need libvirt-python in this process. The first call can be slow: a daemon
        # that sees a usable-looking /dev/kvm probes QEMU's capabilities before it answers.
        try:
            result = subprocess.run(["virsh", "-q", "-c", self.uri, "version"], capture_output=True,
                                    timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            return False
        return result.returncode == 0

    def _log_tail(self) -> str:
        try:
            return (self.root / "libvirtd.log").read_text(errors="replace").strip().splitlines()[-1]
        except (OSError, IndexError):
            return "no log"

    def running(self) -> bool:
        pid = _read_pid(self.pidfile)
        return pid is not None and _alive(pid)

    def stop(self, timeout: float = 15.0) -> None:
        """Destroy what this daemon runs, then stop libvirtd and virtlogd by their own pids."""
        if self.running():
            subprocess.run(
                ["sh", "-c", f"for d in $(virsh -q -c {shlex.quote(self.uri)} list --name); do "
                             f"virsh -q -c {shlex.quote(self.uri)} destroy $d; done"],
                capture_output=True, timeout=60,
            )
        if self.private:
            # QEMU processes outlive libvirtd; the private run dir names every one this daemon started.
            for pidfile in (self.root / "run/libvirt/qemu").glob("*.pid"):
                _terminate(_read_pid(pidfile), timeout)
        _terminate(_read_pid(self.pidfile) or (self._proc.pid if self._proc else None), timeout)
        _terminate(_read_pid(self.virtlogd_pidfile), timeout)
        if self._proc is not None:
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._proc = None


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it is not running.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return False


def _terminate(pid: int | None, timeout: float) -> None:
    if pid is None or not _alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def boots_under(accel: str, kernel: Path, initrd: Path, timeout: float = 20.0) -> bool:
    """Boot the minimal image once with plain QEMU under ``accel`` ("kvm" or "tcg") and look for its probe marker.

    This runs before any libvirtd exists, to decide whether the daemon must be kept from seeing /dev/kvm. The
    device node alone proves nothing: on a nested PVM hypervisor it opens, and a stock kernel then crashes.
    """
    from hvctl.console import PROBE_MARKER

    if accel == "kvm" and not Path("/dev/kvm").exists():
        return False
    cmd = ["qemu-system-x86_64", "-accel", accel, "-machine", "q35", "-m", "128", "-nodefaults", "-display", "none",
           "-serial", "stdio", "-no-reboot", "-kernel", str(kernel), "-initrd", str(initrd),
           "-append", "console=ttyS0 panic=-1 hvctl.probe"]
    try:
        result = subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        return PROBE_MARKER.encode() in (exc.stdout or b"")
    return PROBE_MARKER.encode() in result.stdout


def main(argv: list[str] | None = None) -> int:
    """``python -m framework.devhost start|stop|uri ROOT [--system] [--no-cgroups] [--remote N [--hide DIR]]``, with
    tests/ on PYTHONPATH, for Makefiles and CI scripts."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m framework.devhost")
    parser.add_argument("action", choices=["start", "stop", "uri"])
    parser.add_argument("root", type=Path)
    parser.add_argument("--system", action="store_true", help="be the machine's qemu:///system daemon")
    parser.add_argument("--no-cgroups", action="store_true",
                        help="no per-domain cgroups: a second daemon on this machine that receives migrations")
    parser.add_argument("--hide-kvm", choices=["yes", "no", "auto"], default="yes",
                        help="auto: hide /dev/kvm only if a probe kernel fails to boot under KVM")
    parser.add_argument("--probe-image", type=Path, help="image dir with vmlinuz and initrd.img, for --hide-kvm auto")
    parser.add_argument("--remote", type=int, metavar="N",
                        help="a remote-style host instead (framework.devhost.remote): libvirtd and sshd in their own "
                             "namespaces at 198.18.N.2, reached as qemu+ssh; give the same N to stop it")
    parser.add_argument("--hide", type=Path, action="append", default=[],
                        help="with --remote: a directory of this machine the host must not see (the state dir)")
    args = parser.parse_args(argv)
    if args.remote is not None:
        from framework.devhost.remote import RemoteStyleHost

        host = RemoteStyleHost(args.root, index=args.remote, hide=tuple(args.hide))
        if args.action == "start":
            args.root.mkdir(mode=0o755, parents=True, exist_ok=True)
            host.start()
        elif args.action == "stop":
            host.stop()
            return 0
        print(host.uri)
        return 0
    hide = args.hide_kvm == "yes"
    if args.hide_kvm == "auto" and args.action == "start":
        if args.probe_image is None:
            parser.error("--hide-kvm auto needs --probe-image")
        hide = not boots_under("kvm", args.probe_image / "vmlinuz", args.probe_image / "initrd.img")
        print(f"KVM {'is unusable: libvirtd will not see /dev/kvm' if hide else 'works'}", file=sys.stderr)
    daemon = PrivateLibvirtd(args.root, private=not args.system, hide_kvm=hide,
                             cgroups=not args.no_cgroups)
    if args.action == "start":
        daemon.start()
        print(daemon.uri)
    elif args.action == "stop":
        daemon.stop()
    else:
        print(daemon.uri)
    return 0
