"""libvirt's exceptions become hvctl's typed errors here, so nothing outside this package knows libvirt's types."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import libvirt

from hvctl.errors import HostUnreachable, HypervisorError


@contextmanager
def _errors(action: str) -> Iterator[None]:
    try:
        yield
    except libvirt.libvirtError as exc:
        raise _typed(exc, action) from None


def _typed(exc: libvirt.libvirtError, action: str) -> HypervisorError | HostUnreachable:
    """hvctl's error for libvirt's ``exc``, raised while doing ``action``."""
    if exc.get_error_code() in (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_RPC):
        return HostUnreachable(f"{action}: lost the libvirt connection: {_msg(exc)}")
    return HypervisorError(f"{action} failed: {_msg(exc)}")


def _msg(exc: libvirt.libvirtError) -> str:
    return (exc.get_error_message() or str(exc)).strip()


def _code(exc: libvirt.libvirtError) -> int:
    return int(exc.get_error_code() or 0)
