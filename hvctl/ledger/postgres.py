"""The ledger on PostgreSQL (``--ledger postgresql://…``), for several controllers sharing one fleet.

The repositories' SQL is the same as on SQLite: ``?`` placeholders become psycopg's ``%s``, and a write transaction
takes one transaction-scoped advisory lock first, the equivalent of SQLite's ``BEGIN IMMEDIATE``: writers queue for
it, so admission's check-then-insert, the per-VM operation lock and GPU claims keep exactly the guarantees they have
on SQLite, with no serialization failures to retry. Reads run outside transactions (autocommit), each on a fresh
snapshot, as on SQLite. The ledger's write transactions are a few short statements, so one writer at a time is not
what limits a create (`benchmarks/bench_ledger.py` measures it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

from hvctl.errors import LedgerError
from hvctl.ledger.core import Connection, Cursor, Replica, Store, StoreInfo

# The advisory lock every write transaction holds: any constant, the same in every hvctl ("hvctl" in ASCII).
WRITER_LOCK = 0x687663746C
CONNECT_TIMEOUT_S = 10
# How long a command waits for a server that went away (a restart, a failover) before it gives up: the undo of a
# failed create waits here for the ledger to come back, so that it leaves nothing behind for a repair.
DEFAULT_RETRY_S = 30.0
RETRY_ENV = "HVCTL_LEDGER_RETRY_S"
RETRY_INTERVAL_S = 0.2


class PgRow:
    """A result row read by column name or by position, like ``sqlite3.Row``."""

    __slots__ = ("_index", "_values")

    def __init__(self, values: Sequence[Any], index: dict[str, int]) -> None:
        self._values, self._index = values, index

    def __getitem__(self, key: int | str, /) -> Any:
        return self._values[self._index[key] if isinstance(key, str) else key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def keys(self) -> list[str]:
        return list(self._index)


def _row_maker(cursor: Any) -> Any:
    index = {column.name: i for i, column in enumerate(cursor.description or ())}
    return lambda values: PgRow(values, index)


def redact(url: str) -> str:
    """``url`` without its password (in the user part, or a ``password=`` parameter): what messages and `doctor`
    show."""
    parts = urlsplit(url)
    if parts.password is not None:
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{parts.netloc.rpartition('@')[2]}")
    query = "&".join("password=***" if item.split("=", 1)[0] == "password" else item
                     for item in parts.query.split("&")) if parts.query else ""
    return urlunsplit(parts._replace(query=query))


class _PgConnection:
    """The repositories' ``Connection`` over psycopg: ``?`` placeholders; a server that went away (restarted, failed
    over) reconnected to between transactions, waiting up to ``retry_s`` for it; and a loss that cannot be retried
    (inside a transaction, or for longer than that) reported as one line, LedgerError, rather than a traceback."""

    def __init__(self, url: str, location: str, retry_s: float) -> None:
        self.url, self.location, self.retry_s = url, location, retry_s
        self.in_transaction = False
        self.conn = self._connect(first=True)

    def _connect(self, first: bool = False) -> psycopg.Connection[Any]:
        deadline = time.monotonic() + (0.0 if first else self.retry_s)
        while True:
            try:
                return psycopg.connect(self.url, autocommit=True, row_factory=_row_maker, application_name="hvctl",
                                       connect_timeout=CONNECT_TIMEOUT_S)
            except psycopg.Error as exc:
                if time.monotonic() >= deadline:
                    waited = "" if first else f" (retried for {self.retry_s:g} s)"
                    raise LedgerError(f"cannot connect to ledger {self.location}{waited}: {_first_line(exc)}",
                                      hint="is the PostgreSQL server up and reachable? check the URL") from None
                time.sleep(RETRY_INTERVAL_S)

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor:
        query, values = sql.replace("%", "%%").replace("?", "%s"), tuple(parameters)
        if not self.in_transaction and (self.conn.closed or self.conn.broken):
            self.conn = self._connect()
        try:
            return self.conn.execute(query, values)
        except psycopg.errors.ReadOnlySqlTransaction as exc:
            raise LedgerError(f"ledger {self.location} is read-only: {_first_line(exc)}",
                              hint="a standby is read-only: point --ledger at the primary") from None
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            if self.in_transaction or not self.conn.broken:
                raise LedgerError(f"ledger {self.location}: {_first_line(exc)}",
                                  hint="is the PostgreSQL server up and reachable?") from None
        # Outside a transaction a statement is a read or a BEGIN (every write is in a transaction): reconnect and
        # run it again, once.
        self.conn = self._connect()
        try:
            return self.conn.execute(query, values)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise LedgerError(f"ledger {self.location}: {_first_line(exc)}",
                              hint="is the PostgreSQL server up and reachable?") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class PostgresStore(Store):
    backend = "postgresql"
    db: _PgConnection

    def __init__(self, url: str, retry_s: float | None = None) -> None:
        self.location = redact(url)
        if retry_s is None:
            try:
                retry_s = float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_S))
            except ValueError:
                raise LedgerError(f"{RETRY_ENV}={os.environ[RETRY_ENV]!r} is not a number of seconds") from None
        self.db = _PgConnection(url, self.location, retry_s)
        self._migrate()

    @property
    def pg(self) -> psycopg.Connection[Any]:
        return self.db.conn

    def close(self) -> None:
        self.pg.close()

    @property
    def schema_version(self) -> int:
        if self.db.execute("SELECT to_regclass('hvctl_schema')").fetchone()[0] is None:
            return 0
        row = self.db.execute("SELECT version FROM hvctl_schema").fetchone()
        return 0 if row is None else int(row[0])

    def _set_schema_version(self, db: Connection, version: int) -> None:
        db.execute("CREATE TABLE IF NOT EXISTS hvctl_schema (version INTEGER NOT NULL)")
        db.execute("DELETE FROM hvctl_schema")
        db.execute("INSERT INTO hvctl_schema (version) VALUES (?)", (version,))

    def _ddl(self, statement: str) -> str:
        # SQLite's REAL is a double; PostgreSQL's is 4 bytes, which would round every timestamp to minutes.
        return (statement.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGINT GENERATED BY DEFAULT AS IDENTITY "
                                  "PRIMARY KEY")
                .replace(" REAL", " DOUBLE PRECISION"))

    def after_import(self, db: Connection, identities: Sequence[str]) -> None:
        for table in identities:
            db.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "  # noqa: S608 - a table's name
                       f"COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)")

    def describe(self) -> StoreInfo:
        version = self.db.execute("SHOW server_version").fetchone()[0]
        standby = bool(self.db.execute("SELECT pg_is_in_recovery()").fetchone()[0])
        replicas = self.db.execute("SELECT application_name, state, sync_state FROM pg_stat_replication").fetchall()
        return StoreInfo(self.backend, self.location, self.schema_version, str(version), standby,
                         tuple(Replica(r[0] or "?", r[1], r[2]) for r in replicas))

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        db = self.db
        db.execute("BEGIN")  # outside a transaction still: a lost server is waited for here
        db.in_transaction = True
        try:
            db.execute("SELECT pg_advisory_xact_lock(?)", (WRITER_LOCK,))
            yield db
        except BaseException:
            if not (self.pg.closed or self.pg.broken):
                with suppress(LedgerError):
                    db.execute("ROLLBACK")
            raise
        else:
            db.execute("COMMIT")  # a loss here is reported: whether it committed is not known
        finally:
            db.in_transaction = False

