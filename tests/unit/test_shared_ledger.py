"""Several controllers, one fleet: the ledger on a real PostgreSQL server (tests/pgserver.py), reached by the CLI
through --ledger / HVCTL_LEDGER / the config file. The hosts are libvirt's test driver; the VM-level checks (two
controllers creating and migrating real VMs at once) are in the VM suite."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from framework.pgserver import PgServer

from hvctl.accounting import Usage
from hvctl.ledger import Ledger, VMPaths
from hvctl.spec import VMSpec


def controller(state: Path, ledger: str) -> dict[str, str]:
    return os.environ | {"HVCTL_STATE_DIR": str(state), "HVCTL_LEDGER": ledger, "HVCTL_CONNECT": "test:///default",
                         "COLUMNS": "200", "NO_COLOR": "1"}


def hvctl(env: dict[str, str], *args: str, input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hvctl.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120, input=input_text)


@pytest.fixture
def short() -> Iterator[Path]:
    """A short directory for state dirs: agent socket paths under a state dir must fit in 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="hvl-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_two_controllers_see_one_fleet_through_one_postgresql_ledger(short: Path, pg_server: PgServer) -> None:
    url = pg_server.new_database()
    tmp_path = short
    a, b = controller(tmp_path / "a", url), controller(tmp_path / "b", url)
    assert hvctl(a, "list", "--json").returncode == 0  # controller a registers host local
    ledger = Ledger(url)
    vm = tmp_path / "a" / "test"
    ledger.vms.reserve(VMSpec(name="test"), "local", VMPaths(vm / "b", vm / "o", vm / "s", vm / "c", vm / "a"))
    ledger.vms.set_state("test", "running")  # "test": the domain libvirt's test driver runs
    ledger.close()

    listing = hvctl(b, "list", "--json")
    assert listing.returncode == 0, listing.stderr
    (view,) = json.loads(listing.stdout)["vms"]
    assert (view["name"], view["host"], view["actual"], view["drift"]) == ("test", "local", "running", None)
    events = hvctl(b, "events", "--vm", "test", "--json")
    assert events.returncode == 0, events.stderr
    assert [e["kind"] for e in json.loads(events.stdout) if e["source"] == "ledger"] == ["create.requested",
                                                                                         "state.running"]

    doctor = hvctl(b, "doctor", "--json")
    checks = {c["name"]: c for c in json.loads(doctor.stdout)}
    assert checks["ledger"]["ok"], checks["ledger"]
    assert "(postgresql " in checks["ledger"]["detail"] and "primary, replicas: none" in checks["ledger"]["detail"]
    # test:///default names each controller's own machine: fine for this test, worth a warning in a real fleet.
    assert checks["ledger"]["warning"] and "host(s) local have machine-local URIs" in checks["ledger"]["detail"]
    # Neither controller made a SQLite ledger of its own.
    assert not (tmp_path / "a" / "ledger.sqlite3").exists() and not (tmp_path / "b" / "ledger.sqlite3").exists()


def test_the_ledger_url_is_a_setting_and_its_password_is_never_shown(tmp_path: Path, pg_server: PgServer) -> None:
    url = pg_server.new_database().replace("postgresql://hvctl@", "postgresql://hvctl:s3cret@")
    config = tmp_path / "config.toml"
    config.write_text(f'ledger = "{url}"\n')
    env = controller(tmp_path / "state", "") | {"HVCTL_CONFIG": str(config)}
    del env["HVCTL_LEDGER"]
    shown = hvctl(env, "config", "--json")
    assert shown.returncode == 0, shown.stderr
    setting = next(s for s in json.loads(shown.stdout)["settings"] if s["setting"] == "ledger")
    assert setting["value"].startswith("postgresql://hvctl:***@/t") and setting["from"].startswith("config file")
    assert "s3cret" not in shown.stdout
    assert hvctl(env, "list", "--json").returncode == 0
    assert not (tmp_path / "state" / "ledger.sqlite3").exists()


def test_an_unreachable_postgresql_ledger_is_one_line_and_no_password(tmp_path: Path) -> None:
    env = controller(tmp_path / "state", f"postgresql://hvctl:s3cret@/hvctl?host={tmp_path}/nowhere")
    result = hvctl(env, "list")
    assert result.returncode == 9, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("hvctl: error: cannot connect to ledger postgresql://hvctl:***@/hvctl?host=")
    assert "Traceback" not in result.stderr and "s3cret" not in result.stderr


def populated(location: str, tmp: Path) -> None:
    """A ledger with a row in every table, through the repositories."""
    from ipaddress import IPv4Address, IPv4Network

    from hvctl.accounting import host_footprint
    from hvctl.ledger import Admission, Hardware, InventoryGpu, NumaCell
    from hvctl.spec import NetworkAttach

    ledger = Ledger(location)
    ledger.hosts.ensure("local", "test:///default")
    ledger.hosts.ensure("h2", "qemu+ssh://root@198.18.0.2/system")
    ledger.hosts.record_facts("h2", "kvm", 16, 65536)
    gpu = InventoryGpu("0000:41:00.0", "h100", "10de:2330")
    ledger.hosts.record_hardware("h2", Hardware((NumaCell(16, 65536),), (gpu,)))
    ledger.networks.add("blue", "acme", IPv4Network("10.96.7.0/24"))
    ledger.networks.set_underlay("h2", IPv4Address("198.18.0.2"))
    for name, host in (("a1", "local"), ("a2", "h2")):
        vm = tmp / name
        attach = NetworkAttach(network="hvctl-net-blue", tenant_network="blue") if name == "a1" else None
        spec = VMSpec(name=name, tenant="acme", network=attach)
        ledger.vms.reserve(spec, host, VMPaths(vm / "b", vm / "o", vm / "s", vm / "c", vm / "a"), agent_token="tok")
        ledger.vms.set_state(name, "running")
    ledger.keys.add("acme", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGFrZQ test")
    ledger.reservations.hold("h2", "acme", host_footprint(VMSpec(name="a1")), "migration", vm="a1")
    ledger.gpus.claim("h2", "a2", ["0000:41:00.0"], frozenset())
    ledger.gpus.mark_unhealthy("h2", "0000:42:00.0", "needs-host-reboot", "reads 0xffff")
    ledger.operations.begin("a2", "stop", "test-holder", None, None, {"step": 1})
    ledger.snapshots.reserve("a1", "s1", False, Admission({}, {}))
    ledger.hosts.claim_upload("h2", "c0ffee", "test-holder")
    ledger.close()


def tables_of(location: str) -> dict[str, Any]:
    from hvctl.ledger import transfer

    ledger = Ledger(location)
    try:
        return transfer.export(ledger.store)["tables"]
    finally:
        ledger.close()


def test_a_fleet_moves_from_sqlite_to_postgresql_and_back_row_for_row(short: Path, pg_server: PgServer) -> None:
    sqlite_ledger, url, back = short / "a" / "ledger.sqlite3", pg_server.new_database(), short / "c" / "back.sqlite3"
    sqlite_ledger.parent.mkdir()
    populated(str(sqlite_ledger), short)
    original = tables_of(str(sqlite_ledger))
    assert all(original[t]["rows"] for t in original), {t: len(v["rows"]) for t, v in original.items()}

    dump = short / "fleet.json"
    out = hvctl(controller(short / "a", "") | {"HVCTL_LEDGER": ""}, "ledger", "export", str(dump))
    assert out.returncode == 0, out.stderr
    assert dump.stat().st_mode & 0o777 == 0o600 and "exported" in out.stdout
    into = hvctl(controller(short / "b", url), "ledger", "import", str(dump), "--json")
    assert into.returncode == 0, into.stderr
    assert json.loads(into.stdout)["rows"]["events"] == len(original["events"]["rows"])
    assert tables_of(url) == original

    # The next ids follow the imported ones on PostgreSQL, and the fleet works there.
    ledger = Ledger(url)
    assert ledger.reservations.hold("h2", "acme", Usage(vcpus=1), "migration") > \
        max(r[0] for r in original["reservations"]["rows"])
    ledger.close()

    again = hvctl(controller(short / "b", url), "ledger", "export", "-")
    assert again.returncode == 0, again.stderr
    back.parent.mkdir()
    home = hvctl(controller(short / "c", f"sqlite://{back}"), "ledger", "import", "-", input_text=again.stdout)
    assert home.returncode == 0, home.stderr
    assert tables_of(str(back)) == tables_of(url)


def test_an_import_into_a_ledger_that_is_not_empty_is_refused_and_changes_nothing(short: Path,
                                                                                 pg_server: PgServer) -> None:
    url = pg_server.new_database()
    populated(url, short)
    before = tables_of(url)
    dump = short / "fleet.json"
    assert hvctl(controller(short / "a", url), "ledger", "export", str(dump)).returncode == 0
    refused = hvctl(controller(short / "a", url), "ledger", "import", str(dump))
    assert refused.returncode == 9 and "is not empty (hosts: 2, vms: 2" in refused.stderr, refused.stderr
    assert tables_of(url) == before


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda d: d | {"schema": 999}, "the export is of ledger schema v999"),
    (lambda d: d | {"format": "other"}, "not an hvctl ledger export"),
    (lambda d: d | {"tables": {}}, "missing: events"),
])
def test_a_foreign_or_future_export_is_refused_in_one_line(short: Path, pg_server: PgServer, edit: Any,
                                                           needle: str) -> None:
    url = pg_server.new_database()
    populated(url, short)
    document = edit(json.loads(hvctl(controller(short / "a", url), "ledger", "export", "-").stdout))
    target = pg_server.new_database()
    refused = hvctl(controller(short / "b", target), "ledger", "import", "-", input_text=json.dumps(document))
    assert refused.returncode == 2 and needle in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert all(not v["rows"] for v in tables_of(target).values())


def test_every_table_of_the_schema_is_exported(ledger_location: str) -> None:
    from hvctl.ledger import transfer

    ledger = Ledger(ledger_location)
    if ledger.store.backend == "sqlite":
        names = {r[0] for r in ledger.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    else:
        names = {r[0] for r in ledger.db.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    ledger.close()
    assert names - {"sqlite_sequence", "hvctl_schema"} == set(transfer.TABLES)


def test_postgresql_killed_mid_create_fails_it_in_one_line_and_leaves_nothing_to_repair(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A create on libvirt's test driver (tests/unit/test_gpu_create.py's rig, no GPU asked) whose ledger server is
    stopped while the create's last ledger transaction is open (a hook on the statement: the fault lands there
    every time). That transaction fails, so the create does: one line. Its undo runs on: the domain and files go at
    once, and its ledger writes wait for the server, which the test starts again; then nothing is left anywhere,
    and `doctor --repair` has nothing to do."""
    from test_gpu_create import Rig

    from hvctl.errors import LedgerError
    from hvctl.host import DomainState
    from hvctl.ledger import postgres
    from hvctl.ops.doctor import repair

    server = PgServer()  # its own: this test stops it
    rig = None
    try:
        rig = Rig(tmp_path, server.new_database())
        real_execute = postgres._PgConnection.execute
        restarted: list[threading.Thread] = []

        def execute(conn: postgres._PgConnection, sql: str, parameters: Any = ()) -> Any:
            if sql.startswith("UPDATE operations SET step") and "ready" in parameters and not restarted:
                server.kill()  # the server is gone before the statement runs, inside the open transaction
                restarted.append(threading.Thread(target=server.launch))
                restarted[0].start()
            return real_execute(conn, sql, parameters)

        monkeypatch.setattr(postgres._PgConnection, "execute", execute)
        with pytest.raises(LedgerError) as failed:
            rig.create("doomed", 0)
        assert restarted, "the hook never fired: the create's step names changed?"
        restarted[0].join()
        message = failed.value.message
        assert message.startswith("ledger postgresql://hvctl@/t1?host=") and "\n" not in message, message
        assert rig.ctx.host().state("doomed") is DomainState.MISSING
        assert not rig.ctx.paths.vm_files("doomed").overlay.parent.exists()
        assert rig.ctx.ledger.vms.all() == [] and rig.ctx.ledger.operations.all() == []
        assert rig.ctx.ledger.reservations.all() == []
        done = repair(rig.ctx)
        assert done.operations == () and done.gpus_returned == (), done
        assert [e.kind for e in rig.ctx.ledger.events.recent("doomed")][-1] == "vm.deleted"
    finally:
        if rig is not None:
            rig.ctx.close()
            shutil.rmtree(rig.state, ignore_errors=True)
        server.stop()


def test_doctor_names_a_streaming_replica_and_refuses_a_standby_as_the_ledger(short: Path,
                                                                               pg_server: PgServer) -> None:
    """A real standby: pg_basebackup of the session's server, started as a streaming replica beside it (its own
    socket directory). The primary's `doctor` lists it; pointed at the standby, `doctor` fails its ledger check."""
    import psycopg

    url = pg_server.new_database()
    Ledger(url).close()  # the schema, made on the primary, replicates with the rest
    standby = PgServer.replica_of(pg_server)
    try:
        database = urlsplit(url).path.lstrip("/")
        with psycopg.connect(pg_server.url("postgres")) as db:  # the standby has caught up to here
            lsn = db.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        standby.wait_for_replay(lsn)
        env = controller(short / "state", url)
        primary = {c["name"]: c for c in json.loads(hvctl(env, "doctor", "--json").stdout)}
        assert "primary, replicas: replica streaming/async" in primary["ledger"]["detail"], primary["ledger"]
        on_standby = hvctl(env | {"HVCTL_LEDGER": standby.url(database)}, "doctor", "--json")
        assert on_standby.stdout, on_standby.stderr
        checks = {c["name"]: c for c in json.loads(on_standby.stdout)}
        assert not checks["ledger"]["ok"] and "a standby" in checks["ledger"]["detail"], checks["ledger"]
        assert checks["ledger"]["hint"].startswith("a standby is read-only")
    finally:
        standby.stop()


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://hvctl:pw@db.example/hvctl", "postgresql://hvctl:***@db.example/hvctl"),
    ("postgresql://hvctl@db.example/hvctl?sslmode=require&password=pw", "postgresql://hvctl@db.example/hvctl?sslmode=require&password=***"),
    ("postgresql://hvctl@/hvctl?host=/run/postgresql", "postgresql://hvctl@/hvctl?host=/run/postgresql"),
])
def test_a_ledger_url_is_shown_without_its_password(url: str, shown: str) -> None:
    from hvctl.ledger.postgres import redact

    assert redact(url) == shown
