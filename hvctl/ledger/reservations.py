"""The ledger's reservations: resources held on a host for an operation in flight (a migration's target, say),
counted in the host's usage, until the operation commits or rolls back."""

from __future__ import annotations

import json
import time

from hvctl.accounting import Usage, first_excess
from hvctl.ledger.core import Repository
from hvctl.ledger.records import QuotaExceeded, ReservationRecord, reservation_from_row


class Reservations(Repository):
    def hold(self, host: str, tenant: str, usage: Usage, kind: str, vm: str | None = None,
                counts_against_tenant: bool = False, host_limit: dict[str, float | None] | None = None) -> int:
        """Hold resources on a host for an operation in flight (a migration target, say) until it commits or
        rolls back. A migration's reservation does not count against its tenant: the VM is already charged once,
        so a tenant at its full quota can still be migrated (kubevirt#9238)."""
        with self._store.transaction() as db:
            if host_limit is not None:
                refusal = first_excess(f"host {host}", usage, self._store.host_usage(host, db), host_limit)
                if refusal:
                    raise QuotaExceeded(refusal)
            row = db.execute("INSERT INTO reservations (host, tenant, vm, kind, usage, counts_against_tenant, "
                             "created_at) VALUES (?,?,?,?,?,?,?) RETURNING id",
                             (host, tenant, vm, kind, json.dumps(usage.as_dict()), int(counts_against_tenant),
                              time.time())).fetchone()
            self._store.event(db, vm, host, f"reservation.{kind}", f"reserved {usage.as_dict()} on {host}")
            return int(row[0])

    def release(self, reservation_id: int) -> None:
        with self._store.transaction() as db:
            db.execute("DELETE FROM reservations WHERE id = ?", (reservation_id,))

    def release_for(self, vm: str, kind: str, host: str) -> int:
        """Release every ``kind`` reservation held for ``vm`` on ``host`` (a crashed operation's); returns how many."""
        with self._store.transaction() as db:
            return int(db.execute("DELETE FROM reservations WHERE vm = ? AND kind = ? AND host = ?",
                                  (vm, kind, host)).rowcount)

    def all(self) -> list[ReservationRecord]:
        return [reservation_from_row(r) for r in self._db.execute("SELECT * FROM reservations ORDER BY id")]
