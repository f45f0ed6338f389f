"""Reading a guest's serial console log: readiness markers and the tail shown when something goes wrong.

The log is a file on the VM's host, written by virtlogd. On this machine it is read as a file; on another host it
is a volume of hvctl's storage pool there, read through libvirt (``VolumeConsole``): no file of the host is visible
to the controller. Both are ``ConsoleSource``s, and the functions below take either.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from hvctl.errors import GuestTimeout, HypervisorError

if TYPE_CHECKING:
    from hvctl.host import Pool

READY_MARKER = "HVCTL-READY"
# Printed by the minimal image when booted with `hvctl.probe`: proof that a kernel ran under the accelerator tried.
PROBE_MARKER = "HVCTL-PROBE-OK"
# Guests print ANSI colour and carriage returns; strip them so a tail is readable in a one-line error.
_NOISE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


class ConsoleSource(Protocol):
    def size(self) -> int:
        """Bytes in the log now (0 if there is none yet)."""

    def read_bytes(self, offset: int) -> bytes:
        """The log from ``offset`` on; from its start if it is now shorter than that (virtlogd rotated it); b"" if
        there is none."""


@dataclass(frozen=True)
class FileConsole:
    path: Path

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def read_bytes(self, offset: int) -> bytes:
        try:
            with self.path.open("rb") as f:
                f.seek(offset if f.seek(0, 2) >= offset else 0)
                return f.read()
        except FileNotFoundError:
            return b""


@dataclass(frozen=True)
class VolumeConsole:
    """A console log in a host's storage pool, read over the libvirt connection with volume downloads."""

    pool: Pool
    volume: str

    def size(self) -> int:
        # virtlogd made the file behind libvirt's back; a lookup re-reads a known volume's size by itself. While
        # another command uploads into the pool, libvirt refuses the refresh: this poll reads what it knows.
        self.pool.refresh(wait=False)
        found = self.pool.volume(self.volume)
        return found.capacity if found is not None else 0

    def read_bytes(self, offset: int) -> bytes:
        size = self.size()  # one refresh per read: a poll costs a refresh, a lookup and a download
        if size < offset:
            offset = 0
        if size == offset:
            return b""
        sink = io.BytesIO()
        try:
            self.pool.download(self.volume, sink, offset, size - offset)
        except HypervisorError:
            return b""  # deleted or rotated between the refresh and the read: the next poll reads it again
        return sink.getvalue()


def _source(where: Path | ConsoleSource) -> ConsoleSource:
    return FileConsole(where) if isinstance(where, Path) else where


def console_size(where: Path | ConsoleSource) -> int:
    """Where the console log ends now: a boot started after this reads its readiness from here on."""
    return _source(where).size()


def read_console(where: Path | ConsoleSource, offset: int = 0) -> str:
    """The console from ``offset`` on; from the start if the log is now shorter (virtlogd rotated it)."""
    return _NOISE.sub("", _source(where).read_bytes(offset).decode(errors="replace"))


def console_tail(where: Path | ConsoleSource, lines: int = 15) -> str:
    return "\n".join(read_console(where).splitlines()[-lines:])


def ready_line(where: Path | ConsoleSource, offset: int = 0) -> str | None:
    for line in read_console(where, offset).splitlines():
        if READY_MARKER in line:
            return line[line.index(READY_MARKER):]
    return None


def wait_for_ready(
    name: str, path: Path | ConsoleSource, timeout: float, still_running: Callable[[], bool], poll: float = 0.05,
    offset: int = 0,
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
