"""The ledger's VMs: each one's row (spec, host, state, files, SSH port, keys), written with its admission (the
tenant's quota and the host's capacity, checked against what is in use) and its tenant-network address in one
transaction, so that concurrent creates can never together overshoot a limit or share an address or port."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hvctl.accounting import Usage, first_excess, host_footprint, tenant_charge
from hvctl.errors import AlreadyExists, HvctlError, LedgerError, NotFound
from hvctl.ledger.core import Connection, Repository
from hvctl.ledger.networks import assign_address, record_address
from hvctl.ledger.records import (
    DEFAULT_PORT_RANGE,
    MOVABLE_COLUMNS,
    Admission,
    QuotaExceeded,
    VMPaths,
    VMRecord,
    VMState,
    vm_from_row,
)

if TYPE_CHECKING:
    from hvctl.spec import VMSpec

# Whether a port is free where a VM's SSH forward will listen (``hvctl.ops.target.bindable_here`` on this machine).
# The ledger knows which ports its rows hold, never what else a host runs: whoever can ask the host says.
PortCheck = Callable[[int], bool]


class VMs(Repository):
    def reserve(
        self, spec: VMSpec, host: str, paths: VMPaths, *, agent_token: str | None = None,
        host_pubkey: str | None = None, admission: Admission | None = None,
        port_range: tuple[int, int] = DEFAULT_PORT_RANGE, port_free: PortCheck | None = None,
    ) -> VMRecord:
        """Record the intent to create a VM and allocate its SSH port, atomically: one that no VM of the host
        holds, and that ``port_free`` says is free (given where the host can be asked: this machine). Another
        host's ports cannot be probed from here: its QEMU reports a taken one at start, and the boot moves it.
        State starts as 'creating'.

        With ``admission``, the tenant's quota and the host's capacity are checked in the same transaction, so
        concurrent creates can never together overshoot either.
        """
        try:
            return self._reserve(spec, host, paths, agent_token, host_pubkey, admission, port_range, port_free)
        except QuotaExceeded as exc:
            # The refusal is worth keeping, but its transaction was rolled back: record it on its own.
            self._store.log_event(spec.name, host, "admission.refused", exc.message)
            raise

    def _reserve(self, spec: VMSpec, host: str, paths: VMPaths, agent_token: str | None,
                    host_pubkey: str | None, admission: Admission | None, port_range: tuple[int, int],
                    port_free: PortCheck | None) -> VMRecord:
        now = time.time()
        with self._store.transaction() as db:
            if db.execute("SELECT 1 FROM vms WHERE name = ?", (spec.name,)).fetchone():
                raise AlreadyExists(f"VM {spec.name!r} already exists")
            if admission is not None:
                self._admit(db, spec, host, admission)
            spec = assign_address(db, spec)
            port = free_port(port_range, used_ports(db, host), port_free)
            _insert_vm(db, spec, host, paths, port, "creating", now, agent_token, host_pubkey, None)
            record_address(db, spec)
            self._store.event(db, spec.name, host, "create.requested", f"create {spec.name} on {host}, ssh port {port}")
        return self.get(spec.name)

    def adopt(self, spec: VMSpec, host: str, paths: VMPaths, *, ssh_port: int, state: str, domain_uuid: str,
                 agent_token: str | None, host_pubkey: str | None, admission: Admission) -> VMRecord:
        """Record a VM whose domain already exists (``hvctl adopt``), as it is: its port, its files, its domain's
        UUID. Admitted like a create, in the same transaction, so an adopted VM counts against its tenant's quota
        and its host's capacity; a port another VM of the host holds is refused."""
        with self._store.transaction() as db:
            if db.execute("SELECT 1 FROM vms WHERE name = ?", (spec.name,)).fetchone():
                raise AlreadyExists(f"VM {spec.name!r} is already in the ledger")
            holder = db.execute("SELECT name FROM vms WHERE host = ? AND ssh_port = ?", (host, ssh_port)).fetchone()
            if holder:
                raise HvctlError(f"{spec.name}'s SSH forward port {ssh_port} is VM {holder[0]}'s on host {host}; "
                                 "the two cannot both run", hint=f"`hvctl destroy {spec.name} --orphan --host {host}`")
            self._admit(db, spec, host, admission)
            spec = assign_address(db, spec)
            _insert_vm(db, spec, host, paths, ssh_port, state, time.time(), agent_token, host_pubkey, domain_uuid)
            record_address(db, spec)
            self._store.event(db, spec.name, host, "vm.adopted",
                        f"adopted {spec.name} on {host} ({state}, domain {domain_uuid}, ssh port {ssh_port})")
        return self.get(spec.name)

    def get(self, name: str) -> VMRecord:
        row = self._db.execute("SELECT * FROM vms WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no VM named {name!r}", hint="`hvctl list` shows the VMs hvctl knows")
        return vm_from_row(row)

    def all(self, host: str | None = None) -> list[VMRecord]:
        query = "SELECT * FROM vms" + (" WHERE host = ?" if host else "") + " ORDER BY name"
        return [vm_from_row(r) for r in self._db.execute(query, (host,) if host else ())]

    def set_state(self, name: str, state: VMState | str, message: str | None = None) -> None:
        state = VMState(state)  # a state the ledger does not know is a bug: ValueError
        with self._store.transaction() as db:
            cur = db.execute("UPDATE vms SET state = ?, updated_at = ? WHERE name = ?", (state, time.time(), name))
            if cur.rowcount == 0:
                raise NotFound(f"no VM named {name!r}")
            host = db.execute("SELECT host FROM vms WHERE name = ?", (name,)).fetchone()[0]
            self._store.event(db, name, host, f"state.{state}", message or f"{name} is {state}")

    def move_ssh_port(self, name: str, bind_address: str, refused: int, port_free: PortCheck | None = None,
                      port_range: tuple[int, int] = DEFAULT_PORT_RANGE) -> int:
        """Give a VM a new SSH forward port because ``refused`` could not be bound at start (another process on
        its host holds it). The new port is free in the ledger, and as ``port_free`` says; the move is an
        event."""
        with self._store.transaction() as db:
            host = db.execute("SELECT host FROM vms WHERE name = ?", (name,)).fetchone()[0]
            used = used_ports(db, host) | {refused}
            port = free_port(port_range, used, port_free)
            db.execute("UPDATE vms SET ssh_port = ?, updated_at = ? WHERE name = ?", (port, time.time(), name))
            self._store.event(db, name, host, "port.moved", f"SSH forward port {refused} was taken by another process; "
                        f"{name} now forwards {bind_address}:{port}", {"from": refused, "to": port})
        return port

    def set_domain_uuid(self, name: str, uuid: str) -> None:
        """The UUID libvirt gave the VM's domain: how every host is asked whether it runs it."""
        with self._store.transaction() as db:
            db.execute("UPDATE vms SET domain_uuid = ? WHERE name = ?", (uuid, name))

    def set_agent_token(self, name: str, token: str) -> None:
        with self._store.transaction() as db:
            cur = db.execute("UPDATE vms SET agent_token = ?, updated_at = ? WHERE name = ?",
                             (token, time.time(), name))
            if cur.rowcount == 0:
                raise NotFound(f"no VM named {name!r}")
            host = db.execute("SELECT host FROM vms WHERE name = ?", (name,)).fetchone()[0]
            self._store.event(db, name, host, "agent.token-rotated", f"{name}'s agent token was rotated")

    def set_host_pubkey(self, name: str, pubkey: str) -> None:
        with self._store.transaction() as db:
            db.execute("UPDATE vms SET host_pubkey = ? WHERE name = ?", (pubkey, name))

    def delete(self, name: str, message: str) -> None:
        with self._store.transaction() as db:
            row = db.execute("SELECT host FROM vms WHERE name = ?", (name,)).fetchone()
            db.execute("DELETE FROM vms WHERE name = ?", (name,))
            self._store.event(db, name, row[0] if row else None, "vm.deleted", message)

    def _admit(self, db: Connection, spec: VMSpec, host: str, admission: Admission) -> None:
        refusal = first_excess(f"tenant {spec.tenant}", tenant_charge(spec), self._store.tenant_usage(spec.tenant, db),
                               admission.tenant_limit) or \
            first_excess(f"host {host}", host_footprint(spec), self._store.host_usage(host, db), admission.host_limit)
        if refusal:
            raise QuotaExceeded(refusal)

    def resize(self, name: str, spec: VMSpec, admission: Admission) -> VMRecord:
        """Record ``spec`` (the same VM with other vCPUs, memory or disk) as the VM's, admitting only what grows:
        the tenant's quota and the host's capacity are checked for the increase, in the transaction that records
        it, so concurrent creates and resizes can never together overshoot either."""
        with self._store.transaction() as db:
            row = db.execute("SELECT * FROM vms WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise NotFound(f"no VM named {name!r}")
            old = vm_from_row(row)
            grow = {key: max(getattr(tenant_charge(spec), key) - getattr(tenant_charge(old.spec), key), 0)
                    for key in ("vcpus", "memory_mib", "disk_gib")}
            host_grow = {key: max(getattr(host_footprint(spec), key) - getattr(host_footprint(old.spec), key), 0)
                         for key in ("vcpus", "memory_mib", "disk_gib")}
            refusal = first_excess(f"tenant {old.tenant}", Usage(**grow), self._store.tenant_usage(old.tenant, db),
                                   admission.tenant_limit) or \
                first_excess(f"host {old.host}", Usage(**host_grow), self._store.host_usage(old.host, db),
                             admission.host_limit)
            if refusal:
                raise QuotaExceeded(f"resize of {name}: {refusal}")
            db.execute("UPDATE vms SET spec = ?, updated_at = ? WHERE name = ?",
                       (spec.model_dump_json(), time.time(), name))
            self._store.event(db, name, old.host, "vm.resized",
                        f"{name}: {old.spec.vcpus} → {spec.vcpus} vCPU, {old.spec.memory_mib} → {spec.memory_mib} "
                        f"MiB, disk {old.spec.disk_gib} → {spec.disk_gib} GiB")
        return self.get(name)

    def free_port_on(self, host: str, port_range: tuple[int, int] = DEFAULT_PORT_RANGE,
                     port_free: PortCheck | None = None) -> int:
        """A port no VM of ``host`` holds, and free as ``port_free`` says."""
        return free_port(port_range, used_ports(self._db, host), port_free)

    def complete_migration(self, name: str, target: str, ssh_port: int, reservation_id: int,
                           stats: dict[str, Any], moved: dict[str, str] | None = None) -> None:
        """One transaction: the VM moves to the target with its new port, the reservation becomes its allocation
        there (by being released as the VM's own row now counts), and the source's share is freed.

        ``moved``: a checkpoint-migration's new incarnation has its own files, agent token and host key."""
        columns = dict(moved or {})
        if set(columns) - MOVABLE_COLUMNS:
            raise LedgerError(f"cannot move {sorted(set(columns) - MOVABLE_COLUMNS)} in a migration")
        with self._store.transaction() as db:
            source = db.execute("SELECT host FROM vms WHERE name = ?", (name,)).fetchone()[0]
            sets = "".join(f", {column} = ?" for column in columns)
            db.execute(f"UPDATE vms SET host = ?, ssh_port = ?, updated_at = ?{sets} WHERE name = ?",  # noqa: S608
                       (target, ssh_port, time.time(), *columns.values(), name))
            db.execute("DELETE FROM reservations WHERE id = ?", (reservation_id,))
            self._store.event(db, name, target, "migration.completed",
                              f"migrated {name} from {source} to {target}", stats)


def _insert_vm(db: Connection, spec: VMSpec, host: str, paths: VMPaths, port: int, state: str, now: float,
               agent_token: str | None, host_pubkey: str | None, domain_uuid: str | None) -> None:
    db.execute(
        "INSERT INTO vms (name, tenant, host, spec, state, image, base_disk, overlay, console_log, agent_socket, "
        "ssh_port, created_at, updated_at, agent_token, host_pubkey, seed, domain_uuid) "
        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (spec.name, spec.tenant, host, spec.model_dump_json(), state, spec.image, str(paths.base_disk),
         str(paths.overlay), str(paths.console_log), str(paths.agent_socket), port, now, now, agent_token,
         host_pubkey, str(paths.seed), domain_uuid),
    )


def used_ports(db: Connection, host: str) -> set[int]:
    """The SSH forward ports ``host``'s VMs hold, and those reservations hold there for VMs on their way in."""
    return {r[0] for r in db.execute("SELECT ssh_port FROM vms WHERE host = ? UNION SELECT ssh_port FROM "
                                     "reservations WHERE host = ? AND ssh_port IS NOT NULL", (host, host))}


def free_port(port_range: tuple[int, int], used: set[int], port_free: PortCheck | None) -> int:
    """The lowest port in range that no VM in the ledger holds and that ``port_free``, if given, calls free."""
    for port in range(port_range[0], port_range[1] + 1):
        if port not in used and (port_free is None or port_free(port)):
            return port
    raise LedgerError(f"no free SSH forward port in {port_range[0]}-{port_range[1]}")
