"""The ledger's hosts: each machine hvctl places VMs on, with what was probed of it (accelerator, size, NUMA and GPU
inventory, whether its libvirtd can limit memory)."""

from __future__ import annotations

import json
import time

from hvctl.errors import HvctlError, NotFound
from hvctl.ledger.core import Repository
from hvctl.ledger.records import Hardware, HostRecord


class Hosts(Repository):
    def ensure(self, name: str, uri: str) -> HostRecord:
        with self._store.transaction() as db:
            row = db.execute("SELECT * FROM hosts WHERE name = ?", (name,)).fetchone()
            if row is None:
                db.execute("INSERT INTO hosts (name, uri, added_at) VALUES (?, ?, ?)", (name, uri, time.time()))
            elif row["uri"] != uri:
                # The URI the user connects with is the host's address; a changed one invalidates the probe.
                db.execute("UPDATE hosts SET uri = ?, accel = NULL, accel_probed_at = NULL, memory_limits = NULL "
                           "WHERE name = ?", (uri, name))
        return self.get(name)

    def get(self, name: str) -> HostRecord:
        row = self._db.execute("SELECT * FROM hosts WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"unknown host {name!r}")
        limits = row["memory_limits"]
        return HostRecord(row["name"], row["uri"], row["accel"], row["accel_probed_at"], row["cpus"],
                          row["memory_mib"], bool(row["enabled"]), row["disk_gib"],
                          None if limits is None else bool(limits))

    def all(self) -> list[HostRecord]:
        names = [r[0] for r in self._db.execute("SELECT name FROM hosts ORDER BY name")]
        return [self.get(n) for n in names]

    def record_facts(self, name: str, accel: str, cpus: int, memory_mib: int) -> None:
        with self._store.transaction() as db:
            db.execute("UPDATE hosts SET accel = ?, accel_probed_at = ?, cpus = ?, memory_mib = ? WHERE name = ?",
                       (accel, time.time(), cpus, memory_mib, name))

    def record_no_memory_limits(self, name: str) -> None:
        """The host's libvirtd refused a memory hard limit ("cannot limit locked memory"): later boots there go
        without one from the start instead of failing first."""
        with self._store.transaction() as db:
            db.execute("UPDATE hosts SET memory_limits = 0 WHERE name = ?", (name,))
            self._store.event(db, None, name, "host.no-memory-limits",
                              f"host {name}'s libvirtd cannot set memory hard limits; its VMs get none")

    def record_disk(self, name: str, disk_gib: int) -> None:
        with self._store.transaction() as db:
            db.execute("UPDATE hosts SET disk_gib = ? WHERE name = ?", (disk_gib, name))

    def record_hardware(self, name: str, hardware: Hardware) -> None:
        found = hardware.as_dict()
        with self._store.transaction() as db:
            db.execute("UPDATE hosts SET numa = ?, gpus = ? WHERE name = ?",
                       (json.dumps(found["numa_cells"]), json.dumps(found["gpus"]), name))

    def hardware(self, name: str) -> Hardware:
        row = self._db.execute("SELECT numa, gpus FROM hosts WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"unknown host {name!r}")
        return Hardware.from_json(row[0], row[1])

    def remove(self, name: str) -> None:
        with self._store.transaction() as db:
            if db.execute("SELECT 1 FROM vms WHERE host = ?", (name,)).fetchone():
                raise HvctlError(f"host {name} still has VMs; destroy or migrate them first")
            if db.execute("DELETE FROM hosts WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"unknown host {name!r}")
            self._store.event(db, None, name, "host.removed", f"host {name} removed")

    def claim_upload(self, host: str, image: str, holder: str) -> tuple[str, float] | None:
        """Take the upload of ``image`` (its content hash) to ``host``'s pool for ``holder``, or renew it if it is
        ``holder``'s already: None then. Another's: who holds it and when it last renewed it."""
        now = time.time()
        with self._store.transaction() as db:
            row = db.execute("SELECT holder, updated_at FROM image_uploads WHERE host = ? AND image = ?",
                             (host, image)).fetchone()
            if row is None:
                db.execute("INSERT INTO image_uploads (host, image, holder, updated_at) VALUES (?, ?, ?, ?)",
                           (host, image, holder, now))
            elif row["holder"] == holder:
                db.execute("UPDATE image_uploads SET updated_at = ? WHERE host = ? AND image = ?", (now, host, image))
            else:
                return str(row["holder"]), float(row["updated_at"])
        return None

    def end_upload(self, host: str, image: str, holder: str) -> None:
        """Give up ``holder``'s claim (its own, or a dead holder's that another takes over)."""
        with self._store.transaction() as db:
            db.execute("DELETE FROM image_uploads WHERE host = ? AND image = ? AND holder = ?", (host, image, holder))

    def set_enabled(self, name: str, enabled: bool) -> None:
        with self._store.transaction() as db:
            if db.execute("UPDATE hosts SET enabled = ? WHERE name = ?", (int(enabled), name)).rowcount == 0:
                raise NotFound(f"unknown host {name!r}")
