"""The ledger's event log, read: what happened to each VM and host, oldest first. Every repository writes it inside
its own transactions (``Store.event``)."""

from __future__ import annotations

import json
from typing import Any

from hvctl.ledger.core import Repository
from hvctl.ledger.records import Event, event_from_row


class Events(Repository):
    def log(self, vm: str | None, host: str | None, kind: str, message: str,
            data: dict[str, Any] | None = None) -> None:
        """Record an event in its own transaction."""
        self._store.log_event(vm, host, kind, message, data)

    def recent(self, vm: str | None = None, limit: int = 50, after: int = 0) -> list[Event]:
        """The last ``limit`` events (of ``vm``), oldest first; with ``after``, only those with a larger id."""
        query = "SELECT * FROM events WHERE id > ?" + (" AND vm = ?" if vm else "") + " ORDER BY id DESC LIMIT ?"
        rows = self._db.execute(query, (after, vm, limit) if vm else (after, limit)).fetchall()
        return [event_from_row(r) for r in reversed(rows)]

    def of_kind(self, kind: str) -> list[Event]:
        """Every event of ``kind``, oldest first (what metrics count: migrations done and failed)."""
        rows = self._db.execute("SELECT * FROM events WHERE kind = ? ORDER BY id", (kind,)).fetchall()
        return [event_from_row(r) for r in rows]

    def last_data(self, vm: str, kind: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT data FROM events WHERE vm = ? AND kind = ? ORDER BY id DESC LIMIT 1",
                              (vm, kind)).fetchone()
        return json.loads(row[0]) if row and row[0] else None
