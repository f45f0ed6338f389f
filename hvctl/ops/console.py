"""hvctl console: an interactive session on a VM's serial console, through its host's libvirt connection.

``virDomain.openConsole`` gives a stream to the guest's serial pty on whatever host the VM runs on, local or over
``qemu+ssh``; no file, socket or port of that host is opened here. Bytes typed go to the guest, bytes the guest
prints come back, until the escape character (Ctrl-] as in ``virsh console``), the end of input, or the guest's
end. On a terminal, the terminal is put in raw mode for the session and restored after, whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import select
import termios
import threading
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from hvctl.context import Context
from hvctl.errors import InvalidSpec
from hvctl.host import ByteStream, DomainState

ESCAPE = b"\x1d"  # Ctrl-]
_POLL_S = 0.2
_QUIET_S = 1.0


@dataclass
class SessionEnd:
    reason: str  # "escape" | "input-ended" | "guest-ended" | "stopped"
    received: int = 0
    sent: int = 0


def attach(ctx: Context, name: str, inp: int, out: int, force: bool = False, escape: bytes = ESCAPE,
           watch: Callable[[bytes], bool] | None = None, connected: Callable[[], None] | None = None) -> SessionEnd:
    """Relay between the file descriptors ``inp``/``out`` and VM ``name``'s console until the session ends.

    ``watch`` sees everything the guest prints, in the order it came; when it returns True the session ends
    (reason "stopped"): how a script waits for a prompt or an answer without guessing at timing. When ``inp`` ends
    (a pipe, not a terminal), what the guest prints in answer is still relayed until it has been quiet for a
    second. ``connected`` is called once the console is open and the terminal is in raw mode."""
    record = ctx.ledger.vms.get(name)
    guest = ctx.host(record.host).find_guest(name)
    if guest is None or guest.state() is not DomainState.RUNNING:
        raise InvalidSpec(f"{name} is not running, so its console has nobody on the other end",
                          hint=f"hvctl start {name}; hvctl console-log {name} shows what it printed before")
    stream = guest.open_console(force=force)
    relay = _Relay(stream, out, escape, watch)
    reader = threading.Thread(target=relay.guest_to_out, name=f"console-{name}", daemon=True)
    try:
        with _raw(inp):
            reader.start()
            if connected is not None:
                connected()
            relay.inp_to_guest(inp)
    finally:
        relay.stop.set()
        reader.join(timeout=2)
        stream.close()
    return relay.end


class _Relay:
    """One console session's two directions: the guest's output to ``out`` (on a thread of its own) and the user's
    input to the guest, until either ends the session; ``end`` says how, and how many bytes went each way."""

    def __init__(self, stream: ByteStream, out: int, escape: bytes, watch: Callable[[bytes], bool] | None) -> None:
        self.stream, self.out, self.escape, self.watch = stream, out, escape, watch
        self.end = SessionEnd("guest-ended")
        self.stop = threading.Event()
        self.last_output = time.monotonic()

    def guest_to_out(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    data = self.stream.recv(time.monotonic() + _POLL_S)
                except TimeoutError:
                    continue
                if not data:
                    break  # the guest's side closed: it powered off, or another client forced the console
                self.last_output = time.monotonic()
                self.end.received += len(data)
                _write_all(self.out, data)
                if self.watch is not None and self.watch(data):
                    self.end.reason = "stopped"
                    break
        except Exception:  # noqa: BLE001 - a broken stream ends the session like a closed one
            pass
        finally:
            self.stop.set()

    def inp_to_guest(self, inp: int) -> None:
        """Until the escape, the guest's end, or (once ``inp`` has ended) a second with no output from the guest."""
        input_open = True
        while not self.stop.is_set():
            if not input_open:
                if time.monotonic() - self.last_output > _QUIET_S:
                    self.end.reason = "input-ended"
                    return
                self.stop.wait(_POLL_S)
                continue
            ready, _, _ = select.select([inp], [], [], _POLL_S)
            if not ready:
                continue
            data = os.read(inp, 4096)
            if not data:
                input_open = False
                self.last_output = time.monotonic()
                continue
            cut = data.find(self.escape)
            if cut >= 0:
                data = data[:cut]
            if data:
                self.stream.send(data, time.monotonic() + 10)
                self.end.sent += len(data)
            if cut >= 0:
                self.end.reason = "escape"
                return


@contextlib.contextmanager
def _raw(fd: int) -> Iterator[None]:
    """A terminal in raw mode (every key straight to the guest, Ctrl-C included) for the block; anything else as
    it is."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)  # not TCSAFLUSH: keep what was typed ahead
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
