"""SSH into VMs with paramiko: interactive shells, commands with streamed output, and file copies.

The guest's host key is the one hvctl generated and wrote into its seed, so it is pinned from the very first
connection; a guest presenting any other key is refused loudly (no trust on first use, no known_hosts prompts).
"""

from __future__ import annotations

import base64
import contextlib
import os
import select
import shlex
import sys
import termios
import time
import tty
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import parse_qsl, urlsplit

import paramiko

from hvctl.errors import HvctlError
from hvctl.ledger import VMRecord
from hvctl.limits import DEFAULT_MAX_DOWNLOAD_BYTES

if TYPE_CHECKING:
    from hvctl.context import Context


class AccessError(HvctlError):
    exit_code = 11


class HostKeyMismatch(AccessError):
    exit_code = 12


def _load_key(path: Path) -> paramiko.PKey:
    try:
        return paramiko.PKey.from_path(str(path))
    except FileNotFoundError:
        raise AccessError(f"identity file {path} does not exist") from None
    except (paramiko.SSHException, ValueError) as exc:
        raise AccessError(f"cannot load identity file {path}: {exc}") from None


@dataclass(frozen=True)
class Route:
    """Where an SSH client reaches a VM: ``address``:``port``, dialled directly, or through ``jump``, a command
    whose stdin and stdout carry the connection (an ``ssh -W`` through the VM's host). The guest's host key is
    checked end to end either way: the jump only carries bytes."""

    address: str
    port: int
    jump: tuple[str, ...] = ()

    @classmethod
    def forward(cls, record: VMRecord) -> Route:
        """The VM's user-mode SSH forward, as seen on its host."""
        bind = str(record.spec.ssh_bind)
        return cls("127.0.0.1" if bind == "0.0.0.0" else bind, record.ssh_port)

    @classmethod
    def production(cls, record: VMRecord) -> Route:
        """Port 22 at the static address of its production NIC (``create --bridge/--network --ip``)."""
        net = record.spec.network
        if net is None or net.address is None:
            raise AccessError(f"VM {record.name} has no static address on a production network",
                              hint="create it with --bridge or --network and --ip")
        return cls(str(net.address.ip), 22)

    def describe(self) -> str:
        return f"{self.address}:{self.port}" + (f" via {self.jump[-1]}" if self.jump else "")


def ssh_jump(uri: str, address: str, port: int) -> tuple[str, ...]:
    """The command that reaches ``address``:``port`` as seen from the host at ``uri``: the same ssh that libvirt's
    ``qemu+ssh`` transport runs to that host (its ``command``, ``keyfile``, ``known_hosts`` and ``no_verify``
    parameters, its user and port), with ``-W`` in place of the remote command. So a VM's SSH forward on a remote
    host's loopback is reached with the admin's credentials for that host, and nothing listens anywhere else."""
    argv, host = _host_ssh(uri, f"the VM's host is reached as {uri}, with no SSH to the host to jump through",
                           "give the VM a production NIC (create --bridge/--network --ip) and use --direct")
    return (argv[0], "-W", f"{address}:{port}", *argv[1:], "--", host)


def host_command(uri: str, script: str) -> tuple[str, ...]:
    """The command that runs ``script`` (by sh) on the host at ``uri``, over the ssh its ``qemu+ssh`` transport
    uses: for what libvirt cannot do on a host (a VXLAN device, say)."""
    argv, host = _host_ssh(uri, f"the host is reached as {uri}, with no SSH to it to run commands",
                           "reach the host over qemu+ssh, or make what is needed there by hand")
    return (*argv, "--", host, f"sh -c {shlex.quote(script)}")


def _host_ssh(uri: str, refusal: str, hint: str) -> tuple[list[str], str]:
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if "+ssh" not in scheme and "+libssh" not in scheme:
        raise AccessError(refusal, hint=hint)
    query = dict(parse_qsl(parts.query))
    argv = [query.get("command", "ssh"), "-o", "BatchMode=yes"]
    if parts.port:
        argv += ["-p", str(parts.port)]
    if parts.username:
        argv += ["-l", parts.username]
    if "keyfile" in query:
        argv += ["-i", query["keyfile"], "-o", "IdentitiesOnly=yes"]
    if "known_hosts" in query:
        argv += ["-o", f"UserKnownHostsFile={query['known_hosts']}"]
    if query.get("no_verify") == "1":
        argv += ["-o", "StrictHostKeyChecking=no"]  # as libvirt's own transport does with no_verify=1
    else:
        argv += ["-o", "StrictHostKeyChecking=yes"]
    return argv, parts.hostname or "localhost"


def route_for(ctx: Context, record: VMRecord, direct: bool = False) -> Route:
    """How this machine reaches ``record``'s SSH: its production NIC with ``direct``; else its forward, which
    sits on its host's loopback, so a VM on another host is reached through a jump to that host."""
    if direct:
        return Route.production(record)
    route = Route.forward(record)
    if ctx.is_this_machine(record.host):
        return route
    return Route(route.address, route.port, ssh_jump(ctx.ledger.hosts.get(record.host).uri, route.address, route.port))


def openssh_command(record: VMRecord, route: Route, identity: Path, user: str, known_hosts: Path) -> list[str]:
    """The same connection as ``connect``, as an OpenSSH command line for a tenant's own tools: the VM's pinned host
    key is looked up under the alias ``hvctl-NAME`` in ``known_hosts`` (see ``pin_line``), strictly."""
    argv = ["ssh", "-o", f"HostKeyAlias=hvctl-{record.name}", "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes", "-i", str(identity), "-p", str(route.port)]
    if route.jump:
        argv += ["-o", f"ProxyCommand={shlex.join(route.jump)}"]
    return [*argv, f"{user}@{route.address}"]


def pin_line(record: VMRecord) -> str:
    """The VM's known_hosts line, under the alias ``openssh_command`` uses."""
    if not record.host_pubkey:
        raise AccessError(f"VM {record.name} has no host key on record; it was not made from an SSH-capable image")
    key_type, key_b64 = record.host_pubkey.split()[:2]
    return f"hvctl-{record.name} {key_type} {key_b64}"


def write_pin(known_hosts: Path, record: VMRecord) -> None:
    """Put the VM's pinned key into ``known_hosts``, replacing an older one of the same VM."""
    line = pin_line(record)
    alias = line.split()[0]
    kept = [old for old in (known_hosts.read_text().splitlines() if known_hosts.exists() else [])
            if old.split()[:1] != [alias]]
    partial = known_hosts.with_name(f".{known_hosts.name}.{os.getpid()}")
    partial.write_text("".join(f"{old}\n" for old in [*kept, line]))
    os.replace(partial, known_hosts)


@contextlib.contextmanager
def connect(record: VMRecord, identity: Path, user: str = "root", route: Route | None = None,
            timeout: float = 15.0) -> Iterator[paramiko.SSHClient]:
    """An SSH session with the host key hvctl generated pinned, along ``route`` (by default the VM's forward on
    this machine)."""
    if not record.host_pubkey:
        raise AccessError(f"VM {record.name} has no host key on record; it was not made from an SSH-capable image")
    route = route or Route.forward(record)
    address, port = route.address, route.port
    key_type, key_b64 = record.host_pubkey.split()[:2]
    pinned = paramiko.PKey.from_type_string(key_type, base64.b64decode(key_b64))
    client = paramiko.SSHClient()
    # Only the pinned key is known; RejectPolicy refuses anything else instead of learning it.
    client.get_host_keys().add(address if port == 22 else f"[{address}]:{port}", key_type, pinned)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    key = _load_key(identity)
    sock = paramiko.ProxyCommand(shlex.join(route.jump)) if route.jump else None
    try:
        try:
            client.connect(address, port=port, username=user, pkey=key, timeout=timeout, banner_timeout=timeout,
                           auth_timeout=timeout, allow_agent=False, look_for_keys=False,
                           sock=sock)  # paramiko takes any socket-like object
        except paramiko.BadHostKeyException as exc:
            raise HostKeyMismatch(
                f"HOST KEY MISMATCH for {record.name} at {route.describe()}: it presented "
                f"{exc.key.get_name()} {exc.key.fingerprint}, hvctl generated {pinned.fingerprint}. "
                "Refusing to connect: something else is answering on this VM's port.") from None
        except paramiko.AuthenticationException:
            raise AccessError(f"{record.name} refused the key {identity} for user {user}",
                              hint="tenants' keys open only their own tenant's VMs (`hvctl key list`)") from None
        except (paramiko.SSHException, OSError) as exc:
            raise AccessError(f"cannot SSH to {record.name} at {route.describe()}: {_why(exc, sock)}") from None
    except BaseException:
        client.close()
        if sock is not None:
            sock.close()
        raise
    try:
        yield client
    finally:
        client.close()


def _why(exc: Exception, sock: paramiko.ProxyCommand | None) -> str:
    """What went wrong, with the jump's own complaint (ssh's last line on stderr) where it said one."""
    if sock is not None and sock.process.poll() is not None and sock.process.stderr is not None:
        said = [line for line in sock.process.stderr.read().decode(errors="replace").splitlines() if line.strip()]
        if said:
            return f"the jump through the VM's host failed: {said[-1].strip()}"
    return str(exc) or type(exc).__name__


def wait_for_ssh(record: VMRecord, identity: Path, timeout: float, route: Route | None = None) -> float:
    """Wait until an authenticated SSH session with the pinned host key succeeds; returns the seconds waited."""
    started = time.monotonic()
    last: Exception | None = None
    while time.monotonic() - started < timeout:
        try:
            with connect(record, identity, route=route, timeout=5):
                return time.monotonic() - started
        except HostKeyMismatch:
            raise
        except AccessError as exc:
            last = exc
        time.sleep(0.25)
    raise AccessError(f"SSH to {record.name} not ready within {timeout:.0f} s ({last})")


def run_command(record: VMRecord, identity: Path, command: str, stdout: BinaryIO, stderr: BinaryIO,
                user: str = "root", route: Route | None = None) -> int:
    """Run a command, streaming its output as it comes; returns its exit status."""
    with connect(record, identity, user, route) as client:
        transport = client.get_transport()
        assert transport is not None
        channel = transport.open_session()
        channel.exec_command(command)
        channel.shutdown_write()
        while True:
            if channel.recv_ready():
                stdout.write(channel.recv(32768))
                stdout.flush()
            if channel.recv_stderr_ready():
                stderr.write(channel.recv_stderr(32768))
                stderr.flush()
            if channel.exit_status_ready() and not channel.recv_ready() and not channel.recv_stderr_ready():
                break
            select.select([channel], [], [], 0.1)
        return int(channel.recv_exit_status())


def interactive_shell(record: VMRecord, identity: Path, user: str = "root", route: Route | None = None) -> int:
    """A terminal session: the local tty goes raw and bytes flow both ways until the remote shell exits."""
    with connect(record, identity, user, route) as client:
        transport = client.get_transport()
        assert transport is not None
        channel = transport.open_session()
        size = os.get_terminal_size() if sys.stdin.isatty() else os.terminal_size((80, 24))
        channel.get_pty(term=os.environ.get("TERM", "xterm"), width=size.columns, height=size.lines)
        channel.invoke_shell()
        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd) if sys.stdin.isatty() else None
        try:
            if saved is not None:
                tty.setraw(fd)
            while True:
                ready, _, _ = select.select([channel, fd], [], [])
                if channel in ready:
                    data = channel.recv(32768)
                    if not data:
                        break
                    os.write(sys.stdout.fileno(), data)
                if fd in ready:
                    data = os.read(fd, 1024)
                    if not data:
                        channel.shutdown_write()
                        continue
                    channel.sendall(data)
        except OSError:
            pass
        finally:
            if saved is not None:
                termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        return int(channel.recv_exit_status())


def copy(record: VMRecord, identity: Path, source: str, dest: str, upload: bool, user: str = "root",
         route: Route | None = None, max_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES, overwrite: bool = True) -> int:
    """Copy one file in (upload) or out over SFTP; returns the bytes copied. A download is bounded by
    ``max_bytes`` and lands with mode 0600 (see ``download``)."""
    with connect(record, identity, user, route) as client:
        sftp = client.open_sftp()
        try:
            if upload:
                attrs = sftp.put(source, dest)
                return int(attrs.st_size or 0)
            return download(sftp, source, Path(dest), max_bytes, overwrite)
        except FileNotFoundError as exc:
            raise AccessError(f"no such file: {exc.filename or (dest if upload else source)}") from None
        except OSError as exc:
            raise AccessError(f"copy failed: {exc}") from None
        finally:
            sftp.close()


def download(sftp: paramiko.SFTPClient, source: str, dest: Path, max_bytes: int, overwrite: bool) -> int:
    """Copy a file out of an untrusted guest. Its size is checked before any byte moves, and every byte is counted
    as it arrives, so a file that lies about its size or keeps growing (a symlink to /dev/zero) is cut off at the
    size it claimed. The bytes go to a fresh 0600 file beside ``dest``, which takes ``dest``'s name only when
    complete; an existing ``dest`` is replaced only with ``overwrite``."""
    size = sftp.stat(source).st_size or 0
    if size > max_bytes:
        raise AccessError(f"{source} is {size} bytes, over the {max_bytes}-byte download limit",
                          hint="raise the limit with --max-bytes if this is expected")
    if dest.is_dir():
        raise AccessError(f"{dest} is a directory; give the file's name")
    if not overwrite and (dest.exists() or dest.is_symlink()):
        raise AccessError(f"{dest} already exists", hint="--force replaces it")
    partial = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        copied = 0
        with os.fdopen(fd, "wb") as out, sftp.open(source, "rb") as src:
            if size:
                src.prefetch(size)
            while chunk := src.read(1 << 20):
                copied += len(chunk)
                if copied > size:
                    raise AccessError(f"{source} grew past the {size} bytes it had when the copy began; "
                                      "the partial copy was removed")
                out.write(chunk)
        if copied != size:
            raise AccessError(f"{source} shrank to {copied} of {size} bytes during the copy; "
                              "the partial copy was removed")
        if overwrite:
            os.replace(partial, dest)
        else:
            os.link(partial, dest)  # FileExistsError if something appeared meanwhile: never replaced silently
            partial.unlink()
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return copied
