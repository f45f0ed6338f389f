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
