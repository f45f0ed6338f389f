"""Typed errors raised by the vfio package.

The package never prints or exits; callers (the hvctl controller and CLI) catch these and turn them into
their own messages. Every error carries a one-sentence ``hint`` where there is something the operator
can do about it, mirroring hvctl's own error convention without importing it.
"""

from __future__ import annotations

from collections.abc import Sequence


class VfioError(Exception):
    """Base class for everything this package raises."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class InvalidAddress(VfioError):
    """A string that is not a PCI address of the form DDDD:BB:DD.F."""


class DeviceNotFound(VfioError):
    """The PCI address is well formed but no such device exists under the sysfs root."""

    def __init__(self, address: str, *, hint: str | None = None) -> None:
        super().__init__(
            f"no PCI device {address} on this host",
            hint=hint or "list the host's PCI devices with `lspci -Dnn` or `hvctl gpu list`",
        )
        self.address = address


class NotAGpu(VfioError):
    """The device exists but is neither a display-class device nor on the accelerator allowlist."""

    def __init__(self, address: str, vendor_device: str, class_code: int) -> None:
        super().__init__(
            f"{address} ({vendor_device}, class 0x{class_code:06x}) is not a GPU",
            hint="GPUs have PCI class 0x0300xx, 0x0302xx or 0x0380xx; add its vendor:device id to the "
            "accelerator allowlist to pass another kind of accelerator through",
        )
        self.address = address


class IommuUnavailable(VfioError):
    """The host has no IOMMU groups, or the device is not in one."""


class GroupNotViable(VfioError):
    """An IOMMU group contains an endpoint still used by the host, so VFIO cannot take the group."""

    def __init__(self, group: int, blockers: Sequence[str]) -> None:
        joined = "; ".join(blockers)
        super().__init__(
            f"IOMMU group {group} is not viable: {joined}",
            hint="every endpoint in the group must be passed through or left without a driver; move the "
            "GPU to another slot, unbind the listed devices, or include them explicitly",
        )
        self.group = group
        self.blockers = tuple(blockers)


class DeviceInUse(VfioError):
    """A device is the boot VGA, has open handles on the host, or is held by another VM."""

    def __init__(self, address: str, reason: str, *, hint: str | None = None) -> None:
        super().__init__(f"{address} cannot be passed through: {reason}", hint=hint)
        self.address = address
        self.reason = reason


class BindError(VfioError):
    """Moving a device to vfio-pci failed at ``step``; devices already moved were given back.

    ``rollback_failures`` lists devices that could not be returned to their original driver; when it
    is non-empty the host needs manual attention and the message says so.
    """

    def __init__(self, address: str, step: str, cause: str, *, rollback_failures: Sequence[str] = ()) -> None:
        message = f"binding {address} to vfio-pci failed at step '{step}': {cause}"
        if rollback_failures:
            message += "; rollback also failed for: " + "; ".join(rollback_failures)
            hint = "return the listed devices to their host driver by hand, or run `hvctl doctor`"
        else:
            hint = "every device was returned to its original driver"
        super().__init__(message, hint=hint)
        self.address = address
        self.step = step
        self.rollback_failures = tuple(rollback_failures)


class ReleaseError(VfioError):
    """One or more devices could not be given back to their original host driver."""

    def __init__(self, failures: Sequence[str]) -> None:
        super().__init__(
            "could not return devices to their host driver: " + "; ".join(failures),
            hint="check `dmesg` for the driver's probe error; the device stays unusable by the host "
            "until it is rebound",
        )
        self.failures = tuple(failures)
