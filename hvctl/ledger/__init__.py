"""The ledger: SQLite record of what was asked for and what was allocated.

libvirt is the truth for what runs; the ledger is the truth for what was requested and handed out (names, ports,
disks, addresses, devices). It is one store (``core.Store``: the connection, its migrations and transactions) and
the typed repositories over it, one per kind of record: ``ledger.hosts``, ``ledger.vms``, ``ledger.operations``,
``ledger.reservations``, ``ledger.gpus``, ``ledger.keys``, ``ledger.events``, ``ledger.snapshots`` and
``ledger.networks``. Every state change is one transaction. Writers take the database lock up front (BEGIN
IMMEDIATE) so that a check-then-insert, such as "is this name free, which port is free", cannot interleave with
another process's.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

from hvctl.accounting import Usage
from hvctl.ledger.core import Connection, open_store
from hvctl.ledger.events import Events
from hvctl.ledger.gpus import GpuJournal
from hvctl.ledger.hosts import Hosts
from hvctl.ledger.keys import TenantKeys
from hvctl.ledger.networks import NetworkRecord, Networks
from hvctl.ledger.operations import Operations
from hvctl.ledger.records import (
    DEFAULT_PORT_RANGE,
    MOVABLE_COLUMNS,
    VM_STATES,
    Admission,
    DeviceTaken,
    Event,
    GpuBinding,
    GpuHealth,
    Hardware,
    HostRecord,
    InventoryGpu,
    NumaCell,
    OperationRecord,
    QuotaExceeded,
    ReservationRecord,
    SnapshotRecord,
    VMPaths,
    VMRecord,
    VMState,
)
from hvctl.ledger.reservations import Reservations
from hvctl.ledger.schema import MIGRATIONS
from hvctl.ledger.snapshots import Snapshots
from hvctl.ledger.vms import VMs

__all__ = ["DEFAULT_PORT_RANGE", "MIGRATIONS", "MOVABLE_COLUMNS", "VM_STATES", "Admission", "DeviceTaken", "Event",
           "GpuBinding", "GpuHealth", "Hardware", "HostRecord", "InventoryGpu", "Ledger", "NetworkRecord", "NumaCell",
           "OperationRecord", "QuotaExceeded", "ReservationRecord", "SnapshotRecord", "VMPaths", "VMRecord", "VMState"]


class Ledger:
    """The whole ledger: one store, and a repository per kind of record over it."""

    def __init__(self, location: Path | str) -> None:
        """``location``: a SQLite file (the state dir's, by default) or a ``postgresql://`` URL."""
        self.store = open_store(location)
        self.hosts = Hosts(self.store)
        self.vms = VMs(self.store)
        self.operations = Operations(self.store)
        self.reservations = Reservations(self.store)
        self.gpus = GpuJournal(self.store)
        self.keys = TenantKeys(self.store)
        self.events = Events(self.store)
        self.snapshots = Snapshots(self.store)
        self.networks = Networks(self.store)

    @property
    def db(self) -> Connection:
        return self.store.db

    @property
    def schema_version(self) -> int:
        return self.store.schema_version

    def transaction(self) -> AbstractContextManager[Connection]:
        return self.store.transaction()

    def close(self) -> None:
        self.store.close()

    # What is in use spans VMs, reservations and snapshots: asked of the ledger as a whole.

    def tenant_usage(self, tenant: str) -> Usage:
        return self.store.tenant_usage(tenant)

    def host_usage(self, host: str) -> Usage:
        return self.store.host_usage(host)
