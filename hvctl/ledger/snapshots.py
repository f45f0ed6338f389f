"""The ledger's snapshots: each a row charged against its tenant's disk quota and its host's disk."""

from __future__ import annotations

import time

from hvctl.accounting import Usage, first_excess
from hvctl.errors import AlreadyExists, NotFound
from hvctl.ledger.core import Repository, Row
from hvctl.ledger.records import Admission, QuotaExceeded, SnapshotRecord, snapshot_charge, vm_from_row


class Snapshots(Repository):
    def reserve(self, vm: str, name: str, memory: bool, admission: Admission) -> SnapshotRecord:
        """Record snapshot ``name`` of ``vm`` as 'creating', charged against the tenant's disk quota and the host's
        disk in the same transaction as the checks, so that racing snapshots cannot together overshoot either."""
        try:
            with self._store.transaction() as db:
                row = db.execute("SELECT * FROM vms WHERE name = ?", (vm,)).fetchone()
                if row is None:
                    raise NotFound(f"no VM named {vm!r}")
                record = vm_from_row(row)
                if db.execute("SELECT 1 FROM snapshots WHERE vm = ? AND name = ?", (vm, name)).fetchone():
                    raise AlreadyExists(f"{vm} already has a snapshot named {name!r}")
                charge = Usage(disk_gib=snapshot_charge(record.spec, memory))
                refusal = first_excess(f"tenant {record.tenant}", charge, self._store.tenant_usage(record.tenant, db),
                                       admission.tenant_limit) or \
                    first_excess(f"host {record.host}", charge, self._store.host_usage(record.host, db),
                                 admission.host_limit)
                if refusal:
                    raise QuotaExceeded(f"snapshot {name} of {vm}: {refusal}")
                db.execute("INSERT INTO snapshots (vm, name, tenant, host, memory, disk_gib, state, created_at) "
                           "VALUES (?,?,?,?,?,?,?,?)", (vm, name, record.tenant, record.host, int(memory),
                                                        charge.disk_gib, "creating", time.time()))
        except QuotaExceeded as exc:
            self._store.log_event(vm, None, "admission.refused", exc.message)
            raise
        return self.get(vm, name)

    def get(self, vm: str, name: str) -> SnapshotRecord:
        row = self._db.execute("SELECT * FROM snapshots WHERE vm = ? AND name = ?", (vm, name)).fetchone()
        if row is None:
            raise NotFound(f"{vm} has no snapshot named {name!r}", hint=f"hvctl snapshot list {vm}")
        return _snapshot_from_row(row)

    def all(self, vm: str | None = None) -> list[SnapshotRecord]:
        rows = self._db.execute("SELECT * FROM snapshots ORDER BY created_at, name") if vm is None else \
            self._db.execute("SELECT * FROM snapshots WHERE vm = ? ORDER BY created_at, name", (vm,))
        return [_snapshot_from_row(r) for r in rows]

    def set_state(self, vm: str, name: str, state: str, message: str) -> None:
        assert state in ("creating", "ready", "deleting"), state
        with self._store.transaction() as db:
            row = db.execute("UPDATE snapshots SET state = ? WHERE vm = ? AND name = ? RETURNING host",
                             (state, vm, name)).fetchone()
            if row is None:
                raise NotFound(f"{vm} has no snapshot named {name!r}")
            self._store.event(db, vm, row[0], f"snapshot.{state}", message)

    def delete(self, vm: str, name: str, message: str) -> None:
        with self._store.transaction() as db:
            row = db.execute("DELETE FROM snapshots WHERE vm = ? AND name = ? RETURNING host", (vm, name)).fetchone()
            if row is not None:
                self._store.event(db, vm, row[0], "snapshot.deleted", message)


def _snapshot_from_row(row: Row) -> SnapshotRecord:
    return SnapshotRecord(vm=row["vm"], name=row["name"], tenant=row["tenant"], host=row["host"],
                          memory=bool(row["memory"]), disk_gib=row["disk_gib"], state=row["state"],
                          created_at=row["created_at"])
