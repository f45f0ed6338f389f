"""The ledger on both its backends, each real: SQLite files, and databases on a PostgreSQL server the session starts
(tests/pgserver.py). Migrations, atomic reservations under real concurrency, events."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from framework.pgserver import PgServer

from hvctl.errors import AlreadyExists, LedgerError, NotFound
from hvctl.ledger import MIGRATIONS, Ledger, VMPaths
from hvctl.ops.target import bindable_here
from hvctl.ops.volumes import UploadLease
from hvctl.spec import VMSpec


def reserve(ledger: Ledger, name: str, tmp: Path, port_range: tuple[int, int] = (22200, 22999),
            host: str = "local", probe_ports: bool = True) -> int:
    vm = tmp / name
    return ledger.vms.reserve(VMSpec(name=name), host, VMPaths(tmp / "base.qcow2", vm / "disk.qcow2", vm / "seed.iso",
                                                            vm / "console.log", vm / "agent.sock"),
                             port_range=port_range,
                             port_free=bindable_here("127.0.0.1") if probe_ports else None).ssh_port


@pytest.fixture
def ledger(ledger_location: str) -> Iterator[Ledger]:
    led = Ledger(ledger_location)
    led.hosts.ensure("local", "qemu:///system")
    yield led
    led.close()


def test_fresh_sqlite_ledger_is_migrated_and_uses_wal(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    assert ledger.schema_version == len(MIGRATIONS) and ledger.store.backend == "sqlite"
    assert ledger.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in ledger.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"hosts", "vms", "events"} <= tables


def test_fresh_postgresql_ledger_is_migrated_with_double_precision_times(pg_server: PgServer) -> None:
    ledger = Ledger(pg_server.new_database())
    assert ledger.schema_version == len(MIGRATIONS) and ledger.store.backend == "postgresql"
    columns = dict(ledger.db.execute("SELECT column_name, data_type FROM information_schema.columns "
                                     "WHERE table_name = 'events'").fetchall())
    assert columns["ts"] == "double precision" and columns["id"] == "bigint"
    ledger.events.log(None, None, "x", "y")
    (event,) = ledger.events.of_kind("x")
    assert abs(event.ts - time.time()) < 3600 and event.ts != round(event.ts)  # not a 4-byte float's minutes
    info = ledger.store.describe()
    assert info.backend == "postgresql" and info.version.split(".")[0].isdigit() and not info.standby


def test_reopening_does_not_migrate_twice(tmp_path: Path, ledger_location: str) -> None:
    ledger = Ledger(ledger_location)
    ledger.hosts.ensure("local", "qemu:///system")
    reserve(ledger, "a", tmp_path)
    ledger.close()
    again = Ledger(ledger_location)
    assert [v.name for v in again.vms.all()] == ["a"] and again.schema_version == len(MIGRATIONS)


def test_ledger_from_a_newer_hvctl_is_refused(ledger_location: str) -> None:
    Ledger(ledger_location).close()
    if ledger_location.startswith("postgresql://"):
        with psycopg.connect(ledger_location, autocommit=True) as db:
            db.execute("UPDATE hvctl_schema SET version = %s", (len(MIGRATIONS) + 5,))
    else:
        db = sqlite3.connect(ledger_location)
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 5}")
        db.close()
    with pytest.raises(LedgerError, match="newer than this hvctl"):
        Ledger(ledger_location)


def test_an_unreachable_postgresql_ledger_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match=r"cannot connect to ledger postgresql://hvctl:\*\*\*@/x\?host="):
        Ledger(f"postgresql://hvctl:secret@/x?host={tmp_path}")


def test_reservation_state_changes_and_events(ledger: Ledger, tmp_path: Path) -> None:
    port = reserve(ledger, "web", tmp_path)
    assert ledger.vms.get("web").state == "creating"
    ledger.vms.set_state("web", "running", "booted")
    assert ledger.vms.get("web").state == "running"
    with pytest.raises(AlreadyExists):
        reserve(ledger, "web", tmp_path)
    assert reserve(ledger, "db", tmp_path) != port
    ledger.vms.delete("web", "gone")
    with pytest.raises(NotFound):
        ledger.vms.get("web")
    kinds = [e.kind for e in ledger.events.recent("web")]
    assert kinds == ["create.requested", "state.running", "vm.deleted"]


def test_failed_transaction_leaves_nothing(ledger: Ledger, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), ledger.transaction() as db:
        db.execute("INSERT INTO events (ts, kind, message) VALUES (0, 'x', 'y')")
        raise RuntimeError("boom")
    assert ledger.db.execute("SELECT COUNT(*) FROM events WHERE kind = 'x'").fetchone()[0] == 0


def test_ports_exhausted_is_a_clear_error(ledger: Ledger, tmp_path: Path) -> None:
    reserve(ledger, "a", tmp_path, port_range=(22900, 22900))
    with pytest.raises(LedgerError, match="no free SSH forward port in 22900-22900"):
        reserve(ledger, "b", tmp_path, port_range=(22900, 22900))
    with pytest.raises(NotFound):
        ledger.vms.get("b")


def test_concurrent_reservations_from_many_connections_never_collide(tmp_path: Path, ledger_location: str) -> None:
    """Twenty threads, each with its own connection to one ledger, race to reserve VMs and ports."""
    Ledger(ledger_location).hosts.ensure("local", "qemu:///system")
    ports: list[int] = []
    errors: list[Exception] = []
    barrier = threading.Barrier(20)

    def worker(i: int) -> None:
        led = Ledger(ledger_location)
        barrier.wait()
        try:
            ports.append(reserve(led, f"vm-{i}", tmp_path, port_range=(22300, 22339)))
            # Every thread also races for the same name; exactly one may win.
            ports.append(reserve(led, "contested", tmp_path, port_range=(22300, 22339)))
        except AlreadyExists as exc:
            errors.append(exc)
        finally:
            led.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ports) == 21 and len(set(ports)) == 21
    assert len(errors) == 19


def test_a_migration_commit_moves_the_vm_and_its_new_incarnation_in_one_transaction(ledger: Ledger,
                                                                                    tmp_path: Path) -> None:
    from hvctl.accounting import host_footprint

    ledger.hosts.ensure("h2", "test:///default")
    reserve(ledger, "vm1", tmp_path)
    held = ledger.reservations.hold("h2", "default", host_footprint(VMSpec(name="vm1")), "migration", vm="vm1")
    assert ledger.host_usage("h2").memory_mib > 0
    new = tmp_path / "vms" / "vm1.g1"
    with pytest.raises(LedgerError, match="cannot move"):
        ledger.vms.complete_migration("vm1", "h2", 22300, held, {}, moved={"tenant": "mallory"})
    assert ledger.vms.get("vm1").host == "local" and len(ledger.reservations.all()) == 1
    ledger.vms.complete_migration("vm1", "h2", 22300, held, {"mode": "checkpoint"},
                              moved={"overlay": str(new / "disk.qcow2"), "agent_token": "t2"})
    moved = ledger.vms.get("vm1")
    assert (moved.host, moved.ssh_port, moved.overlay, moved.agent_token) == ("h2", 22300, new / "disk.qcow2", "t2")
    assert ledger.reservations.all() == [] and ledger.host_usage("local").memory_mib == 0
    assert ledger.host_usage("h2") == host_footprint(moved.spec)
    assert ledger.events.last_data("vm1", "migration.completed") == {"mode": "checkpoint"}


def test_ports_are_per_host_and_another_hosts_are_not_probed_here(ledger: Ledger, tmp_path: Path) -> None:
    """A port bound on this machine is skipped for a VM here, but says nothing about another host's loopback: that
    host's VMs get the lowest port its own VMs do not hold (a taken one is moved at start, where QEMU reports it)."""
    import socket

    ledger.hosts.ensure("far", "qemu+ssh://root@198.18.1.2/system")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        span = (taken, taken + 1)
        assert reserve(ledger, "here", tmp_path, span) == taken + 1
        assert reserve(ledger, "there", tmp_path, span, host="far", probe_ports=False) == taken
        assert reserve(ledger, "there2", tmp_path, span, host="far", probe_ports=False) == taken + 1
        with pytest.raises(LedgerError, match="no free SSH forward port"):
            reserve(ledger, "there3", tmp_path, span, host="far", probe_ports=False)
        moved = ledger.vms.move_ssh_port("there", "127.0.0.1", taken, port_range=(taken, taken + 5))
        assert moved == taken + 2 and ledger.vms.get("there").ssh_port == moved
        assert [e.kind for e in ledger.events.recent("there")][-1] == "port.moved"


def test_snapshots_are_charged_against_the_tenants_disk_and_released_with_them(ledger: Ledger,
                                                                                tmp_path: Path) -> None:
    from hvctl.ledger import Admission, QuotaExceeded

    vm = tmp_path / "snap"
    spec = VMSpec(name="snap", disk_gib=4, memory_mib=1536)
    paths = VMPaths(tmp_path / "base.qcow2", vm / "disk.qcow2", vm / "seed.iso", vm / "console.log", vm / "agent.sock")
    ledger.vms.reserve(spec, "local", paths)
    limits = Admission(tenant_limit={"disk_gib": 14}, host_limit={"disk_gib": None})
    disk = ledger.snapshots.reserve("snap", "cold", False, limits)
    assert (disk.disk_gib, disk.state) == (4, "creating")
    # With memory, the saved RAM counts too, rounded up to GiB: 4 + 2.
    warm = ledger.snapshots.reserve("snap", "warm", True, limits)
    assert warm.disk_gib == 6 and ledger.tenant_usage("default").disk_gib == 14
    assert ledger.host_usage("local").disk_gib == 14
    with pytest.raises(QuotaExceeded, match="snapshot more of snap: tenant default: disk 4 GiB requested, 14 of 14"):
        ledger.snapshots.reserve("snap", "more", False, limits)
    assert [s.name for s in ledger.snapshots.all("snap")] == ["cold", "warm"]
    with pytest.raises(AlreadyExists):
        ledger.snapshots.reserve("snap", "cold", False, Admission({}, {}))
    ledger.snapshots.delete("snap", "cold", "gone")
    assert ledger.tenant_usage("default").disk_gib == 10
    # The VM's row going takes its snapshots' rows (and charges) with it.
    ledger.vms.delete("snap", "destroyed")
    assert ledger.snapshots.all() == [] and ledger.tenant_usage("default").disk_gib == 0


def test_a_migrations_reservation_holds_its_port_on_the_target(ledger: Ledger, tmp_path: Path) -> None:
    """Two migrations to one host at once, and a create there meanwhile, never get the same SSH forward port: each
    port is chosen in the transaction that records who holds it."""
    from hvctl.accounting import Usage

    ledger.hosts.ensure("h2", "qemu+ssh://root@198.18.0.2/system")
    span = (22400, 22410)
    first, p1 = ledger.reservations.hold_with_port("h2", "default", Usage(vcpus=1), "migration", "m1", port_range=span)
    second, p2 = ledger.reservations.hold_with_port("h2", "default", Usage(vcpus=1), "migration", "m2",
                                                    port_range=span)
    assert (p1, p2) == (22400, 22401)
    assert reserve(ledger, "made", tmp_path, span, host="h2", probe_ports=False) == 22402
    assert {r.ssh_port for r in ledger.reservations.all()} == {22400, 22401}
    ledger.reservations.release(first)
    assert reserve(ledger, "next", tmp_path, span, host="h2", probe_ports=False) == 22400
    ledger.reservations.release(second)


def test_one_command_at_a_time_uploads_an_image_to_a_host_and_a_dead_holders_turn_is_taken_over(
        ledger: Ledger, ledger_location: str) -> None:
    """Two commands of this process stand for two creates onto a new host (their holders differ past the part that
    is checked for life); a third holder is a process that is gone."""
    from types import SimpleNamespace
    from typing import cast

    from hvctl.ops.intent import this_holder
    from images.store import Image

    image = cast(Image, SimpleNamespace(name="minimal", content_hash="c0ffee"))
    said: list[str] = []
    second_in = threading.Event()

    def second() -> None:
        other = Ledger(ledger_location)
        try:
            with UploadLease(other.hosts, "far", image, said.append, holder=f"{this_holder()}/second"):
                second_in.set()
        finally:
            other.close()

    first = UploadLease(ledger.hosts, "far", image, holder=f"{this_holder()}/first")
    with first:
        waiting = threading.Thread(target=second)
        waiting.start()
        deadline = time.monotonic() + 60  # a hang guard: the second says it waits as soon as it finds the claim
        while not said and time.monotonic() < deadline:
            time.sleep(0.05)
        assert said == ["another command is uploading image minimal to host far: waiting for it"]
        first.renew()
        assert not second_in.is_set()
    waiting.join(60)
    assert second_in.is_set() and not waiting.is_alive()
    # A holder on this machine whose process is gone (no such pid) holds nothing: its claim is taken over at once.
    machine, boot = this_holder().split("/")[:2]
    assert ledger.hosts.claim_upload("far", "c0ffee", f"{machine}/{boot}/999999999/1") is None
    said.clear()
    with UploadLease(ledger.hosts, "far", image, said.append):
        assert said == []
        assert ledger.hosts.claim_upload("far", "c0ffee", "someone-else") is not None
    assert ledger.hosts.claim_upload("far", "c0ffee", "someone-else") is None  # the turn was given back
