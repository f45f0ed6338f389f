"""Reading a guest's serial console log: readiness markers and the tail shown when something goes wrong."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

from hvctl.errors import GuestTimeout

READY_MARKER = "HVCTL-READY"
# Printed by the minimal image when booted with `hvctl.probe`: proof that a kernel ran under the accelerator tried.
PROBE_MARKER = "HVCTL-PROBE-OK"
# Guests print ANSI colour and carriage returns; strip them so a tail is readable in a one-line error.
_NOISE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


def console_size(path: Path) -> int:
    """Where the console file ends now: a boot started after this reads its readiness from here on."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def read_console(path: Path, offset: int = 0) -> str:
    """The console from ``offset`` on; from the start if the file is now shorter (virtlogd rotated it)."""
    try:
        with path.open("rb") as f:
            if f.seek(0, 2) >= offset:
                f.seek(offset)
            else:
                f.seek(0)
            return _NOISE.sub("", f.read().decode(errors="replace"))
    except FileNotFoundError:
        return ""


def console_tail(path: Path, lines: int = 15) -> str:
    return "\n".join(read_console(path).splitlines()[-lines:])


def ready_line(path: Path, offset: int = 0) -> str | None:
    for line in read_console(path, offset).splitlines():
        if READY_MARKER in line:
            return line[line.index(READY_MARKER):]
    return None


def wait_for_ready(
    name: str, path: Path, timeout: float, still_running: Callable[[], bool], poll: float = 0.05, offset: int = 0
) -> tuple[str, float]:
    """Wait until the guest prints its readiness marker after ``offset`` (where the file ended before this boot).
    Returns the marker line and the seconds waited.

    "Up" means the guest said so, not that libvirt says "running". A guest that dies while booting fails at once
    rather than at the timeout.
    """
    start = time.monotonic()
    next_liveness = start
    while True:
        line = ready_line(path, offset)
        if line is not None:
            return line, time.monotonic() - start
        now = time.monotonic()
        if now - start > timeout:
            raise GuestTimeout(f"guest {name} did not report ready within {timeout:.0f} s",
                               console_tail=console_tail(path))
        if now >= next_liveness:
            if not still_running():
                raise GuestTimeout(f"guest {name} stopped while booting", console_tail=console_tail(path))
            next_liveness = now + 0.5
        time.sleep(poll)
