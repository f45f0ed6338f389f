"""Where hvctl keeps things under its state directory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from hvctl.errors import LedgerError
from hvctl.spec import check_name

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

    def seed(self, name: str) -> Path:
        return self.vm_dir(name) / "seed.iso"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    def agent_socket(self, name: str) -> Path:
        return self.vm_dir(name) / "agent.sock"

    def ensure(self) -> None:
        """Create the layout. Directories are 0755: QEMU runs as libvirt-qemu and must traverse them to its disk."""
        try:
            for path in (self.root, self.root / "vms", self.images):
                path.mkdir(parents=True, exist_ok=True)
                os.chmod(path, 0o755)
        except OSError as exc:
            raise LedgerError(f"state dir {self.root} is not writable: {exc.strerror}",
                              hint="run as root or pass --state-dir") from None
        probe = self.agent_socket("x" * 63)
        if len(str(probe)) > MAX_SOCKET_PATH:
            raise LedgerError(f"state dir {self.root} is too deep: agent socket paths would exceed "
                              f"{MAX_SOCKET_PATH} bytes", hint="use a shorter --state-dir")
