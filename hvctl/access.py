"""SSH into VMs with paramiko: interactive shells, commands with streamed output, and file copies.

The guest's host key is the one hvctl generated and wrote into its seed, so it is pinned from the very first
connection; a guest presenting any other key is refused loudly (no trust on first use, no known_hosts prompts).
"""

from __future__ import annotations

import base64
import contextlib
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import paramiko

from hvctl.errors import HvctlError
from hvctl.ledger import VMRecord
from hvctl.limits import DEFAULT_MAX_DOWNLOAD_BYTES


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


@contextlib.contextmanager
def connect(record: VMRecord, identity: Path, user: str = "root", address: str | None = None,
            timeout: float = 15.0, direct: bool = False) -> Iterator[paramiko.SSHClient]:
    """An SSH session with the host key hvctl generated pinned. By default through the VM's forwarded port;
    ``direct``: to port 22 at the static address of its production NIC (``create --bridge/--network --ip``)."""
    if not record.host_pubkey:
        raise AccessError(f"VM {record.name} has no host key on record; it was not made from an SSH-capable image")
    port = record.ssh_port
    if direct:
        net = record.spec.network
        if net is None or net.address is None:
            raise AccessError(f"VM {record.name} has no static address on a production network",
                              hint="create it with --bridge or --network and --ip")
        address, port = str(net.address.ip), 22
    if address is None:
        bind = str(record.spec.ssh_bind)
        address = "127.0.0.1" if bind == "0.0.0.0" else bind
    key_type, key_b64 = record.host_pubkey.split()[:2]
    pinned = paramiko.PKey.from_type_string(key_type, base64.b64decode(key_b64))
    client = paramiko.SSHClient()
    # Only the pinned key is known; RejectPolicy refuses anything else instead of learning it.
    client.get_host_keys().add(address if port == 22 else f"[{address}]:{port}", key_type, pinned)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(address, port=port, username=user, pkey=_load_key(identity), timeout=timeout,
                       banner_timeout=timeout, auth_timeout=timeout, allow_agent=False, look_for_keys=False)
    except paramiko.BadHostKeyException as exc:
        raise HostKeyMismatch(
            f"HOST KEY MISMATCH for {record.name} at {address}:{port}: it presented "
            f"{exc.key.get_name()} {exc.key.fingerprint}, hvctl generated {pinned.fingerprint}. "
            "Refusing to connect: something else is answering on this VM's port.") from None
    except paramiko.AuthenticationException:
        raise AccessError(f"{record.name} refused the key {identity} for user {user}",
                          hint="tenants' keys open only their own tenant's VMs (`hvctl key list`)") from None
    except (paramiko.SSHException, OSError) as exc:
        raise AccessError(f"cannot SSH to {record.name} at {address}:{port}: {exc}") from None
    try:
        yield client
    finally:
        client.close()


def wait_for_ssh(record: VMRecord, identity: Path, timeout: float) -> float:
    """Wait until an authenticated SSH session with the pinned host key succeeds; returns the seconds waited."""
    started = time.monotonic()
    last: Exception | None = None
    while time.monotonic() - started < timeout:
        try:
            with connect(record, identity, timeout=5):
                return time.monotonic() - started
        except HostKeyMismatch:
            raise
        except AccessError as exc:
            last = exc
        time.sleep(0.25)
    raise AccessError(f"SSH to {record.name} not ready within {timeout:.0f} s ({last})")


def run_command(record: VMRecord, identity: Path, command: str, stdout: BinaryIO, stderr: BinaryIO,
                user: str = "root", direct: bool = False) -> int:
    """Run a command, streaming its output as it comes; returns its exit status."""
    with connect(record, identity, user, direct=direct) as client:
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


def interactive_shell(record: VMRecord, identity: Path, user: str = "root", direct: bool = False) -> int:
    """A terminal session: the local tty goes raw and bytes flow both ways until the remote shell exits."""
    with connect(record, identity, user, direct=direct) as client:
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
         direct: bool = False, max_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES, overwrite: bool = True) -> int:
    """Copy one file in (upload) or out over SFTP; returns the bytes copied. A download is bounded by
    ``max_bytes`` and lands with mode 0600 (see ``download``)."""
    with connect(record, identity, user, direct=direct) as client:
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
