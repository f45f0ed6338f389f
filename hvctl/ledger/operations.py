"""The ledger's operations: one durable intent row per VM while a command changes it, which is also that VM's lock.
A command that dies leaves its row; `hvctl doctor --repair` reads it to finish or roll back what it began."""

from __future__ import annotations

import json
import time
from typing import Any

from hvctl.errors import LedgerError
from hvctl.ledger.core import Repository
from hvctl.ledger.records import OperationRecord, operation_from_row


class Operations(Repository):
    def begin(self, vm: str, kind: str, holder: str, source: str | None, target: str | None,
              data: dict[str, Any]) -> OperationRecord | None:
        """Take VM ``vm``'s operation lock by writing the intent row; returns None if taken, else the row of the
        operation that holds it (nothing is written then)."""
        now = time.time()
        with self._store.transaction() as db:
            row = db.execute("SELECT * FROM operations WHERE vm = ?", (vm,)).fetchone()
            if row is not None:
                return operation_from_row(row)
            db.execute("INSERT INTO operations (vm, kind, source, target, step, data, holder, started_at, "
                       "updated_at) VALUES (?,?,?,?,?,?,?,?,?)",
                       (vm, kind, source, target, "begun", json.dumps(data), holder, now, now))
        return None

    def step(self, vm: str, holder: str, step: str, data: dict[str, Any]) -> None:
        """Record that the holder's operation on ``vm`` reached ``step``; ``data`` is merged into what it has made."""
        with self._store.transaction() as db:
            row = db.execute("SELECT data FROM operations WHERE vm = ? AND holder = ?", (vm, holder)).fetchone()
            if row is None:
                raise LedgerError(f"the operation on {vm} is no longer this command's (taken over by a repair?)")
            merged = json.loads(row[0]) | data
            db.execute("UPDATE operations SET step = ?, data = ?, updated_at = ? WHERE vm = ? AND holder = ?",
                       (step, json.dumps(merged), time.time(), vm, holder))

    def progress(self, vm: str, holder: str, progress: dict[str, Any]) -> None:
        """Merge ``progress`` into the running operation's data under "progress", leaving its step as it is: what
        a second shell's `hvctl show` reads while a migration runs."""
        with self._store.transaction() as db:
            row = db.execute("SELECT data FROM operations WHERE vm = ? AND holder = ?", (vm, holder)).fetchone()
            if row is not None:
                merged = json.loads(row[0]) | {"progress": progress}
                db.execute("UPDATE operations SET data = ?, updated_at = ? WHERE vm = ? AND holder = ?",
                           (json.dumps(merged), time.time(), vm, holder))

    def end(self, vm: str, holder: str | None = None) -> None:
        """Release the lock: the operation finished, was rolled back, or was reconciled (``holder`` None)."""
        with self._store.transaction() as db:
            if holder is None:
                db.execute("DELETE FROM operations WHERE vm = ?", (vm,))
            else:
                db.execute("DELETE FROM operations WHERE vm = ? AND holder = ?", (vm, holder))

    def all(self) -> list[OperationRecord]:
        return [operation_from_row(r) for r in self._db.execute("SELECT * FROM operations ORDER BY started_at")]
