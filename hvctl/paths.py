"""Where hvctl keeps things under its state directory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from hvctl.errors import LedgerError
from hvctl.names import check_name

DEFAULT_STATE_DIR = Path("/var/lib/hvctl")
# sockaddr_un.sun_path holds 108 bytes; the agent socket lives at STATE/vms/NAME/agent.sock.
MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class VMFiles:
    """One incarnation of a VM on disk. A checkpoint-migration boots a second incarnation next to the first
    (generation 1 beside 0, or back), so both can exist until the move commits."""

    dir: Path
    overlay: Path
    seed: Path
    console_log: Path
    agent_socket: Path


def make_private_dir(path: Path, qemu_gid: int | None, exist_ok: bool = False) -> None:
    """A VM's directory: its disk, seed (the VM's SSH host key and agent token), console log and agent socket.
    0750 with QEMU's group, so QEMU can reach its files and no other local user can; 0700 where QEMU runs as root.
    The files inside are 0600/0640 besides (libvirt's DAC driver hands them to QEMU's user while it runs)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=exist_ok)
    if qemu_gid is not None:
        os.chown(path, 0, qemu_gid)
    os.chmod(path, 0o750 if qemu_gid is not None else 0o700)


def write_new(path: Path, data: bytes, mode: int) -> Path:
    """A new file, born with ``mode`` (a key is never readable by others, even for an instant); refused if
    ``path`` exists. Callers write a temporary name and rename it into place."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def replace_atomically(path: Path, data: bytes, mode: int) -> None:
    """``path`` holds ``data`` with ``mode``, written beside it under a temporary name and renamed over it; a
    failure leaves neither the temporary file nor a partial ``path``."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.unlink(missing_ok=True)
    try:
        write_new(partial, data, mode).replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class StateDir:
    root: Path

    @property
    def ledger(self) -> Path:
        return self.root / "ledger.sqlite3"

    @property
    def images(self) -> Path:
        return self.root / "images"

    def vm_dir(self, name: str, generation: int = 0) -> Path:
        # Names never contain '.', so NAME.gN cannot be another VM's directory.
        return self.root / "vms" / (check_name(name) + (f".g{generation}" if generation else ""))

    def vm_files(self, name: str, generation: int = 0) -> VMFiles:
        d = self.vm_dir(name, generation)
        files = VMFiles(dir=d, overlay=d / "disk.qcow2", seed=d / "seed.iso", console_log=d / "console.log",
                        agent_socket=d / "agent.sock")
        # ensure() guarantees generation 0 for every legal name; a later incarnation's ".gN" may not fit.
        if len(str(files.agent_socket)) > MAX_SOCKET_PATH:
            raise LedgerError(f"{files.agent_socket} would exceed the {MAX_SOCKET_PATH}-byte unix socket limit",
                              hint="a shorter state dir or VM name")
        return files

    def next_vm_files(self, name: str, current_overlay: Path) -> VMFiles:
        """Where a VM's files go when a migration gives it new ones: generation 1 beside 0, or back to 0."""
        _, _, gen = current_overlay.parent.name.partition(".g")
        return self.vm_files(name, 0 if gen.isdigit() and int(gen) else 1)

    def overlay(self, name: str) -> Path:
        return self.vm_dir(name) / "disk.qcow2"

    def console_log(self, name: str) -> Path:
        return self.vm_dir(name) / "console.log"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def pki(self) -> Path:
        """hvctl's CA and client certificate for qemu+tls (hvctl.pki)."""
        return self.root / "pki"

    def agent_socket(self, name: str) -> Path:
        return self.vm_dir(name) / "agent.sock"

    def storage_gib(self) -> int:
        """The size of the filesystem VM disks are made on, in whole GiB."""
        st = os.statvfs(self.root / "vms")
        return st.f_blocks * st.f_frsize // 2**30

    def ensure(self) -> None:
        """Create the layout. The root and vms/ are 0711: QEMU (an unprivileged user) must pass through them to its
        VM's directory, but nobody may list them; each VM's directory is closed to all but root and QEMU
        (``make_private_dir``). Images are shared, tenant-free and stay 0755."""
        try:
            for path, mode in ((self.root, 0o711), (self.root / "vms", 0o711), (self.images, 0o755)):
                path.mkdir(mode=mode, parents=True, exist_ok=True)
                if path.is_symlink():
                    continue  # a test's shared image store: not ours to change
                os.chmod(path, mode)
        except OSError as exc:
            raise LedgerError(f"state dir {self.root} is not writable: {exc.strerror}",
                              hint="run as root or pass --state-dir") from None
        probe = self.agent_socket("x" * 63)
        if len(str(probe)) > MAX_SOCKET_PATH:
            raise LedgerError(f"state dir {self.root} is too deep: agent socket paths would exceed "
                              f"{MAX_SOCKET_PATH} bytes", hint="use a shorter --state-dir")
