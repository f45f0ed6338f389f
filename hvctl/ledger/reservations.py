"""The ledger's reservations: resources held on a host for an operation in flight (a migration's target, say),
counted in the host's usage, until the operation commits or rolls back."""

from __future__ import annotations

import json
import time

from hvctl.accounting import Usage, first_excess
from hvctl.ledger.core import Repository
from hvctl.ledger.records import DEFAULT_PORT_RANGE, QuotaExceeded, ReservationRecord, reservation_from_row
from hvctl.ledger.vms import PortCheck, free_port, used_ports


class Reservations(Repository):
    def hold(self, host: str, tenant: str, usage: Usage, kind: str, vm: str | None = None,
             counts_against_tenant: bool = False, host_limit: dict[str, float | None] | None = None) -> int:
        """Hold resources on a host for an operation in flight (a migration target, say) until it commits or
        rolls back. A migration's reservation does not count against its tenant: the VM is already charged once,
        so a tenant at its full quota can still be migrated (kubevirt#9238)."""
        return self._hold(host, tenant, usage, kind, vm, counts_against_tenant, host_limit, None)[0]

    def hold_with_port(self, host: str, tenant: str, usage: Usage, kind: str, vm: str, *,
                       host_limit: dict[str, float | None] | None = None, port_free: PortCheck | None = None,
                       port_range: tuple[int, int] = DEFAULT_PORT_RANGE) -> tuple[int, int]:
        """``hold``, and an SSH forward port on ``host`` for the VM on its way in, chosen in the same transaction
        among those no VM and no other reservation there holds (and that ``port_free`` calls free). Returns the
        reservation's id and the port."""
        return self._hold(host, tenant, usage, kind, vm, False, host_limit, (port_range, port_free))

    def _hold(self, host: str, tenant: str, usage: Usage, kind: str, vm: str | None, counts_against_tenant: bool,
              host_limit: dict[str, float | None] | None,
              port: tuple[tuple[int, int], PortCheck | None] | None) -> tuple[int, int]:
        with self._store.transaction() as db:
            if host_limit is not None:
                refusal = first_excess(f"host {host}", usage, self._store.host_usage(host, db), host_limit)
                if refusal:
                    raise QuotaExceeded(refusal)
            ssh_port = None if port is None else free_port(port[0], used_ports(db, host), port[1])
            row = db.execute("INSERT INTO reservations (host, tenant, vm, kind, usage, counts_against_tenant, "
                             "created_at, ssh_port) VALUES (?,?,?,?,?,?,?,?) RETURNING id",
                             (host, tenant, vm, kind, json.dumps(usage.as_dict()), int(counts_against_tenant),
                              time.time(), ssh_port)).fetchone()
            held = f" and SSH forward port {ssh_port}" if ssh_port is not None else ""
            self._store.event(db, vm, host, f"reservation.{kind}", f"reserved {usage.as_dict()}{held} on {host}")
            return int(row[0]), ssh_port or 0

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
