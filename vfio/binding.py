"""Moving devices between their host driver and vfio-pci, with rollback, release and crash recovery.

Every write that has an effect in the kernel goes through a ``SysfsWriter`` so that tests can substitute
a fake kernel, and every state change is reported to a ``BindingJournal`` *before* it is attempted, so
that after a crash the journal tells which devices may have been touched (see ``VfioBinder.recover``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .errors import BindError, DeviceInUse, ReleaseError
from .sysfs import VFIO_DRIVER, PciDevice, PciInventory, PciSysfs
from .viability import ProcfsUsers, group_of, require_viable

UsersOf = Callable[[PciDevice], list[str]]
OwnerOf = Callable[[str], str | None]

# States after which a device needs nothing more from recover(): it is back where it started, or the
# bind never wrote anything for it.
TERMINAL_STATES = frozenset({"original", "restored", "released"})


class SysfsWriter(Protocol):
    def write(self, path: Path, value: str) -> None: ...


class KernelWriter:
    """Writes the real sysfs attribute; the kernel acts on the write itself."""

    def write(self, path: Path, value: str) -> None:
        # One write() call per value: sysfs stores act on a single write and reject partial ones.
        with open(path, "w") as handle:
            handle.write(value)


class BindingJournal(Protocol):
    def record(self, address: str, step: str, original_driver: str | None, state: str) -> None: ...


@dataclass(frozen=True)
class JournalEntry:
    address: str
    step: str
    original_driver: str | None
    state: str


@dataclass
class MemoryJournal:
    """An in-memory journal for tests; the controller persists the same calls in its ledger."""

    entries: list[JournalEntry] = field(default_factory=list)

    def record(self, address: str, step: str, original_driver: str | None, state: str) -> None:
        self.entries.append(JournalEntry(address, step, original_driver, state))

    def states(self, address: str) -> list[str]:
        return [e.state for e in self.entries if e.address == address]


@dataclass(frozen=True)
class BoundDevice:
    address: str
    iommu_group: int
    original_driver: str | None
    original_override: str | None


@dataclass(frozen=True)
class Binding:
    """The result of a successful bind; pass it to ``release`` when the VM has stopped."""

    devices: tuple[BoundDevice, ...]

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(d.address for d in self.devices)

    @property
    def groups(self) -> tuple[int, ...]:
        return tuple(sorted({d.iommu_group for d in self.devices}))


class StepFailed(Exception):
    """One step of a move failed; the binder journals it, rolls back and raises BindError or ReleaseError."""

    def __init__(self, address: str, step: str, cause: str) -> None:
        super().__init__(cause)
        self.address = address
        self.step = step
        self.cause = cause


def _no_owner(address: str) -> str | None:
    return None


class DeviceBinder:
    """Binds a set of devices to vfio-pci as one transaction and gives them back afterwards.

    The transaction, the journal, the checks and the rollback are here; how one device moves is a subclass's:
    ``VfioBinder`` writes this machine's sysfs, and hvctl's node-device binder asks a host's libvirt."""

    def __init__(self, *, journal: BindingJournal | None = None, users_of: UsersOf | None = None,
                 owner_of: OwnerOf = _no_owner) -> None:
        self.journal: BindingJournal = journal or MemoryJournal()
        self.users_of: UsersOf = users_of or (lambda device: [])
        self.owner_of = owner_of

    # What a subclass provides.

    def inventory(self) -> PciInventory:
        """The host's devices as they are now (re-read at each call where the source is a snapshot)."""
        raise NotImplementedError

    def _move_to_vfio(self, item: BoundDevice) -> None:
        raise NotImplementedError

    def _restore(self, item: BoundDevice, step: str) -> None:
        raise NotImplementedError

    def _settle(self, bound: tuple[BoundDevice, ...]) -> None:
        """After every device moved: wait for whatever must exist before a VM can use them."""

    # Public transitions.

    def bind(self, devices: Iterable[PciDevice | str]) -> Binding:
        """Move every device to vfio-pci, or leave all of them exactly as they were and raise."""
        # Re-read each device: the caller's snapshot may predate another bind or a driver load.
        now = self.inventory()
        addresses = dict.fromkeys(now.device(d if isinstance(d, str) else d.address).address for d in devices)
        fresh = [now.device(address) for address in addresses]
        require_viable(now, fresh)
        for device in fresh:
            self._refuse_if_in_use(device)
        bound = tuple(BoundDevice(d.address, group_of(d), d.driver, d.driver_override) for d in fresh)
        for item in bound:
            self.journal.record(item.address, "record", item.original_driver, "original")
        touched: list[BoundDevice] = []
        try:
            for item in bound:
                if item.original_driver == VFIO_DRIVER:
                    # Already ours (e.g. vfio-pci.ids= on the kernel command line); nothing to move back.
                    self.journal.record(item.address, "verify", item.original_driver, "bound")
                    continue
                touched.append(item)
                self._move_to_vfio(item)
            self._settle(bound)
        except StepFailed as failure:
            original = next(d.original_driver for d in bound if d.address == failure.address)
            self.journal.record(failure.address, failure.step, original, "failed")
            problems = self._give_back(reversed(touched), step="rollback", final="restored")
            raise BindError(
                failure.address, failure.step, failure.cause, rollback_failures=problems
            ) from failure
        return Binding(devices=bound)

    def release(self, binding: Binding) -> None:
        """Give every device back to its original driver and verify it arrived; raise if any did not."""
        problems = self._give_back(reversed(binding.devices), step="release", final="released")
        if problems:
            raise ReleaseError(problems)

    def recover(self, entries: Iterable[JournalEntry]) -> list[str]:
        """Return devices of an interrupted bind or release to their original driver.

        Only the last entry per device counts. Call this only for bindings whose VM is not running:
        a device in state "bound" is taken back too. The original driver_override is not journaled,
        so recovered devices are left with the override cleared. Returns the addresses it acted on.
        """
        last: dict[str, JournalEntry] = {}
        for entry in entries:
            last[entry.address] = entry
        # The group number is not needed to restore a device, so a placeholder stands in for it.
        pending = [
            BoundDevice(e.address, -1, e.original_driver, None)
            for e in last.values()
            if e.state not in TERMINAL_STATES
        ]
        problems = self._give_back(pending, step="recover", final="restored")
        if problems:
            raise ReleaseError(problems)
        return [d.address for d in pending]

    # Steps.

    def _refuse_if_in_use(self, device: PciDevice) -> None:
        if device.boot_vga:
            raise DeviceInUse(
                device.address,
                "it is the boot VGA device and drives the host console",
                hint="pass through a GPU that is not the primary display, or make another adapter primary",
            )
        owner = self.owner_of(device.address)
        if owner is not None:
            raise DeviceInUse(
                device.address, f"it is held by VM '{owner}'", hint=f"stop '{owner}' or detach its GPU first"
            )
        users = self.users_of(device)
        if users:
            raise DeviceInUse(
                device.address,
                "it is in use on the host: " + ", ".join(users),
                hint="stop those processes (e.g. nvidia-persistenced, a display server) and retry",
            )

    def _give_back(self, items: Iterable[BoundDevice], *, step: str, final: str) -> list[str]:
        """Restore each device, carrying on past failures so that as many as possible are returned."""
        problems: list[str] = []
        for item in items:
            self.journal.record(item.address, step, item.original_driver, "restoring")
            try:
                self._restore(item, step)
            except StepFailed as failure:
                self.journal.record(item.address, step, item.original_driver, "restore-failed")
                problems.append(f"{item.address}: {failure.cause}")
                continue
            self.journal.record(item.address, step, item.original_driver, final)
        return problems


class VfioBinder(DeviceBinder):
    """Moves devices of the machine it runs on, through sysfs: ``driver_override``, ``unbind``,
    ``drivers_probe``, then a wait for the driver link and for ``/dev/vfio/N``."""

    def __init__(
        self,
        sysfs: PciSysfs,
        *,
        writer: SysfsWriter | None = None,
        journal: BindingJournal | None = None,
        users_of: UsersOf | None = None,
        owner_of: OwnerOf = _no_owner,
        dev_root: Path | str = Path("/dev"),
        bind_timeout: float = 10.0,
        poll_interval: float = 0.05,
    ) -> None:
        super().__init__(journal=journal, users_of=users_of or ProcfsUsers(sysfs), owner_of=owner_of)
        self.sysfs = sysfs
        self.writer: SysfsWriter = writer or KernelWriter()
        self.dev_root = Path(dev_root)
        self.bind_timeout = bind_timeout
        self.poll_interval = poll_interval

    def inventory(self) -> PciInventory:
        return self.sysfs  # sysfs is read afresh at every call

    def _settle(self, bound: tuple[BoundDevice, ...]) -> None:
        for group in sorted({d.iommu_group for d in bound}):
            self._wait_for_devnode(group, next(d.address for d in bound if d.iommu_group == group))

    def _write(self, address: str, step: str, path: Path, value: str) -> None:
        try:
            self.writer.write(path, value)
        except OSError as err:
            raise StepFailed(address, step, f"writing '{value.strip()}' to {path} failed: {err}") from err

    def _move_to_vfio(self, item: BoundDevice) -> None:
        address, original = item.address, item.original_driver
        self.journal.record(address, "override", original, "override-set")
        self._write(address, "override", self.sysfs.device_dir(address) / "driver_override", VFIO_DRIVER)
        if original is not None:
            self.journal.record(address, "unbind", original, "unbound")
            self._write(address, "unbind", self.sysfs.drivers_dir / original / "unbind", address)
        self.journal.record(address, "probe", original, "probing")
        self._write(address, "probe", self.sysfs.root / "bus" / "pci" / "drivers_probe", address)
        if not self._wait_for_driver(address, VFIO_DRIVER):
            current = self.sysfs.current_driver(address) or "no driver"
            raise StepFailed(
                address, "verify", f"still on {current} {self.bind_timeout:g}s after probing, not vfio-pci"
            )
        self.journal.record(address, "verify", original, "bound")

    def _wait_for_driver(self, address: str, wanted: str | None) -> bool:
        return self._poll(lambda: self.sysfs.current_driver(address) == wanted)

    def _wait_for_devnode(self, group: int, address: str) -> None:
        node = self.dev_root / "vfio" / str(group)
        if not self._poll(node.exists):
            raise StepFailed(address, "devnode", f"{node} did not appear after binding group {group}")

    def _poll(self, condition: Callable[[], bool]) -> bool:
        deadline = time.monotonic() + self.bind_timeout
        while True:
            if condition():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(self.poll_interval)

    def _restore(self, item: BoundDevice, step: str) -> None:
        address, original = item.address, item.original_driver
        current = self.sysfs.current_driver(address)
        # Already where it started (never moved, or a device that was on vfio-pci all along): no writes.
        if current == original and self.sysfs.driver_override(address) == item.original_override:
            return
        if current is not None and current != original:
            self._write(address, step, self.sysfs.drivers_dir / current / "unbind", address)
        # Clear the override before binding: the kernel refuses a bind that contradicts it.
        override_path = self.sysfs.device_dir(address) / "driver_override"
        if self.sysfs.driver_override(address) is not None:
            self._write(address, step, override_path, "\n")
        # Bind to the recorded driver by name rather than via drivers_probe, which could pick another
        # driver that also matches (nouveau instead of nvidia, say).
        if original is not None and self.sysfs.current_driver(address) != original:
            self._write(address, step, self.sysfs.drivers_dir / original / "bind", address)
        if not self._wait_for_driver(address, original):
            now = self.sysfs.current_driver(address) or "no driver"
            raise StepFailed(address, step, f"expected {original or 'no driver'} but found {now}")
        if item.original_override is not None:
            self._write(address, step, override_path, item.original_override)
