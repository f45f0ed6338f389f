"""The ledger's store: the one SQLite connection, its migrations, transactions, the event log's writer, and what each
tenant and host has in use (queries across tables). Every repository of ``hvctl.ledger.Ledger`` holds the same store,
so that one transaction can span them: admission reads usage and inserts the VM under one ``BEGIN IMMEDIATE``."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hvctl.accounting import Usage, host_footprint, tenant_charge
from hvctl.errors import LedgerError
from hvctl.ledger.schema import MIGRATIONS


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            # isolation_level=None: we issue BEGIN ourselves, so each transaction's boundaries are explicit.
            if not path.exists():
                # It holds agent tokens: born 0600, so never readable by others even for an instant. SQLite gives
                # its -wal and -shm files the database file's mode.
                try:
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                except FileExistsError:
                    pass
                except OSError as exc:
                    raise LedgerError(f"cannot create ledger {path}: {exc.strerror}") from None
            self.db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.execute("PRAGMA busy_timeout=30000")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"cannot open ledger {path}: {exc}") from None

    def close(self) -> None:
        self.db.close()

    @property
    def schema_version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        with self.transaction():
            current = self.schema_version
            if current > len(MIGRATIONS):
                raise LedgerError(f"ledger {self.path} has schema v{current}, newer than this hvctl "
                                  f"(v{len(MIGRATIONS)})", hint="upgrade hvctl")
            for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
                for statement in filter(str.strip, script.split(";")):
                    self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version = {version}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- events -----------------------------------------------------------------------------------------------

    def log_event(self, vm: str | None, host: str | None, kind: str, message: str,
                  data: dict[str, Any] | None = None) -> None:
        with self.transaction() as db:
            self.event(db, vm, host, kind, message, data)

    @staticmethod
    def event(db: sqlite3.Connection, vm: str | None, host: str | None, kind: str, message: str,
               data: dict[str, Any] | None = None) -> None:
        db.execute("INSERT INTO events (ts, vm, host, kind, message, data) VALUES (?,?,?,?,?,?)",
                   (time.time(), vm, host, kind, message, json.dumps(data) if data else None))

    # -- what is in use ---------------------------------------------------------------------------------------

    def tenant_usage(self, tenant: str, db: sqlite3.Connection | None = None) -> Usage:
        from hvctl.spec import VMSpec

        db = db or self.db
        total = Usage()
        for row in db.execute("SELECT spec FROM vms WHERE tenant = ?", (tenant,)):
            total += tenant_charge(VMSpec.model_validate_json(row[0]))
        for row in db.execute("SELECT usage FROM reservations WHERE tenant = ? AND counts_against_tenant = 1",
                              (tenant,)):
            total += Usage(**json.loads(row[0]))
        for row in db.execute("SELECT disk_gib FROM snapshots WHERE tenant = ?", (tenant,)):
            total += Usage(disk_gib=row[0])
        return total

    def host_usage(self, host: str, db: sqlite3.Connection | None = None) -> Usage:
        from hvctl.spec import VMSpec

        db = db or self.db
        total = Usage()
        for row in db.execute("SELECT spec FROM vms WHERE host = ?", (host,)):
            total += host_footprint(VMSpec.model_validate_json(row[0]))
        for row in db.execute("SELECT usage FROM reservations WHERE host = ?", (host,)):
            total += Usage(**json.loads(row[0]))
        for row in db.execute("SELECT disk_gib FROM snapshots WHERE host = ?", (host,)):
            total += Usage(disk_gib=row[0])
        return total


class Repository:
    """One part of the ledger (hosts, VMs, reservations…): its queries, over the store it shares with the others."""

    def __init__(self, store: Store) -> None:
        self._store = store

    @property
    def _db(self) -> sqlite3.Connection:
        return self._store.db
