"""hvctl killed with SIGKILL right after each step of a migration or a destroy (the HVCTL_CRASH_AFTER hook, so no
timing is involved), then `hvctl doctor --repair`: the VM is either fully where the ledger says, running and
answering, or fully gone, and nothing leaks (no domain, file, ledger row, reservation or operation lock). Two
private libvirtd daemons on this machine are the two hosts, as in test_vm_migrate.py.

Each test prints its row of the matrix: the step killed after, what the repair did, and where the VM ended up."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TwoHosts, short_tempdir, two_local_hosts

from guest import rpc
from hvctl.accounting import host_footprint
from hvctl.context import Context
from hvctl.host import DomainState
from hvctl.ledger import VMRecord
from hvctl.ops.create import create
from hvctl.ops.incarnation import BootOptions
from hvctl.ops.lifecycle import destroy
from hvctl.ops.target import bindable_here
from hvctl.spec import VMSpec
from images.store import ImageStore

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def rig(image_dir: Path) -> Iterator[TwoHosts]:
    with two_local_hosts(short_tempdir("hvk-"), image_dir) as hosts:
        yield hosts


def hvctl(rig: TwoHosts, *args: str, crash_after: str | None = None,
          timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return rig.hvctl(*args, timeout=timeout, crash_after=crash_after)


def crash_then_repair(rig: TwoHosts, crash_after: str, *args: str) -> str:
    killed = hvctl(rig, *args, crash_after=crash_after)
    assert killed.returncode == -9, f"{crash_after}: not killed ({killed.returncode}): {killed.stderr}"
    doctor = json.loads(hvctl(rig, "doctor", "--json").stdout)
    ops = {c["name"]: c for c in doctor}["operations"]
    assert not ops["ok"] and "interrupted" in ops["detail"] and "doctor --repair" in (ops["hint"] or "")
    repaired = hvctl(rig, "doctor", "--repair", "--json")
    (done,) = json.loads(repaired.stdout)["repaired"]["operations"]
    assert not done["outcome"].startswith("undecided"), done
    return str(done["outcome"])


def no_leftovers(ctx: Context) -> None:
    assert ctx.ledger.operations.all() == [] and ctx.ledger.reservations.all() == []


def ticks(console: Path) -> list[int]:
    return [int(n) for n in re.findall(r"hvctl-tick (\d+)", console.read_text(errors="replace"))]


def keeps_ticking(console: Path) -> None:
    before = max(ticks(console))
    deadline = time.monotonic() + 60  # a hang guard: a live guest ticks every second
    while max(ticks(console)) <= before:
        assert time.monotonic() < deadline, "the guest stopped counting"
        time.sleep(0.5)


def other(host: str) -> str:
    return "h2" if host == "h1" else "h1"


def test_a_live_migration_killed_after_any_step_is_finished_or_rolled_back(rig: TwoHosts) -> None:
    ctx = rig.ctx
    record = create(ctx, VMSpec.parse(name="crasher", memory_mib=128, host="h1"),
                    options=BootOptions(extra_cmdline=("hvctl.tick=1",)))
    assert record.domain_uuid is None or len(record.domain_uuid) == 36
    assert ctx.ledger.vms.get("crasher").domain_uuid  # recorded at create
    matrix = []
    for step, moves in (("checked", False), ("reserved", False), ("migrated", True), ("committed", True)):
        source = ctx.ledger.vms.get("crasher").host
        target = other(source)
        outcome = crash_then_repair(rig, f"migrate.{step}", "migrate", "crasher", "--to", target)
        now = ctx.ledger.vms.get("crasher")
        expected = target if moves else source
        assert now.host == expected, (step, outcome)
        assert ctx.host(expected).state("crasher") is DomainState.RUNNING
        assert ctx.host(other(expected)).state("crasher") is DomainState.MISSING
        no_leftovers(ctx)
        keeps_ticking(now.console_log)
        assert now.console_log.read_text(errors="replace").count("HVCTL-READY") == 1  # never rebooted
        matrix.append(f"| live migrate | {step} | {outcome} | on {expected} |")
    print("\n" + "\n".join(matrix))
    destroy(ctx, "crasher")
    no_leftovers(ctx)


def test_a_copy_storage_migration_killed_after_any_step_leaves_one_disk_in_use(rig: TwoHosts,
                                                                               image_dir: Path) -> None:
    """After each repair exactly one copy of the disk exists, the one the ledger names and the VM runs from; the
    guest reads back from it a file written before the first move."""
    ctx = rig.ctx
    ImageStore(image_dir).build("base")
    create(ctx, VMSpec.parse(name="porter", memory_mib=512, disk_gib=2, image="base", host="h1"),
           options=BootOptions(timeout=180))
    marker = secrets.token_hex(8)

    def run(record: VMRecord, script: str) -> rpc.ExecResult:
        assert record.agent_token is not None
        return ctx.agent(record.host, record.name, record.agent_token, timeout=60).typed(
            "exec", rpc.ExecResult, rpc.ExecParams(argv=["sh", "-c", script]))

    assert run(ctx.ledger.vms.get("porter"), f"echo {marker} > /root/marker && sync").exit_code == 0
    dirs = {ctx.paths.vm_dir("porter"), ctx.paths.vm_dir("porter", 1)}
    matrix = []
    for step, moves in (("checked", False), ("reserved", False), ("prepared", False), ("migrated", True),
                        ("committed", True)):
        before = ctx.ledger.vms.get("porter")
        target = other(before.host)
        outcome = crash_then_repair(rig, f"migrate.{step}", "migrate", "porter", "--to", target, "--copy-storage")
        now = ctx.ledger.vms.get("porter")
        expected = target if moves else before.host
        assert now.host == expected, (step, outcome)
        assert ctx.host(expected).state("porter") is DomainState.RUNNING
        assert ctx.host(other(expected)).state("porter") is DomainState.MISSING
        assert {d for d in dirs if d.exists()} == {now.overlay.parent}, step  # one disk: the one in use
        assert now.overlay.exists()
        read = run(now, "echo 3 > /proc/sys/vm/drop_caches; cat /root/marker")
        assert read.exit_code == 0 and read.stdout.strip() == marker, (step, read.stderr)
        no_leftovers(ctx)
        matrix.append(f"| copy-storage migrate | {step} | {outcome} | on {expected} |")
    print("\n" + "\n".join(matrix))
    destroy(ctx, "porter")
    assert not any(d.exists() for d in dirs)


def test_a_destroy_killed_after_any_step_is_finished(rig: TwoHosts) -> None:
    ctx = rig.ctx
    matrix = []
    for step in ("marked", "undefined", "files-removed"):
        name = f"doomed-{step}"
        record = create(ctx, VMSpec.parse(name=name, memory_mib=128, host="h1"))
        outcome = crash_then_repair(rig, f"destroy.{step}", "destroy", name)
        assert name not in {v.name for v in ctx.ledger.vms.all()}
        assert ctx.host("h1").state(name) is DomainState.MISSING
        assert not record.overlay.parent.exists()
        no_leftovers(ctx)
        matrix.append(f"| destroy | {step} | {outcome} | gone |")
    print("\n" + "\n".join(matrix))


def test_a_create_killed_after_any_step_is_rolled_back(rig: TwoHosts) -> None:
    ctx = rig.ctx
    matrix = []
    for step in ("reserved", "files", "defined", "started", "ready"):
        name = f"half-{step}"
        outcome = crash_then_repair(rig, f"create.{step}", "create", name, "--memory", "128", "--host", "h1")
        assert name not in {v.name for v in ctx.ledger.vms.all()}, outcome
        assert ctx.host("h1").state(name) is DomainState.MISSING
        assert not ctx.paths.vm_dir(name).exists()
        no_leftovers(ctx)
        matrix.append(f"| create | {step} | {outcome} | gone |")
    print("\n" + "\n".join(matrix))
    # The name is free again: a create that is not killed works.
    made = hvctl(rig, "create", "half-ready", "--memory", "128", "--host", "h1")
    assert made.returncode == 0, made.stderr
    destroy(ctx, "half-ready")


def test_a_stop_or_start_killed_after_any_step_leaves_the_ledger_saying_what_libvirt_does(
        rig: TwoHosts) -> None:
    """A stop killed after it asked the guest to power off is finished by the repair; a start killed after libvirt
    started the domain is recorded as running, and the guest does come up."""
    ctx = rig.ctx
    record = create(ctx, VMSpec.parse(name="switch", memory_mib=128, host="h1"))
    matrix = []
    for kind, step, expected in (("stop", "asked", "stopped"), ("stop", "powered-off", "stopped"),
                                 ("start", "started", "running")):
        args = ("stop", "switch", "--timeout", "30") if kind == "stop" else ("start", "switch")
        outcome = crash_then_repair(rig, f"{kind}.{step}", *args)
        now = ctx.ledger.vms.get("switch")
        actual = ctx.host("h1").state("switch")
        assert now.state == expected, (kind, step, outcome)
        assert actual is (DomainState.RUNNING if expected == "running" else DomainState.SHUTOFF), (kind, step)
        no_leftovers(ctx)
        matrix.append(f"| {kind} | {step} | {outcome} | {expected} |")
        if kind == "stop" and step == "asked":
            started = hvctl(rig, "start", "switch")  # back up for the next stop
            assert started.returncode == 0, started.stderr
    deadline = time.monotonic() + 120  # a hang guard: the started guest reports ready on its console
    while record.console_log.read_text(errors="replace").count("HVCTL-READY") < 3:
        assert time.monotonic() < deadline, "the guest started by the killed start never came up"
        time.sleep(0.5)
    print("\n" + "\n".join(matrix))
    destroy(ctx, "switch")


def test_destroy_never_deletes_the_disk_of_a_vm_running_on_another_host(rig: TwoHosts) -> None:
    """The original failure: the ledger names h1, the domain runs on h2 (a migration whose commit was lost, with
    no intent left to say so). destroy must find it there by UUID and refuse, deleting nothing."""
    ctx = rig.ctx
    record = create(ctx, VMSpec.parse(name="stray", memory_mib=128, host="h1"))
    killed = hvctl(rig, "migrate", "stray", "--to", "h2", crash_after="migrate.migrated")
    assert killed.returncode == -9
    ctx.ledger.operations.end("stray")  # the intent lost too: only the hosts can tell where it runs
    ctx.ledger.reservations.release_for("stray", "migration", "h2")
    refused = hvctl(rig, "destroy", "stray")
    assert refused.returncode != 0 and "stray's domain is on host h2 (running)" in refused.stderr, refused.stderr
    assert record.overlay.exists() and ctx.host("h2").state("stray") is DomainState.RUNNING
    listed = json.loads(hvctl(rig, "list", "--json").stdout)
    assert {v["name"]: v["actual"] for v in listed["vms"]}["stray"] == "missing"
    # Put the ledger right by hand (what a reconcile with the intent would have done), then destroy works.
    port = ctx.ledger.vms.free_port_on("h2", port_free=bindable_here("127.0.0.1"))
    reservation = ctx.ledger.reservations.hold("h2", record.tenant, host_footprint(record.spec), "migration",
                                                vm="stray")
    ctx.ledger.vms.complete_migration("stray", "h2", port, reservation, {"by": "test"})
    gone = hvctl(rig, "destroy", "stray")
    assert gone.returncode == 0, gone.stderr
    assert not record.overlay.parent.exists() and ctx.host("h2").state("stray") is DomainState.MISSING
    no_leftovers(ctx)


def test_a_vm_whose_ledger_row_was_lost_is_adopted_back_and_runs_on(rig: TwoHosts) -> None:
    """The ledger lost a running VM's row (a restored backup, a hand edit): `list` shows the domain as an orphan
    with `hvctl adopt` in its hint; adopt puts the row back as it was, read from the domain and its seed; the guest
    never stopped, and stop, start and destroy then work on it as on any VM, leaving nothing."""
    ctx = rig.ctx
    before = create(ctx, VMSpec.parse(name="lost", memory_mib=128, host="h2"),
                    options=BootOptions(extra_cmdline=("hvctl.tick=1",)))
    ctx.ledger.vms.delete("lost", "test: the row is lost")
    listed = json.loads(hvctl(rig, "list", "--json").stdout)
    ((orphan_host, hint),) = [(o["host"], o["problem"]) for o in listed["orphans"] if o["vm"] == "lost"]
    assert orphan_host == "h2" and "`hvctl adopt lost --host h2`" in hint, hint
    wrong_host = hvctl(rig, "adopt", "lost", "--host", "h1")
    assert wrong_host.returncode == 3 and "host h1 has no domain 'lost'" in wrong_host.stderr
    adopted = hvctl(rig, "adopt", "lost", "--host", "h2", "--json")
    assert adopted.returncode == 0, adopted.stderr
    after = ctx.ledger.vms.get("lost")
    fields = ("host", "state", "domain_uuid", "ssh_port", "overlay", "seed", "console_log", "base_disk",
              "agent_socket", "agent_token", "host_pubkey")
    assert [getattr(after, f) for f in fields] == [getattr(before, f) for f in fields]
    assert json.loads(adopted.stdout)["domain_uuid"] == before.domain_uuid
    keeps_ticking(before.console_log)
    listed = json.loads(hvctl(rig, "list", "--json").stdout)
    assert [(v["actual"], v["drift"]) for v in listed["vms"] if v["name"] == "lost"] == [("running", None)]
    assert [o for o in listed["orphans"] if o["vm"] == "lost"] == []
    for args in (("stop", "lost"), ("start", "lost")):
        done = hvctl(rig, *args)
        assert done.returncode == 0, (args, done.stderr)
    keeps_ticking(before.console_log)
    gone = hvctl(rig, "destroy", "lost")
    assert gone.returncode == 0, gone.stderr
    assert not before.overlay.parent.exists() and ctx.host("h2").state("lost") is DomainState.MISSING
    assert "lost" not in {v.name for v in ctx.ledger.vms.all()}
    no_leftovers(ctx)
