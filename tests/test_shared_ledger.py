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
from collections.abc import Iterator
from pathlib import Path

import pytest
from pgserver import PgServer

from hvctl.ledger import Ledger, VMPaths
from hvctl.spec import VMSpec


def controller(state: Path, ledger: str) -> dict[str, str]:
    return os.environ | {"HVCTL_STATE_DIR": str(state), "HVCTL_LEDGER": ledger, "HVCTL_CONNECT": "test:///default",
                         "COLUMNS": "200", "NO_COLOR": "1"}


def hvctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hvctl.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


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
