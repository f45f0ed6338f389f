from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from hvctl.console import console_size, console_tail, ready_line, wait_for_ready
from hvctl.errors import GuestTimeout


def test_marker_is_found_amid_kernel_noise(tmp_path: Path) -> None:
    log = tmp_path / "c.log"
    log.write_bytes(b"[    0.1] booting\r\n\x1b[0mnoise HVCTL-READY name=a kernel=6.1\r\nhvctl-tick 0\n")
    assert ready_line(log) == "HVCTL-READY name=a kernel=6.1"
    assert "\x1b" not in console_tail(log) and "\r" not in console_tail(log)


def test_wait_returns_when_the_guest_writes_its_marker(tmp_path: Path) -> None:
    log = tmp_path / "c.log"
    log.write_text("kernel booting\n")

    def guest() -> None:
        time.sleep(0.3)
        with log.open("a") as f:
            f.write("HVCTL-READY name=x\n")

    threading.Thread(target=guest).start()
    line, waited = wait_for_ready("x", log, timeout=10, still_running=lambda: True)
    assert line.startswith("HVCTL-READY") and 0.25 < waited < 5


def test_a_dead_guest_fails_at_once_with_its_console(tmp_path: Path) -> None:
    log = tmp_path / "c.log"
    log.write_text("Kernel panic - not syncing: Attempted to kill init!\n")
    started = time.monotonic()
    with pytest.raises(GuestTimeout, match="stopped while booting") as exc:
        wait_for_ready("x", log, timeout=60, still_running=lambda: False)
    assert time.monotonic() - started < 5
    assert "Kernel panic" in exc.value.console_tail


def test_timeout_carries_the_console_tail(tmp_path: Path) -> None:
    log = tmp_path / "c.log"
    log.write_text("".join(f"line {i}\n" for i in range(40)))
    with pytest.raises(GuestTimeout, match="within 0 s") as exc:
        wait_for_ready("x", log, timeout=0.2, still_running=lambda: True)
    assert exc.value.console_tail.splitlines() == [f"line {i}" for i in range(25, 40)]


def test_readiness_counts_only_what_this_boot_printed(tmp_path: Path) -> None:
    """The console file is appended to across boots: the marker of an earlier boot, before the offset taken at
    start, must not count; after virtlogd rotates the file (now shorter than the offset), it is read from its start."""
    log = tmp_path / "console.log"
    log.write_text("HVCTL-READY name=x boot=1\n")
    offset = console_size(log)
    with pytest.raises(GuestTimeout):
        wait_for_ready("x", log, timeout=0.2, still_running=lambda: True, offset=offset)
    with log.open("a") as f:
        f.write("booting\nHVCTL-READY name=x boot=2\n")
    assert wait_for_ready("x", log, timeout=10, still_running=lambda: True, offset=offset)[0].endswith("boot=2")
    log.write_text("HVCTL-READY name=x boot=3\n")  # rotated: a new, shorter file
    assert ready_line(log, offset=10_000) == "HVCTL-READY name=x boot=3"
