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
class StateDir:
    root: Path

    @property
    def ledger(self) -> Path:
        return self.root / "ledger.sqlite3"

    @property
    def images(self) -> Path:
        return self.root / "images"

    def vm_dir(self, name: str) -> Path:
        return self.root / "vms" / check_name(name)

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
