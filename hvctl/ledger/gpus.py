"""The ledger's GPU records: the vfio binder's journal (claims and binding steps) and devices that must not be
placed until their host reboots."""

from __future__ import annotations

import time

from hvctl.ledger.core import Repository
from hvctl.ledger.records import DeviceTaken, GpuBinding, GpuHealth, gpu_binding_from_row


class GpuJournal(Repository):
    # -- GPU health -----------------------------------------------------------------------------------------------

    def mark_unhealthy(self, host: str, address: str, state: str, reason: str) -> None:
        with self._store.transaction() as db:
            db.execute("INSERT INTO gpu_health (host, address, state, reason, since) VALUES (?,?,?,?,?) "
                       "ON CONFLICT (host, address) DO UPDATE SET state = excluded.state, reason = excluded.reason",
                       (host, address, state, reason, time.time()))
            self._store.event(db, None, host, f"gpu.{state}", f"{address}: {reason}")

    def clear_health(self, host: str, address: str, reason: str) -> None:
        with self._store.transaction() as db:
            if db.execute("DELETE FROM gpu_health WHERE host = ? AND address = ?", (host, address)).rowcount:
                self._store.event(db, None, host, "gpu.healthy", f"{address}: {reason}")

    def health(self, host: str) -> dict[str, GpuHealth]:
        """Address → why, for each of the host's devices that must not be placed."""
        rows = self._db.execute("SELECT * FROM gpu_health WHERE host = ?", (host,))
        return {r["address"]: GpuHealth(r["state"], r["reason"], r["since"]) for r in rows}

    # -- GPU bindings: the vfio binder's journal -----------------------------------------------------------------

    def claim(self, host: str, vm: str, addresses: list[str], free_states: frozenset[str]) -> None:
        """Claim devices for ``vm`` in one transaction, before anything is bound: two creates that chose the same
        device cannot both get it. A device whose row is another VM's, in a state outside ``free_states``, is
        refused (DeviceTaken) and nothing is claimed."""
        now = time.time()
        with self._store.transaction() as db:
            for address in addresses:
                row = db.execute("SELECT vm, state FROM gpu_bindings WHERE host = ? AND address = ?",
                                 (host, address)).fetchone()
                if row is not None and row["vm"] != vm and row["state"] not in free_states:
                    raise DeviceTaken(f"{address} on host {host} was just claimed by VM {row['vm']}",
                                      hint="try again: another free device may be chosen")
            for address in addresses:
                db.execute("INSERT INTO gpu_bindings (host, address, vm, original_driver, step, state, updated_at) "
                           "VALUES (?,?,?,NULL,'claim','claimed',?) ON CONFLICT (host, address) DO UPDATE SET "
                           "vm = excluded.vm, original_driver = NULL, step = 'claim', state = 'claimed', "
                           "updated_at = excluded.updated_at", (host, address, vm, now))

    def unclaim(self, host: str, vm: str) -> list[str]:
        """Drop ``vm``'s claims on devices that were never moved (state 'claimed'); returns their addresses."""
        with self._store.transaction() as db:
            rows = db.execute("SELECT address FROM gpu_bindings WHERE host = ? AND vm = ? AND state = 'claimed'",
                              (host, vm)).fetchall()
            db.execute("DELETE FROM gpu_bindings WHERE host = ? AND vm = ? AND state = 'claimed'", (host, vm))
        return [r[0] for r in rows]

    def record_step(self, host: str, address: str, vm: str | None, step: str, original_driver: str | None,
                        state: str) -> None:
        """One transition of a device between its host driver and vfio-pci, written before it is attempted, so
        that after a crash `hvctl doctor --repair` knows which devices may be half-moved."""
        with self._store.transaction() as db:
            db.execute("INSERT INTO gpu_bindings (host, address, vm, original_driver, step, state, updated_at) "
                       "VALUES (?,?,?,?,?,?,?) ON CONFLICT (host, address) DO UPDATE SET vm = excluded.vm, "
                       "original_driver = excluded.original_driver, step = excluded.step, state = excluded.state, "
                       "updated_at = excluded.updated_at",
                       (host, address, vm, original_driver, step, state, time.time()))

    def bindings(self, host: str | None = None, vm: str | None = None) -> list[GpuBinding]:
        query, args = "SELECT * FROM gpu_bindings WHERE 1=1", list[str]()
        if host is not None:
            query, args = query + " AND host = ?", [*args, host]
        if vm is not None:
            query, args = query + " AND vm = ?", [*args, vm]
        return [gpu_binding_from_row(r) for r in self._db.execute(query + " ORDER BY host, address", args)]

    def forget(self, host: str, address: str) -> None:
        with self._store.transaction() as db:
            db.execute("DELETE FROM gpu_bindings WHERE host = ? AND address = ?", (host, address))
