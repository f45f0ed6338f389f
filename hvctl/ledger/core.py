"""The ledger's store: one database connection, its migrations, transactions, the event log's writer, and what each
tenant and host has in use (queries across tables). Every repository of ``hvctl.ledger.Ledger`` holds the same store,
so that one transaction can span them: admission reads usage and inserts the VM in one write transaction.

Two backends, the same SQL: SQLite under the state dir (the default: nothing to set up) and PostgreSQL
(``hvctl.ledger.postgres``), for several controllers sharing one fleet. The repositories write portable SQL with
``?`` placeholders; a write transaction holds the database's one writer lock on both (SQLite's ``BEGIN IMMEDIATE``,
a transaction-scoped advisory lock on PostgreSQL), so a check-then-insert never interleaves with another
controller's, and neither needs retry loops.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from hvctl.accounting import Usage, host_footprint, tenant_charge
from hvctl.errors import LedgerError
from hvctl.ledger.schema import MIGRATIONS


class Row(Protocol):
    """A result row, read by column name or position (``sqlite3.Row`` and the PostgreSQL backend's rows)."""

    def __getitem__(self, key: int | str, /) -> Any: ...


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    @property
    def description(self) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """What the repositories use of a connection: one ``execute`` with ``?`` placeholders."""

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor: ...


@dataclass(frozen=True)
class Replica:
    name: str
    state: str  # streaming, catchup…
    sync: str  # async, sync, quorum…


@dataclass(frozen=True)
class StoreInfo:
    """What `hvctl doctor` reports of the ledger's database."""

    backend: str
    location: str
    schema: int
    version: str
    standby: bool = False  # a PostgreSQL standby: read-only
    replicas: tuple[Replica, ...] = ()


class Store(ABC):
    """A ledger database: ``db`` for reads (each its own snapshot), ``transaction()`` for writes."""

    backend: str  # "sqlite" or "postgresql"
    location: str  # what `doctor` names: the file, or the URL without its password
    db: Connection

    @abstractmethod
    def transaction(self) -> AbstractContextManager[Connection]:
        """A write transaction holding the database's writer lock until it commits (or rolls back on error)."""

    @abstractmethod
    def close(self) -> None: ...

    @property
    @abstractmethod
    def schema_version(self) -> int: ...

    @abstractmethod
    def _set_schema_version(self, db: Connection, version: int) -> None: ...

    def _ddl(self, statement: str) -> str:
        """A migration statement as this backend spells it (the migrations are written for SQLite)."""
        return statement

    def after_import(self, db: Connection, identities: Sequence[str]) -> None:
        """After rows were inserted with their ids (``hvctl ledger import``): make the next ids follow them. SQLite
        does so by itself."""
        return None

    @abstractmethod
    def describe(self) -> StoreInfo:
        """The backend, its server's version and, where it reports one, its replication state (`hvctl doctor`)."""

    def _migrate(self) -> None:
        with self.transaction() as db:
            current = self.schema_version
            if current > len(MIGRATIONS):
                raise LedgerError(f"ledger {self.location} has schema v{current}, newer than this hvctl "
                                  f"(v{len(MIGRATIONS)})", hint="upgrade hvctl")
            for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
                for statement in filter(str.strip, script.split(";")):
                    db.execute(self._ddl(statement))
                self._set_schema_version(db, version)

    # -- events -----------------------------------------------------------------------------------------------

    def log_event(self, vm: str | None, host: str | None, kind: str, message: str,
                  data: dict[str, Any] | None = None) -> None:
        with self.transaction() as db:
            self.event(db, vm, host, kind, message, data)

    @staticmethod
    def event(db: Connection, vm: str | None, host: str | None, kind: str, message: str,
              data: dict[str, Any] | None = None) -> None:
        db.execute("INSERT INTO events (ts, vm, host, kind, message, data) VALUES (?,?,?,?,?,?)",
                   (time.time(), vm, host, kind, message, json.dumps(data) if data else None))

    # -- what is in use ---------------------------------------------------------------------------------------

    def tenant_usage(self, tenant: str, db: Connection | None = None) -> Usage:
        from hvctl.spec import VMSpec  # pydantic loads only when a spec is read (hvctl's start-up: bench_cli)

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

    def host_usage(self, host: str, db: Connection | None = None) -> Usage:
        from hvctl.spec import VMSpec  # pydantic loads only when a spec is read (hvctl's start-up: bench_cli)

        db = db or self.db
        total = Usage()
        for row in db.execute("SELECT spec FROM vms WHERE host = ?", (host,)):
            total += host_footprint(VMSpec.model_validate_json(row[0]))
        for row in db.execute("SELECT usage FROM reservations WHERE host = ?", (host,)):
            total += Usage(**json.loads(row[0]))
        for row in db.execute("SELECT disk_gib FROM snapshots WHERE host = ?", (host,)):
            total += Usage(disk_gib=row[0])
        return total


class SqliteStore(Store):
    """The embedded default: one file under the state dir, in WAL mode."""

    backend = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = str(path)
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
            self.sqlite = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
            self.sqlite.row_factory = sqlite3.Row
            self.sqlite.execute("PRAGMA journal_mode=WAL")
            self.sqlite.execute("PRAGMA foreign_keys=ON")
            self.sqlite.execute("PRAGMA busy_timeout=30000")
            self.db = self.sqlite
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"cannot open ledger {path}: {exc}") from None

    def close(self) -> None:
        self.sqlite.close()

    @property
    def schema_version(self) -> int:
        return int(self.sqlite.execute("PRAGMA user_version").fetchone()[0])

    def _set_schema_version(self, db: Connection, version: int) -> None:
        db.execute(f"PRAGMA user_version = {int(version)}")

    def describe(self) -> StoreInfo:
        return StoreInfo(self.backend, self.location, self.schema_version, sqlite3.sqlite_version)

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        self.sqlite.execute("BEGIN IMMEDIATE")
        try:
            yield self.sqlite
        except BaseException:
            self.sqlite.execute("ROLLBACK")
            raise
        self.sqlite.execute("COMMIT")


def open_store(location: Path | str) -> Store:
    """The store at ``location``: a ``postgresql://`` URL, else a SQLite file (a path, or ``sqlite:///path``)."""
    text = str(location)
    if text.startswith(("postgresql://", "postgres://")):
        from hvctl.ledger.postgres import PostgresStore  # psycopg only when a PostgreSQL ledger is asked for

        return PostgresStore(text)
    return SqliteStore(Path(text.removeprefix("sqlite://")))


class Repository:
    """One part of the ledger (hosts, VMs, reservations…): its queries, over the store it shares with the others."""

    def __init__(self, store: Store) -> None:
        self._store = store

    @property
    def _db(self) -> Connection:
        return self._store.db
