"""Typed errors. The library raises these; only the CLI turns them into a one-line message and an exit code."""

from __future__ import annotations


class HvctlError(Exception):
    """Base class. ``hint`` is an optional second sentence telling the user what to do about it."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class InvalidSpec(HvctlError):
    """The request itself is wrong: a bad name, a size out of bounds, an unknown image."""

    exit_code = 2


class NotFound(HvctlError):
    exit_code = 3


class AlreadyExists(HvctlError):
    exit_code = 4


class HostUnreachable(HvctlError):
    """libvirtd did not answer at the given URI."""

    exit_code = 5


class HypervisorError(HvctlError):
    """libvirt refused or failed an operation on a reachable host."""

    exit_code = 6


class GuestTimeout(HvctlError):
    """The guest never reported itself up. ``console_tail`` carries the end of its console for diagnosis."""

    exit_code = 7

    def __init__(self, message: str, *, console_tail: str = "", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.console_tail = console_tail


class ImageError(HvctlError):
    """A guest image is missing, corrupt, or failed to build."""

    exit_code = 8


class LedgerError(HvctlError):
    """The state database cannot be opened or is from a newer hvctl."""

    exit_code = 9


class MigrationFailed(HvctlError):
    """A migration failed after it began; the VM is still where it was."""

    exit_code = 15


# Every exit status hvctl gives, each with one meaning. The classes that carry them live with the code that raises
# them (a test finds every HvctlError subclass and checks that its code is here, and that no two share one unless
# one is the other's subclass); the README's table is printed from this one (`python -m hvctl.errors`, also
# checked by a test).
EXIT_CODES: dict[int, tuple[str, str]] = {
    0: ("", "success"),
    1: ("HvctlError", "some of what a command reports on failed (doctor's checks, evacuate's VMs, host prepare's "
                      "steps), or an unexpected error"),
    2: ("InvalidSpec", "bad request: a usage error, an invalid name, size, option or file, a refused device address"),
    3: ("NotFound", "no such VM, host, image, snapshot, key or workload"),
    4: ("AlreadyExists", "a VM, host, snapshot or domain of that name exists"),
    5: ("HostUnreachable", "a host's libvirtd did not answer (or, with host prepare, its SSH)"),
    6: ("HypervisorError", "libvirt refused or failed an operation on a reachable host"),
    7: ("GuestTimeout", "the guest or its agent never came up; the console's last lines follow"),
    8: ("ImageError", "an image is missing, corrupt, failed to build, or an import was refused"),
    9: ("LedgerError", "the ledger cannot be opened or is from a newer hvctl"),
    10: ("AgentError", "the in-guest agent refused or failed a request"),
    11: ("AccessError", "SSH into the VM was refused or failed"),
    12: ("HostKeyMismatch", "the VM's SSH host key is not the one hvctl pinned"),
    13: ("QuotaExceeded", "admission refused: a tenant's quota or a host's capacity would be exceeded (the numbers "
                          "follow)"),
    14: ("WorkloadFailed", "a workload in the VM failed"),
    15: ("MigrationFailed", "a migration failed after it began; the VM is still on its source"),
    16: ("OperationBusy", "another command is operating on the VM (see --wait)"),
    17: ("NoValidHost", "no host can take the VM: the scheduler found none, or the named host is disabled"),
    18: ("DeviceTaken", "another VM claimed the device first"),
    19: ("NoGpuAvailable", "the GPUs asked for cannot be passed through on that host (held, not viable, absent)"),
    20: ("ServeFailed", "the model server in the VM failed to start, load or answer"),
    124: ("", "exec: the command in the guest ran past --timeout"),
    130: ("", "interrupted (Ctrl-C)"),
}


def exit_code_table() -> str:
    """The README's table of exit statuses, in Markdown."""
    rows = ["| status | error | meaning |", "|---|---|---|"]
    rows += [f"| {code} | {f'`{name}`' if name else ''} | {meaning} |" for code, (name, meaning) in EXIT_CODES.items()]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(exit_code_table(), end="")
