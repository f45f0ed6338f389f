"""Live migration between two "hosts": two private libvirtd daemons on this machine, each in its own mount
namespace with its own config and state, reached over TCP on loopback (see ../shared/ENVIRONMENT.md). The guest
prints a counter every second; it must keep counting on the destination, without a reboot."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TwoHosts, remote_hosts, short_tempdir, two_local_hosts
from framework.devhost import PrivateLibvirtd
from framework.devhost.remote import RemoteStyleHost

from guest import rpc
from hvctl.context import Context
from hvctl.host import DomainState
from hvctl.ledger import VMRecord
from hvctl.ops.create import create
from hvctl.ops.incarnation import BootOptions
from hvctl.ops.lifecycle import destroy
from hvctl.spec import VMSpec
from images.store import ImageStore

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def hosts(image_dir: Path) -> Iterator[TwoHosts]:
    with two_local_hosts(short_tempdir("hvm-"), image_dir) as rig:
        yield rig


def hvctl(h: TwoHosts, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return h.hvctl(*args, timeout=timeout)


def ticks(console: Path) -> list[int]:
    return [int(n) for n in re.findall(r"hvctl-tick (\d+)", console.read_text(errors="replace"))]


def boot_ticker(ctx: Context, name: str, host: str) -> Path:
    record = create(ctx, VMSpec.parse(name=name, memory_mib=128, host=host),
                    options=BootOptions(extra_cmdline=("hvctl.tick=1",)))
    deadline = time.monotonic() + 30
    while len(ticks(record.console_log)) < 3:
        assert time.monotonic() < deadline, "the guest never started counting"
        time.sleep(0.2)
    return record.console_log


def test_live_migration_keeps_the_guest_counting_on_the_destination(hosts: TwoHosts) -> None:
    ctx = hosts.ctx
    console = boot_ticker(ctx, "mover", "h1")
    before = max(ticks(console))
    offset = console.stat().st_size
    result = hvctl(hosts, "migrate", "mover", "--to", "h2", "--max-downtime", "500", "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["host"] == "h2" and stats["total_s"] > 0 and stats["bytes"] > 0
    time.sleep(3)
    # The console file is appended to by both hosts' virtlogd. What it gained since the move began is the
    # counter carrying on from where it was, and no second boot.
    gained = console.read_bytes()[offset:].decode(errors="replace")
    after = [int(n) for n in re.findall(r"hvctl-tick (\d+)", gained)]
    assert after and min(after) >= before and max(after) > before
    assert console.read_text(errors="replace").count("HVCTL-READY") == 1
    assert ctx.ledger.vms.get("mover").host == "h2"
    assert ctx.host("h1").state("mover") is DomainState.MISSING
    assert ctx.host("h2").state("mover") is DomainState.RUNNING
    assert ctx.ledger.reservations.all() == []
    shown = json.loads(hvctl(hosts, "show", "mover", "--json").stdout)
    assert shown["host"] == "h2" and shown["last_migration"]["total_s"] == stats["total_s"]
    print(f"live migration: {stats['total_s']} s total, downtime {stats['downtime_ms']} ms, {stats['bytes']} bytes")


def test_the_agent_answers_after_live_migrations_on_shared_storage_there_and_back(hosts: TwoHosts,
                                                                                 image_dir: Path) -> None:
    """Both QEMUs see one filesystem, and the source's, exiting after the switch-over, unlinks its channel socket:
    with the destination on the same path, the agent was unreachable after every live migration. The destination
    now listens on the other of two socket names; the agent answers there, and back again."""
    ctx = hosts.ctx
    ImageStore(image_dir).build("base")
    create(ctx, VMSpec.parse(name="talker", memory_mib=384, image="base", host="h1"),
           options=BootOptions(timeout=300))
    uptimes = []
    for there, socket_name in (("h2", "agent.live"), ("h1", "agent.sock")):
        result = hvctl(hosts, "migrate", "talker", "--to", there, "--json")
        assert result.returncode == 0, result.stderr
        record = ctx.ledger.vms.get("talker")
        assert record.host == there and record.agent_socket.name == socket_name
        pong = hvctl(hosts, "agent", "talker", "ping", "--json")
        assert pong.returncode == 0, (there, pong.stderr)
        uptimes.append(json.loads(pong.stdout)["uptime_s"])
    assert uptimes[1] > uptimes[0]  # the same agent process, not a reboot
    destroy(ctx, "talker")


def test_copy_storage_moves_the_disk_and_the_guest_reads_its_data_back_from_it(hosts: TwoHosts,
                                                                               image_dir: Path) -> None:
    """A Debian guest writes a file to its disk; the migration mirrors its overlay into a new file the destination
    QEMU uses. After the page cache is dropped, the guest reads the file back from the copied disk."""
    ctx = hosts.ctx
    ImageStore(image_dir).build("base")
    old = create(ctx, VMSpec.parse(name="carrier", memory_mib=512, disk_gib=2, image="base", host="h1"),
                 options=BootOptions(timeout=180))
    marker = secrets.token_hex(8)
    wrote = agent_exec(ctx, old, f"echo {marker} > /root/marker && sync")
    assert wrote.exit_code == 0, wrote.stderr
    result = hvctl(hosts, "migrate", "carrier", "--to", "h2", "--copy-storage", "--json")
    assert result.returncode == 0, result.stderr
    moved = ctx.ledger.vms.get("carrier")
    assert moved.host == "h2" and moved.overlay.parent == ctx.paths.vm_dir("carrier", 1)
    assert not old.overlay.exists() and not old.overlay.parent.exists()
    on_h2 = ctx.host("h2").guest("carrier").xml()
    assert str(moved.overlay) in on_h2 and str(old.overlay) not in on_h2
    assert ctx.host("h1").state("carrier") is DomainState.MISSING and ctx.ledger.reservations.all() == []
    read = agent_exec(ctx, moved, "echo 3 > /proc/sys/vm/drop_caches; cat /root/marker")
    assert read.exit_code == 0 and read.stdout.strip() == marker, read.stderr
    stats = json.loads(result.stdout)
    print(f"copy-storage migration: {stats['total_s']} s, {stats['bytes']} bytes")
    destroy(ctx, "carrier")
    assert not moved.overlay.parent.exists()


def agent_exec(ctx: Context, record: VMRecord, script: str) -> rpc.ExecResult:
    assert record.agent_token is not None
    return ctx.agent(record.host, record.name, record.agent_token, timeout=60).typed(
        "exec", rpc.ExecResult, rpc.ExecParams(argv=["sh", "-c", script]))


def test_auto_converge_moves_a_guest_that_keeps_dirtying_memory(hosts: TwoHosts) -> None:
    ctx = hosts.ctx
    record = create(ctx, VMSpec.parse(name="dirty", memory_mib=128, host="h1"),
                    options=BootOptions(extra_cmdline=("hvctl.dirty=48",)))
    deadline = time.monotonic() + 30
    while "HVCTL-DIRTY" not in record.console_log.read_text(errors="replace"):
        assert time.monotonic() < deadline, "the guest never started dirtying memory"
        time.sleep(0.2)
    time.sleep(2)
    result = hvctl(hosts, "migrate", "dirty", "--to", "h2", "--auto-converge", "--bandwidth", "16",
                   "--timeout", "120", "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    # 48 MiB rewritten continuously cannot go in one pass at 16 MiB/s: several iterations, more than RAM sent.
    assert stats["memory_iterations"] >= 3 and stats["bytes"] > 128 * 2**20
    assert ctx.ledger.vms.get("dirty").host == "h2" and ctx.host("h2").state("dirty") is DomainState.RUNNING
    destroy(ctx, "dirty")


def test_bad_migrations_are_refused_before_anything_moves(hosts: TwoHosts) -> None:
    ctx = hosts.ctx
    here = ctx.ledger.vms.get("mover").host
    same = hvctl(hosts, "migrate", "mover", "--to", here)
    assert same.returncode == 2 and "already on host" in same.stderr
    unknown_host = hvctl(hosts, "migrate", "mover", "--to", "nowhere")
    assert unknown_host.returncode == 3 and "unknown host 'nowhere'" in unknown_host.stderr
    unknown_vm = hvctl(hosts, "migrate", "ghost", "--to", "h1")
    assert unknown_vm.returncode == 3 and "no VM named 'ghost'" in unknown_vm.stderr
    # A target too small for the VM: the numbers come back and nothing is reserved or moved.
    other = "h1" if here == "h2" else "h2"
    record = ctx.ledger.hosts.get(other)
    ctx.ledger.hosts.record_facts(other, record.accel or "qemu", record.cpus or 1, 600)
    try:
        full = hvctl(hosts, "migrate", "mover", "--to", other)
        assert full.returncode == 13 and f"host {other}: memory" in full.stderr and "in use" in full.stderr
    finally:
        ctx.ledger.hosts.record_facts(other, record.accel or "qemu", record.cpus or 1, record.memory_mib or 0)
    assert ctx.ledger.vms.get("mover").host == here and ctx.ledger.reservations.all() == []


def test_evacuate_disables_the_host_and_moves_running_and_stopped_vms_off_it(hosts: TwoHosts) -> None:
    ctx = hosts.ctx
    console = boot_ticker(ctx, "ev-run", "h1")
    create(ctx, VMSpec.parse(name="ev-off", memory_mib=128, host="h1"))
    assert hvctl(hosts, "stop", "ev-off").returncode == 0
    before = max(ticks(console))
    result = hvctl(hosts, "host", "evacuate", "h1", "--json")
    assert result.returncode == 0, result.stderr + result.stdout
    report = json.loads(result.stdout)
    modes = {m["vm"]: (m["to"], m["mode"]) for m in report["moved"]}
    assert modes["ev-run"] == ("h2", "live") and modes["ev-off"] == ("h2", "offline") and report["failed"] == []
    assert ctx.ledger.vms.all(host="h1") == [] and not ctx.ledger.hosts.get("h1").enabled
    # The running guest kept counting through the move; the stopped one is defined, stopped, on h2.
    time.sleep(2)
    assert max(ticks(console)) > before and console.read_text(errors="replace").count("HVCTL-READY") == 1
    assert ctx.host("h2").state("ev-run") is DomainState.RUNNING
    assert ctx.host("h2").state("ev-off") is DomainState.SHUTOFF and ctx.host("h1").state("ev-off") is \
        DomainState.MISSING
    # Nothing new lands on a disabled host, by the scheduler or by hand.
    refused = hvctl(hosts, "create", "ev-new", "--host", "h1", "--memory", "128")
    assert refused.returncode == 17 and "host h1 is disabled" in refused.stderr
    back = hvctl(hosts, "migrate", "ev-run", "--to", "h1")
    assert back.returncode == 17 and "host h1 is disabled" in back.stderr
    assert hvctl(hosts, "host", "enable", "h1").returncode == 0 and ctx.ledger.hosts.get("h1").enabled
    kinds = [e.kind for e in ctx.ledger.events.recent(None, 500)]
    assert {"host.disabled", "host.evacuated", "host.enabled"} <= set(kinds)
    destroy(ctx, "ev-run")
    destroy(ctx, "ev-off")


def test_cancel_leaves_the_vm_on_the_source(hosts: TwoHosts) -> None:
    ctx = hosts.ctx
    console = boot_ticker(ctx, "stayer", "h1")
    env = os.environ | {"HVCTL_STATE_DIR": str(hosts.state), "HVCTL_CONNECT": hosts.h1.uri}
    # 1 MiB/s: the 128 MiB guest takes minutes to copy, so the cancel lands mid-flight.
    proc = subprocess.Popen([sys.executable, "-m", "hvctl.cli", "migrate", "stayer", "--to", "h2", "--bandwidth", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    # A second shell sees the migration's progress while it runs: in `show` and in the event log.
    deadline = time.monotonic() + 60
    operation = None
    while time.monotonic() < deadline:
        operation = json.loads(hvctl(hosts, "show", "stayer", "--json").stdout)["operation"]
        if operation and operation["progress"] and operation["progress"]["bytes_done"] > 0:
            break
        time.sleep(0.5)
    assert operation and operation["kind"] == "migrate" and operation["target"] == "h2", operation
    assert operation["progress"]["bytes_done"] > 0 and operation["progress"]["percent"] < 100
    progress = [e for e in json.loads(hvctl(hosts, "events", "--vm", "stayer", "--json").stdout)
                if e["kind"] == "migration.progress"]
    assert progress and "migrating to h2" in progress[-1]["message"] and progress[-1]["data"]["bytes_done"] > 0
    assert hvctl(hosts, "migrate", "stayer", "--cancel").returncode == 0
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 15 and "still on h1" in err
    assert ctx.ledger.vms.get("stayer").host == "h1" and ctx.ledger.reservations.all() == []
    assert ctx.host("h1").state("stayer") is DomainState.RUNNING
    counted = max(ticks(console))
    time.sleep(2.5)
    assert max(ticks(console)) > counted, "the guest stopped counting after the cancel"
    assert [e.kind for e in ctx.ledger.events.recent("stayer")][-1] == "migration.failed"


def test_killing_the_destination_daemon_mid_migration_leaves_the_source_running(hosts: TwoHosts) -> None:
    ctx = hosts.ctx
    console = ctx.ledger.vms.get("stayer").console_log
    env = os.environ | {"HVCTL_STATE_DIR": str(hosts.state), "HVCTL_CONNECT": hosts.h1.uri}
    proc = subprocess.Popen([sys.executable, "-m", "hvctl.cli", "migrate", "stayer", "--to", "h2", "--bandwidth", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(4)
    h2 = hosts.h2
    assert isinstance(h2, PrivateLibvirtd)
    pid = int(h2.pidfile.read_text())
    os.kill(pid, signal.SIGKILL)
    # The incoming QEMU dies with its daemon's connection gone or is killed here, as a crashed host's would.
    for pidfile in (h2.root / "run/libvirt/qemu").glob("*.pid"):
        with contextlib.suppress(ValueError, ProcessLookupError):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0 and "still on h1" in err, err
    assert ctx.ledger.vms.get("stayer").host == "h1" and ctx.ledger.reservations.all() == []
    assert ctx.host("h1").state("stayer") is DomainState.RUNNING
    counted = max(ticks(console))
    time.sleep(2.5)
    assert max(ticks(console)) > counted, "the source guest stopped after the destination died"


def test_copy_storage_takes_a_vm_to_a_remote_host_and_back_with_no_shared_storage(hosts: TwoHosts,
                                                                                  image_dir: Path) -> None:
    """h1 (a daemon on this machine) → far (a remote-style host that cannot see this machine's files) → h1, live,
    with --copy-storage: each time the overlay is mirrored into a new disk on the target (a volume in far's pool,
    then a file here again), the guest keeps running (its uptime only grows) and reads back from the copied disk
    a file written before the first move; each source's copy is deleted."""
    ImageStore(image_dir).build("base")
    with remote_hosts({"far": 44}, hide=(hosts.state,)) as started:
        try:
            moved_there_and_back(hosts, started["far"])
        finally:
            with contextlib.suppress(Exception):
                destroy(hosts.ctx, "rover")
            hvctl(hosts, "host", "rm", "far")


def uptime(ctx: Context, record: VMRecord) -> float:
    assert record.agent_token is not None
    return float(ctx.agent(record.host, record.name, record.agent_token, timeout=60).call("ping").uptime_s)


def moved_there_and_back(hosts: TwoHosts, far: RemoteStyleHost) -> None:
    ctx = hosts.ctx
    added = hvctl(hosts, "host", "add", "far", far.uri)
    assert added.returncode == 0, added.stderr
    home = create(ctx, VMSpec.parse(name="rover", memory_mib=512, disk_gib=2, image="base", host="h1"),
                  options=BootOptions(timeout=180))
    marker = secrets.token_hex(8)
    assert agent_exec(ctx, home, f"echo {marker} > /root/marker && sync").exit_code == 0
    up = uptime(ctx, home)

    out = hvctl(hosts, "migrate", "rover", "--to", "far", "--copy-storage", "--json", timeout=600)
    assert out.returncode == 0, out.stderr
    there = ctx.ledger.vms.get("rover")
    assert there.host == "far" and str(there.overlay) == "/var/lib/libvirt/images/hvctl/vm-rover.qcow2"
    assert {"vm-rover.qcow2", "vm-rover.seed.iso"} <= set(far.pool_listing())
    assert not home.overlay.parent.exists()  # the source's copy, here, is gone
    assert ctx.host("h1").state("rover") is DomainState.MISSING and ctx.ledger.reservations.all() == []
    read = agent_exec(ctx, there, "echo 3 > /proc/sys/vm/drop_caches; cat /root/marker")
    assert read.exit_code == 0 and read.stdout.strip() == marker, read.stderr
    assert uptime(ctx, there) > up
    up = uptime(ctx, there)

    # Killed after the disk was made here for the way back, before anything moved: the repair deletes that
    # unused copy and the VM stays on far, its pool volumes untouched.
    killed = hosts.hvctl("migrate", "rover", "--to", "h1", "--copy-storage", crash_after="migrate.prepared",
                         timeout=600)
    assert killed.returncode == -9, killed.stderr
    assert any(d.exists() for d in (ctx.paths.vm_dir("rover"), ctx.paths.vm_dir("rover", 1)))
    repaired = json.loads(hvctl(hosts, "doctor", "--repair", "--json").stdout)["repaired"]["operations"]
    assert [r["outcome"] for r in repaired] == ["it never left far: rolled back"], repaired
    assert not any(d.exists() for d in (ctx.paths.vm_dir("rover"), ctx.paths.vm_dir("rover", 1)))
    assert ctx.ledger.vms.get("rover").host == "far"
    assert {"vm-rover.qcow2", "vm-rover.seed.iso"} <= set(far.pool_listing())
    assert ctx.ledger.reservations.all() == [] and ctx.ledger.operations.all() == []

    back = hvctl(hosts, "migrate", "rover", "--to", "h1", "--copy-storage", "--json", timeout=600)
    assert back.returncode == 0, back.stderr
    again = ctx.ledger.vms.get("rover")
    assert again.host == "h1" and again.overlay.exists() and again.overlay.parent != home.overlay.parent
    assert not [f for f in far.pool_listing() if f.startswith("vm-")]  # far's copy is gone
    read = agent_exec(ctx, again, "echo 3 > /proc/sys/vm/drop_caches; cat /root/marker")
    assert read.exit_code == 0 and read.stdout.strip() == marker, read.stderr
    assert uptime(ctx, again) > up
    stats = json.loads(out.stdout), json.loads(back.stdout)
    print(f"h1 -> far: {stats[0]['total_s']} s, {stats[0]['bytes']} bytes; "
          f"far -> h1: {stats[1]['total_s']} s, {stats[1]['bytes']} bytes")
    destroy(ctx, "rover")
    assert not again.overlay.parent.exists()
