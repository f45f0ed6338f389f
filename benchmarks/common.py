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
