"""Two controllers, one fleet: two hvctl processes, each with its own state dir, share one PostgreSQL ledger (the
session's throwaway server, tests/pgserver.py) and the same two hosts (two private libvirtds on this machine). At
the same time they create VMs (and race for one name), live-migrate each other's, and destroy each other's.
Nothing is allocated twice, no row is lost, each sees the other's VMs, the guests keep counting across the moves,
and nothing is left on either host or in either state dir."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import TwoHosts, short_tempdir, two_local_hosts
from framework.pgserver import PgServer

from hvctl.context import Context
from hvctl.host import DomainState

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]

# One controller process: runs its actions in order and prints one JSON line per action.
CONTROLLER = r"""
import json, sys, traceback
from pathlib import Path
from hvctl.context import Context
from hvctl.errors import HvctlError
from hvctl.ops.create import create
from hvctl.ops.incarnation import BootOptions
from hvctl.ops.lifecycle import destroy
from hvctl.ops.migrate import MigrateOptions, migrate
from hvctl.spec import VMSpec

state, uri, ledger, actions = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
ctx = Context(state_dir=Path(state), uri=uri, ledger_url=ledger)
for verb, name, *rest in actions:
    try:
        if verb == "create":
            create(ctx, VMSpec.parse(name=name, memory_mib=128, host=rest[0]),
                   options=BootOptions(extra_cmdline=("hvctl.tick=1",), timeout=300))
        elif verb == "migrate":
            migrate(ctx, name, rest[0], MigrateOptions(max_downtime_ms=500))
        elif verb == "destroy":
            destroy(ctx, name)
        print(json.dumps({"action": [verb, name, *rest], "ok": True}), flush=True)
    except HvctlError as exc:
        print(json.dumps({"action": [verb, name, *rest], "ok": False, "error": exc.message}), flush=True)
    except Exception:
        print(json.dumps({"action": [verb, name, *rest], "ok": False, "error": traceback.format_exc()}), flush=True)
ctx.close()
"""


@dataclass
class Fleet:
    """Two hosts, one PostgreSQL ledger, and two controllers' state dirs (a: the hosts' own controller's)."""

    hosts: TwoHosts
    url: str
    a: Path
    b: Path

    def state(self, who: str) -> Path:
        return self.a if who == "a" else self.b


@pytest.fixture(scope="module")
def fleet(image_dir: Path, pg_server: PgServer) -> Iterator[Fleet]:
    url = pg_server.new_database()
    with two_local_hosts(short_tempdir("hvw-"), image_dir, ledger_url=url) as rig:
        other = rig.root / "sb"  # as short as "state": agent socket paths must fit in 107 bytes
        other.mkdir(mode=0o755)
        (other / "images").symlink_to(image_dir)
        yield Fleet(rig, url, rig.state, other)


def at_once(fleet: Fleet, plans: dict[str, list[list[str]]]) -> dict[str, list[dict[str, object]]]:
    """Run controller a's and controller b's actions in two processes started together; their results."""
    uri = fleet.hosts.h1.uri
    procs = {who: subprocess.Popen([sys.executable, "-c", CONTROLLER, str(fleet.state(who)), uri, fleet.url,
                                    json.dumps(plan)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for who, plan in plans.items()}
    results = {}
    for who, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        results[who] = [json.loads(line) for line in out.splitlines()]
    return results


def ticks(console: Path, after: int = 0) -> list[int]:
    return [int(n) for n in re.findall(r"hvctl-tick (\d+)", console.read_bytes()[after:].decode(errors="replace"))]


def wait_for_ticks(console: Path, after: int, above: int) -> list[int]:
    """The counter printed since byte ``after``, once it has gone past ``above`` (a generous bound: a guest that
    never counts again fails here)."""
    deadline = time.monotonic() + 120
    while not [t for t in ticks(console, after) if t > above]:
        assert time.monotonic() < deadline, f"{console} stopped counting at {above}"
        time.sleep(0.5)
    return ticks(console, after)


def test_two_controllers_create_migrate_and_destroy_on_one_fleet_at_once(fleet: Fleet) -> None:
    a = Context(state_dir=fleet.a, uri=fleet.hosts.h1.uri, ledger_url=fleet.url)
    b = Context(state_dir=fleet.b, uri=fleet.hosts.h1.uri, ledger_url=fleet.url)
    try:
        made = at_once(fleet, {"a": [["create", "a1", "h1"], ["create", "a2", "h2"], ["create", "twin", "h1"]],
                               "b": [["create", "b1", "h1"], ["create", "b2", "h2"], ["create", "twin", "h2"]]})
        for who, name in (("a", "a1"), ("a", "a2"), ("b", "b1"), ("b", "b2")):
            assert next(r for r in made[who] if r["action"][1] == name)["ok"], made[who]
        twins = [r for rs in made.values() for r in rs if r["action"][1] == "twin"]
        assert sorted(r["ok"] for r in twins) == [False, True], twins  # one name, one VM
        loser = next(r for r in twins if not r["ok"])
        # Refused by the other's operation lock while its create runs, or by its row once done: either way clean.
        refusal = str(loser["error"])
        assert ("already exists" in refusal or "twin is busy: create of twin" in refusal) and "Traceback" not in \
            refusal, loser

        # Each controller sees all five, running, with no (host, port) given twice.
        for ctx in (a, b):
            records = ctx.ledger.vms.all()
            assert sorted(r.name for r in records) == ["a1", "a2", "b1", "b2", "twin"]
            assert len({(r.host, r.ssh_port) for r in records}) == 5
            assert all(ctx.host(r.host).state(r.name) is DomainState.RUNNING for r in records)
        consoles = {r.name: r.console_log for r in a.ledger.vms.all()}
        assert consoles["a1"].is_relative_to(fleet.a) and consoles["b1"].is_relative_to(fleet.b)
        before = {n: (max(wait_for_ticks(consoles[n], 0, 2)), consoles[n].stat().st_size) for n in ("a1", "b1")}

        # Each moves the other's VM, at the same time.
        moved = at_once(fleet, {"a": [["migrate", "b1", "h2"]], "b": [["migrate", "a1", "h2"]]})
        assert all(r["ok"] for rs in moved.values() for r in rs), moved
        for name, (last, offset) in before.items():
            wait_for_ticks(consoles[name], offset, last)  # the same guest counts on, on h2
            assert consoles[name].read_text(errors="replace").count("HVCTL-READY") == 1  # no second boot
            assert a.ledger.vms.get(name).host == "h2" and a.host("h1").state(name) is DomainState.MISSING
        assert a.ledger.reservations.all() == [] and a.ledger.operations.all() == []

        # Each destroys the other's VMs, at the same time; the twin goes by whoever did not make it.
        twin_of = "a" if next(r for r in made["a"] if r["action"][1] == "twin")["ok"] else "b"
        twin = [["destroy", "twin"]]
        gone = at_once(fleet, {"a": [["destroy", "b1"], ["destroy", "b2"], *(twin if twin_of == "b" else [])],
                               "b": [["destroy", "a1"], ["destroy", "a2"], *(twin if twin_of == "a" else [])]})
        assert all(r["ok"] for rs in gone.values() for r in rs), gone
        for ctx in (a, b):
            assert ctx.ledger.vms.all() == [] and ctx.ledger.operations.all() == []
            assert ctx.ledger.reservations.all() == []
        for host in ("h1", "h2"):
            assert a.host(host).conn.listAllDomains() == []
        for state in (fleet.a, fleet.b):
            assert not any((Path(str(state)) / "vms").iterdir()), list((Path(str(state)) / "vms").iterdir())
        kinds = [e.kind for e in a.ledger.events.of_kind("vm.deleted")]
        assert len(kinds) == 5  # every VM's row went, each once
    finally:
        a.close()
        b.close()
