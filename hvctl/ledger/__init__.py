"""The ledger: SQLite record of what was asked for and what was allocated.

libvirt is the truth for what runs; the ledger is the truth for what was requested and handed out (names, ports,
disks). Every state change is one transaction. Writers take the database lock up front (BEGIN IMMEDIATE) so that a
check-then-insert, such as "is this name free, which port is free", cannot interleave with another process's.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from typing import TYPE_CHECKING, Any

from hvctl.accounting import Usage, first_excess, host_footprint, tenant_charge
from hvctl.errors import AlreadyExists, HvctlError, LedgerError, NotFound
from hvctl.ledger.gpus import GpuLedger
from hvctl.ledger.networks import NetworkLedger, NetworkRecord
from hvctl.ledger.records import (
    DEFAULT_PORT_RANGE,
    MOVABLE_COLUMNS,
    VM_STATES,
    Admission,
    DeviceTaken,
    Event,
    HostRecord,
    QuotaExceeded,
    SnapshotRecord,
    VMPaths,
    VMRecord,
    VMState,
    event_from_row,
    operation_from_row,
    vm_from_row,
)
from hvctl.ledger.schema import MIGRATIONS
from hvctl.ledger.snapshots import SnapshotLedger

if TYPE_CHECKING:
    from hvctl.spec import VMSpec

__all__ = ["DEFAULT_PORT_RANGE", "MIGRATIONS", "MOVABLE_COLUMNS", "VM_STATES", "Admission", "DeviceTaken", "Event",
           "HostRecord", "Ledger", "NetworkRecord", "QuotaExceeded", "SnapshotRecord", "VMPaths", "VMRecord", "VMState"]


class Ledger(GpuLedger, SnapshotLedger, NetworkLedger):
    """The whole ledger: the core (connection, migrations, transactions, usage), GPUs, snapshots and tenant networks
    in their own modules, and here hosts, VMs, operations, reservations, tenant keys and reading the event log."""

    # -- hosts ------------------------------------------------------------------------------------------------

    def ensure_host(self, name: str, uri: str) -> HostRecord:
        with self.transaction() as db:
            row = db.execute("SELECT * FROM hosts WHERE name = ?", (name,)).fetchone()
            if row is None:
                db.execute("INSERT INTO hosts (name, uri, added_at) VALUES (?, ?, ?)", (name, uri, time.time()))
            elif row["uri"] != uri:
                # The URI the user connects with is the host's address; a changed one invalidates the probe.
                db.execute("UPDATE hosts SET uri = ?, accel = NULL, accel_probed_at = NULL, memory_limits = NULL "
                           "WHERE name = ?", (uri, name))
        return self.get_host(name)

    def get_host(self, name: str) -> HostRecord:
        row = self.db.execute("SELECT * FROM hosts WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"unknown host {name!r}")
        limits = row["memory_limits"]
        return HostRecord(row["name"], row["uri"], row["accel"], row["accel_probed_at"], row["cpus"],
                          row["memory_mib"], bool(row["enabled"]), row["disk_gib"],
                          None if limits is None else bool(limits))

    def list_hosts(self) -> list[HostRecord]:
        names = [r[0] for r in self.db.execute("SELECT name FROM hosts ORDER BY name")]
        return [self.get_host(n) for n in names]

    def record_host_facts(self, name: str, accel: str, cpus: int, memory_mib: int) -> None:
        with self.transaction() as db:
            db.execute("UPDATE hosts SET accel = ?, accel_probed_at = ?, cpus = ?, memory_mib = ? WHERE name = ?",
                       (accel, time.time(), cpus, memory_mib, name))

    def record_no_memory_limits(self, name: str) -> None:
        """The host's libvirtd refused a memory hard limit ("cannot limit locked memory"): later boots there go
        without one from the start instead of failing first."""
        with self.transaction() as db:
            db.execute("UPDATE hosts SET memory_limits = 0 WHERE name = ?", (name,))
            self._event(db, None, name, "host.no-memory-limits",
                        f"host {name}'s libvirtd cannot set memory hard limits; its VMs get none")

    def record_host_disk(self, name: str, disk_gib: int) -> None:
        with self.transaction() as db:
            db.execute("UPDATE hosts SET disk_gib = ? WHERE name = ?", (disk_gib, name))

    # -- vms --------------------------------------------------------------------------------------------------

    def reserve_vm(
        self, spec: VMSpec, host: str, paths: VMPaths, *, agent_token: str | None = None,
        host_pubkey: str | None = None, admission: Admission | None = None,
        port_range: tuple[int, int] = DEFAULT_PORT_RANGE, probe_ports: bool = True,
    ) -> VMRecord:
        """Record the intent to create a VM and allocate its SSH port, atomically: one that no VM of the host
        holds, and, with ``probe_ports`` (the host is this machine), free on ``spec.ssh_bind`` here. Another host's
        ports cannot be probed from here: its QEMU reports a taken one at start, and the boot moves it.
        State starts as 'creating'.

        With ``admission``, the tenant's quota and the host's capacity are checked in the same transaction, so
        concurrent creates can never together overshoot either.
        """
        try:
            return self._reserve_vm(spec, host, paths, agent_token, host_pubkey, admission, port_range,
                                    str(spec.ssh_bind) if probe_ports else None)
        except QuotaExceeded as exc:
            # The refusal is worth keeping, but its transaction was rolled back: record it on its own.
            self.log_event(spec.name, host, "admission.refused", exc.message)
            raise

    def _reserve_vm(self, spec: VMSpec, host: str, paths: VMPaths, agent_token: str | None,
                    host_pubkey: str | None, admission: Admission | None, port_range: tuple[int, int],
                    probe_on: str | None) -> VMRecord:
        now = time.time()
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM vms WHERE name = ?", (spec.name,)).fetchone():
                raise AlreadyExists(f"VM {spec.name!r} already exists")
            if admission is not None:
                self._admit(db, spec, host, admission)
            spec = self._with_address(db, spec)
            used = {r[0] for r in db.execute("SELECT ssh_port FROM vms WHERE host = ?", (host,))}
            port = _free_port(port_range, used, probe_on)
            _insert_vm(db, spec, host, paths, port, "creating", now, agent_token, host_pubkey, None)
            self._record_address(db, spec)
            self._event(db, spec.name, host, "create.requested", f"create {spec.name} on {host}, ssh port {port}")
        return self.get_vm(spec.name)

    def adopt_vm(self, spec: VMSpec, host: str, paths: VMPaths, *, ssh_port: int, state: str, domain_uuid: str,
                 agent_token: str | None, host_pubkey: str | None, admission: Admission) -> VMRecord:
        """Record a VM whose domain already exists (``hvctl adopt``), as it is: its port, its files, its domain's
        UUID. Admitted like a create, in the same transaction, so an adopted VM counts against its tenant's quota
        and its host's capacity; a port another VM of the host holds is refused."""
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM vms WHERE name = ?", (spec.name,)).fetchone():
                raise AlreadyExists(f"VM {spec.name!r} is already in the ledger")
            holder = db.execute("SELECT name FROM vms WHERE host = ? AND ssh_port = ?", (host, ssh_port)).fetchone()
            if holder:
                raise HvctlError(f"{spec.name}'s SSH forward port {ssh_port} is VM {holder[0]}'s on host {host}; "
                                 "the two cannot both run", hint=f"`hvctl destroy {spec.name} --orphan --host {host}`")
            self._admit(db, spec, host, admission)
            spec = self._with_address(db, spec)
            _insert_vm(db, spec, host, paths, ssh_port, state, time.time(), agent_token, host_pubkey, domain_uuid)
            self._record_address(db, spec)
            self._event(db, spec.name, host, "vm.adopted",
                        f"adopted {spec.name} on {host} ({state}, domain {domain_uuid}, ssh port {ssh_port})")
        return self.get_vm(spec.name)

    def set_state(self, name: str, state: VMState | str, message: str | None = None) -> None:
        state = VMState(state)  # a state the ledger does not know is a bug: ValueError
        with self.transaction() as db:
            cur = db.execute("UPDATE vms SET state = ?, updated_at = ? WHERE name = ?", (state, time.time(), name))
            if cur.rowcount == 0:
                raise NotFound(f"no VM named {name!r}")
            host = db.execute("SELECT host FROM vms WHERE name = ?", (name,)).fetchone()[0]
            self._event(db, name, host, f"state.{state}", message or f"{name} is {state}")

    def move_ssh_port(self, name: str, bind_address: str, refused: int, probe: bool = True,
                      port_range: tuple[int, int] = DEFAULT_PORT_RANGE) -> int:
        """Give a VM a new SSH forward port because ``refused`` could not be bound at start (another process on
        its host holds it). The new port is free in the ledger, and with ``probe`` on this machine too (the VM's
        host is this machine); the move is an event."""
        with self.transaction() as db:
            host = db.execute("SELECT host FROM vms WHERE name = ?", (name,)).fetchone()[0]
            used = {r[0] for r in db.execute("SELECT ssh_port FROM vms WHERE host = ?", (host,))} | {refused}
            port = _free_port(port_range, used, bind_address if probe else None)
            db.execute("UPDATE vms SET ssh_port = ?, updated_at = ? WHERE name = ?", (port, time.time(), name))
            self._event(db, name, host, "port.moved", f"SSH forward port {refused} was taken by another process; "
                        f"{name} now forwards {bind_address}:{port}", {"from": refused, "to": port})
        return port

    def get_vm(self, name: str) -> VMRecord:
        row = self.db.execute("SELECT * FROM vms WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no VM named {name!r}", hint="`hvctl list` shows the VMs hvctl knows")
        return vm_from_row(row)

    def list_vms(self, host: str | None = None) -> list[VMRecord]:
        query = "SELECT * FROM vms" + (" WHERE host = ?" if host else "") + " ORDER BY name"
        return [vm_from_row(r) for r in self.db.execute(query, (host,) if host else ())]

    def set_domain_uuid(self, name: str, uuid: str) -> None:
        """The UUID libvirt gave the VM's domain: how every host is asked whether it runs it."""
        with self.transaction() as db:
            db.execute("UPDATE vms SET domain_uuid = ? WHERE name = ?", (uuid, name))

    # -- operations: durable intents, and each VM's operation lock ----------------------------------------------

    def begin_operation(self, vm: str, kind: str, holder: str, source: str | None, target: str | None,
                        data: dict[str, Any]) -> dict[str, Any] | None:
        """Take VM ``vm``'s operation lock by writing the intent row; returns None if taken, else the row of the
        operation that holds it (nothing is written then)."""
        now = time.time()
        with self.transaction() as db:
            row = db.execute("SELECT * FROM operations WHERE vm = ?", (vm,)).fetchone()
            if row is not None:
                return operation_from_row(row)
            db.execute("INSERT INTO operations (vm, kind, source, target, step, data, holder, started_at, "
                       "updated_at) VALUES (?,?,?,?,?,?,?,?,?)",
                       (vm, kind, source, target, "begun", json.dumps(data), holder, now, now))
        return None

    def operation_step(self, vm: str, holder: str, step: str, data: dict[str, Any]) -> None:
        """Record that the holder's operation on ``vm`` reached ``step``; ``data`` is merged into what it has made."""
        with self.transaction() as db:
            row = db.execute("SELECT data FROM operations WHERE vm = ? AND holder = ?", (vm, holder)).fetchone()
            if row is None:
                raise LedgerError(f"the operation on {vm} is no longer this command's (taken over by a repair?)")
            merged = json.loads(row[0]) | data
            db.execute("UPDATE operations SET step = ?, data = ?, updated_at = ? WHERE vm = ? AND holder = ?",
                       (step, json.dumps(merged), time.time(), vm, holder))

    def end_operation(self, vm: str, holder: str | None = None) -> None:
        """Release the lock: the operation finished, was rolled back, or was reconciled (``holder`` None)."""
        with self.transaction() as db:
            if holder is None:
                db.execute("DELETE FROM operations WHERE vm = ?", (vm,))
            else:
                db.execute("DELETE FROM operations WHERE vm = ? AND holder = ?", (vm, holder))

    def operations(self) -> list[dict[str, Any]]:
        return [operation_from_row(r) for r in self.db.execute("SELECT * FROM operations ORDER BY started_at")]

    def delete_vm(self, name: str, message: str) -> None:
        with self.transaction() as db:
            row = db.execute("SELECT host FROM vms WHERE name = ?", (name,)).fetchone()
            db.execute("DELETE FROM vms WHERE name = ?", (name,))
            self._event(db, name, row[0] if row else None, "vm.deleted", message)

    # -- accounting and reservations --------------------------------------------------------------------------

    def _admit(self, db: sqlite3.Connection, spec: VMSpec, host: str, admission: Admission) -> None:
        refusal = first_excess(f"tenant {spec.tenant}", tenant_charge(spec), self.tenant_usage(spec.tenant, db),
                               admission.tenant_limit) or \
            first_excess(f"host {host}", host_footprint(spec), self.host_usage(host, db), admission.host_limit)
        if refusal:
            raise QuotaExceeded(refusal)

    def resize_vm(self, name: str, spec: VMSpec, admission: Admission) -> VMRecord:
        """Record ``spec`` (the same VM with other vCPUs, memory or disk) as the VM's, admitting only what grows:
        the tenant's quota and the host's capacity are checked for the increase, in the transaction that records
        it, so concurrent creates and resizes can never together overshoot either."""
        with self.transaction() as db:
            row = db.execute("SELECT * FROM vms WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise NotFound(f"no VM named {name!r}")
            old = vm_from_row(row)
            grow = {key: max(getattr(tenant_charge(spec), key) - getattr(tenant_charge(old.spec), key), 0)
                    for key in ("vcpus", "memory_mib", "disk_gib")}
            host_grow = {key: max(getattr(host_footprint(spec), key) - getattr(host_footprint(old.spec), key), 0)
                         for key in ("vcpus", "memory_mib", "disk_gib")}
            refusal = first_excess(f"tenant {old.tenant}", Usage(**grow), self.tenant_usage(old.tenant, db),
                                   admission.tenant_limit) or \
                first_excess(f"host {old.host}", Usage(**host_grow), self.host_usage(old.host, db),
                             admission.host_limit)
            if refusal:
                raise QuotaExceeded(f"resize of {name}: {refusal}")
            db.execute("UPDATE vms SET spec = ?, updated_at = ? WHERE name = ?",
                       (spec.model_dump_json(), time.time(), name))
            self._event(db, name, old.host, "vm.resized",
                        f"{name}: {old.spec.vcpus} → {spec.vcpus} vCPU, {old.spec.memory_mib} → {spec.memory_mib} "
                        f"MiB, disk {old.spec.disk_gib} → {spec.disk_gib} GiB")
        return self.get_vm(name)

    def reserve(self, host: str, tenant: str, usage: Usage, kind: str, vm: str | None = None,
                counts_against_tenant: bool = False, host_limit: dict[str, float | None] | None = None) -> int:
        """Hold resources on a host for an operation in flight (a migration target, say) until it commits or
        rolls back. A migration's reservation does not count against its tenant: the VM is already charged once,
        so a tenant at its full quota can still be migrated (kubevirt#9238)."""
        with self.transaction() as db:
            if host_limit is not None:
                refusal = first_excess(f"host {host}", usage, self.host_usage(host, db), host_limit)
                if refusal:
                    raise QuotaExceeded(refusal)
            cur = db.execute("INSERT INTO reservations (host, tenant, vm, kind, usage, counts_against_tenant, "
                             "created_at) VALUES (?,?,?,?,?,?,?)", (host, tenant, vm, kind,
                                                                    json.dumps(usage.as_dict()),
                                                                    int(counts_against_tenant), time.time()))
            self._event(db, vm, host, f"reservation.{kind}", f"reserved {usage.as_dict()} on {host}")
            return int(cur.lastrowid or 0)

    def release(self, reservation_id: int) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM reservations WHERE id = ?", (reservation_id,))

    def release_for(self, vm: str, kind: str, host: str) -> int:
        """Release every ``kind`` reservation held for ``vm`` on ``host`` (a crashed operation's); returns how many."""
        with self.transaction() as db:
            return int(db.execute("DELETE FROM reservations WHERE vm = ? AND kind = ? AND host = ?",
                                  (vm, kind, host)).rowcount)

    def reservations(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.execute("SELECT * FROM reservations ORDER BY id")]

    def record_host_inventory(self, name: str, numa: list[dict[str, int]], gpus: list[dict[str, str]]) -> None:
        with self.transaction() as db:
            db.execute("UPDATE hosts SET numa = ?, gpus = ? WHERE name = ?", (json.dumps(numa), json.dumps(gpus),
                                                                             name))

    def host_inventory(self, name: str) -> tuple[list[dict[str, int]], list[dict[str, str]]]:
        row = self.db.execute("SELECT numa, gpus FROM hosts WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"unknown host {name!r}")
        return json.loads(row[0] or "[]"), json.loads(row[1] or "[]")

    def remove_host(self, name: str) -> None:
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM vms WHERE host = ?", (name,)).fetchone():
                raise HvctlError(f"host {name} still has VMs; destroy or migrate them first")
            if db.execute("DELETE FROM hosts WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"unknown host {name!r}")
            self._event(db, None, name, "host.removed", f"host {name} removed")

    def set_host_enabled(self, name: str, enabled: bool) -> None:
        with self.transaction() as db:
            if db.execute("UPDATE hosts SET enabled = ? WHERE name = ?", (int(enabled), name)).rowcount == 0:
                raise NotFound(f"unknown host {name!r}")

    def free_port_on(self, host: str, port_range: tuple[int, int] = DEFAULT_PORT_RANGE,
                     bind_address: str | None = "127.0.0.1") -> int:
        """A port no VM of ``host`` holds, also free on ``bind_address`` here unless that is None."""
        used = {r[0] for r in self.db.execute("SELECT ssh_port FROM vms WHERE host = ?", (host,))}
        return _free_port(port_range, used, bind_address)

    def complete_migration(self, name: str, target: str, ssh_port: int, reservation_id: int,
                           stats: dict[str, Any], moved: dict[str, str] | None = None) -> None:
        """One transaction: the VM moves to the target with its new port, the reservation becomes its allocation
        there (by being released as the VM's own row now counts), and the source's share is freed.

        ``moved``: a checkpoint-migration's new incarnation has its own files, agent token and host key."""
        columns = dict(moved or {})
        if set(columns) - MOVABLE_COLUMNS:
            raise LedgerError(f"cannot move {sorted(set(columns) - MOVABLE_COLUMNS)} in a migration")
        with self.transaction() as db:
            source = db.execute("SELECT host FROM vms WHERE name = ?", (name,)).fetchone()[0]
            sets = "".join(f", {column} = ?" for column in columns)
            db.execute(f"UPDATE vms SET host = ?, ssh_port = ?, updated_at = ?{sets} WHERE name = ?",  # noqa: S608
                       (target, ssh_port, time.time(), *columns.values(), name))
            db.execute("DELETE FROM reservations WHERE id = ?", (reservation_id,))
            self._event(db, name, target, "migration.completed", f"migrated {name} from {source} to {target}", stats)

    def last_event_data(self, vm: str, kind: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT data FROM events WHERE vm = ? AND kind = ? ORDER BY id DESC LIMIT 1",
                              (vm, kind)).fetchone()
        return json.loads(row[0]) if row and row[0] else None

    # -- tenant keys ------------------------------------------------------------------------------------------

    def add_tenant_key(self, tenant: str, pubkey: str) -> bool:
        """Authorise a public key for a tenant's future VMs. Returns False if it was already there."""
        with self.transaction() as db:
            cur = db.execute("INSERT OR IGNORE INTO tenant_keys (tenant, pubkey, added_at) VALUES (?, ?, ?)",
                             (tenant, pubkey, time.time()))
            if cur.rowcount:
                self._event(db, None, None, "tenant.key-added", f"key added for tenant {tenant}")
            return bool(cur.rowcount)

    def remove_tenant_key(self, tenant: str, pubkey: str) -> bool:
        """Forget a tenant's key. Returns False if it was not there."""
        with self.transaction() as db:
            cur = db.execute("DELETE FROM tenant_keys WHERE tenant = ? AND pubkey = ?", (tenant, pubkey))
            if cur.rowcount:
                self._event(db, None, None, "tenant.key-removed", f"key removed for tenant {tenant}")
            return bool(cur.rowcount)

    def tenant_keys(self, tenant: str | None = None) -> list[tuple[str, str]]:
        query = "SELECT tenant, pubkey FROM tenant_keys" + (" WHERE tenant = ?" if tenant else "")
        return [(r[0], r[1]) for r in self.db.execute(query + " ORDER BY tenant, added_at", (tenant,) if tenant
                                                      else ())]

    def set_agent_token(self, name: str, token: str) -> None:
        with self.transaction() as db:
            cur = db.execute("UPDATE vms SET agent_token = ?, updated_at = ? WHERE name = ?",
                             (token, time.time(), name))
            if cur.rowcount == 0:
                raise NotFound(f"no VM named {name!r}")
            host = db.execute("SELECT host FROM vms WHERE name = ?", (name,)).fetchone()[0]
            self._event(db, name, host, "agent.token-rotated", f"{name}'s agent token was rotated")

    def set_host_pubkey(self, name: str, pubkey: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE vms SET host_pubkey = ? WHERE name = ?", (pubkey, name))

    # -- events -----------------------------------------------------------------------------------------------

    def events(self, vm: str | None = None, limit: int = 50, after: int = 0) -> list[Event]:
        """The last ``limit`` events (of ``vm``), oldest first; with ``after``, only those with a larger id."""
        query = "SELECT * FROM events WHERE id > ?" + (" AND vm = ?" if vm else "") + " ORDER BY id DESC LIMIT ?"
        rows = self.db.execute(query, (after, vm, limit) if vm else (after, limit)).fetchall()
        return [event_from_row(r) for r in reversed(rows)]

    def events_of_kind(self, kind: str) -> list[Event]:
        """Every event of ``kind``, oldest first (what metrics count: migrations done and failed)."""
        rows = self.db.execute("SELECT * FROM events WHERE kind = ? ORDER BY id", (kind,)).fetchall()
        return [event_from_row(r) for r in rows]

    def operation_progress(self, vm: str, holder: str, progress: dict[str, Any]) -> None:
        """Merge ``progress`` into the running operation's data under "progress", leaving its step as it is: what
        a second shell's `hvctl show` reads while a migration runs."""
        with self.transaction() as db:
            row = db.execute("SELECT data FROM operations WHERE vm = ? AND holder = ?", (vm, holder)).fetchone()
            if row is not None:
                merged = json.loads(row[0]) | {"progress": progress}
                db.execute("UPDATE operations SET data = ?, updated_at = ? WHERE vm = ? AND holder = ?",
                           (json.dumps(merged), time.time(), vm, holder))


def _insert_vm(db: sqlite3.Connection, spec: VMSpec, host: str, paths: VMPaths, port: int, state: str, now: float,
               agent_token: str | None, host_pubkey: str | None, domain_uuid: str | None) -> None:
    db.execute(
        "INSERT INTO vms (name, tenant, host, spec, state, image, base_disk, overlay, console_log, agent_socket, "
        "ssh_port, created_at, updated_at, agent_token, host_pubkey, seed, domain_uuid) "
        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (spec.name, spec.tenant, host, spec.model_dump_json(), state, spec.image, str(paths.base_disk),
         str(paths.overlay), str(paths.console_log), str(paths.agent_socket), port, now, now, agent_token,
         host_pubkey, str(paths.seed), domain_uuid),
    )


def _free_port(port_range: tuple[int, int], used: set[int], bind_address: str | None) -> int:
    """The lowest port in range that no VM in the ledger holds and, unless ``bind_address`` is None, that nothing
    on this machine is bound to."""
    for port in range(port_range[0], port_range[1] + 1):
        if port in used:
            continue
        if bind_address is None:
            return port
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((bind_address, port))
            except OSError:
                continue
        return port
    raise LedgerError(f"no free SSH forward port in {port_range[0]}-{port_range[1]}")
