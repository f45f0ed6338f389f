"""Durable intents and per-VM operation locks on a real SQLite ledger, with libvirt's test driver as the host:
a live holder refuses a second command, a dead one's intent is reconciled before the lock is taken over, and the
crash hook really kills the process at the named step."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import short_tempdir

from hvctl.context import Context
from hvctl.ops.intent import (
    CRASH_ENV,
    FAIL_ENV,
    InjectedFault,
    OperationBusy,
    holder_alive,
    interrupted,
    operation,
    this_holder,
)


@pytest.fixture
def ctx(ledger_location: str) -> Iterator[Context]:
    """A controller on libvirt's test driver, with its ledger in its state dir (SQLite), then on PostgreSQL: the
    intents and the operation locks work the same on both."""
    state = short_tempdir("hvi-")
    url = ledger_location if ledger_location.startswith("postgresql://") else None
    context = Context(state_dir=state, uri="test:///default", ledger_url=url)
    context.ledger.hosts.ensure("local", "test:///default")
    yield context
    context.close()
    shutil.rmtree(state, ignore_errors=True)


def dead_holder() -> str:
    """A holder string for a process that has exited: this machine and boot, a pid that no longer runs."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    machine, boot, _, _ = this_holder().split("/")
    return f"{machine}/{boot}/{child.stdout.strip()}/1"


def test_this_process_is_alive_and_an_exited_one_is_not() -> None:
    assert holder_alive(this_holder(), 0.0)
    assert not holder_alive(dead_holder(), 0.0)
    # Another boot of this machine: its processes are gone, whatever their pids.
    machine, _, pid, ticks = this_holder().split("/")
    assert not holder_alive(f"{machine}/another-boot/{pid}/{ticks}", 0.0)


def test_a_holder_on_another_machine_is_trusted_until_its_lease_runs_out() -> None:
    """This machine cannot see another's processes: a lock written there holds while its row was updated within
    the lease, and is taken for dead after it (whatever its pid means here)."""
    import time

    from hvctl.ops.intent import LEASE_S

    _, boot, pid, ticks = this_holder().split("/")
    elsewhere = f"another-machine/{boot}/{pid}/{ticks}"  # even this very pid and boot: another machine's
    assert holder_alive(elsewhere, time.time() - LEASE_S + 60)
    assert not holder_alive(elsewhere, time.time() - LEASE_S - 1)


def test_a_live_holder_refuses_a_second_command_and_the_lock_goes_with_the_block(ctx: Context) -> None:
    with operation(ctx, "vm1", "migrate", target="h2"):
        with pytest.raises(OperationBusy, match="vm1 is busy: migrate of vm1"), \
                operation(ctx, "vm1", "destroy"):
            pass  # never reached
        with operation(ctx, "vm2", "destroy"):  # another VM's lock is its own
            assert {op.vm for op in ctx.ledger.operations.all()} == {"vm1", "vm2"}
    assert ctx.ledger.operations.all() == []
    with pytest.raises(RuntimeError), operation(ctx, "vm1", "destroy"):
        raise RuntimeError("the caller rolled back and re-raised")
    assert ctx.ledger.operations.all() == []  # a failure that was handled leaves no intent behind


def test_a_dead_holders_intent_is_reconciled_and_its_lock_taken_over(ctx: Context) -> None:
    ctx.ledger.operations.begin("vm1", "migrate", dead_holder(), None, "h2", {})
    (op,) = interrupted(ctx)
    assert op.vm == "vm1" and op.step == "begun"
    steps = []
    with operation(ctx, "vm1", "destroy", say=steps.append):
        assert [o.kind for o in ctx.ledger.operations.all()] == ["destroy"]
    assert len(steps) == 1 and steps[0].startswith("an interrupted migrate of vm1 to h2 (step begun")
    assert interrupted(ctx) == [] and ctx.ledger.operations.all() == []


def test_an_intent_that_cannot_be_decided_keeps_the_lock(ctx: Context) -> None:
    ctx.ledger.operations.begin("vm1", "defragment", dead_holder(), None, None, {})
    with pytest.raises(OperationBusy, match="could not be reconciled: undecided"), operation(ctx, "vm1", "destroy"):
        pass
    assert [op.kind for op in ctx.ledger.operations.all()] == ["defragment"]


def test_the_crash_hook_kills_the_process_right_after_the_named_step(ctx: Context, tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        from pathlib import Path
        from hvctl.context import Context
        from hvctl.ops.intent import operation
        ctx = Context(state_dir=Path({str(ctx.paths.root)!r}), uri="test:///default", ledger_url={ctx.ledger_url!r})
        with operation(ctx, "vm1", "migrate", target="h2") as op:
            op.step("checked", source="local")
            op.step("reserved", reservation=7)
            print("not reached")
    """)
    env = os.environ | {CRASH_ENV: "migrate.checked"}
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert killed.returncode == -9 and "not reached" not in killed.stdout, killed.stderr
    (op,) = interrupted(ctx)
    assert op.step == "checked" and op.data == {"source": "local"}


def test_the_fault_hook_fails_the_operation_right_after_the_named_step_and_its_lock_goes(
        ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAIL_ENV, "migrate.checked")
    reached = []
    with pytest.raises(InjectedFault, match="after step checked"), \
            operation(ctx, "vm1", "migrate", target="h2") as op:
        op.step("reserved")  # another step: nothing happens
        reached.append("reserved")
        op.step("checked")
        reached.append("checked")
    assert reached == ["reserved"] and ctx.ledger.operations.all() == []


def test_list_calls_an_interrupted_operation_by_its_name_and_leaves_a_live_one_alone(ctx: Context) -> None:
    from hvctl.ledger import VMPaths
    from hvctl.ops.inspect import list_vms
    from hvctl.spec import VMSpec

    vm = ctx.paths.root / "test"  # "test": the domain libvirt's test driver runs
    ctx.ledger.vms.reserve(VMSpec(name="test"), "local", VMPaths(vm / "b", vm / "o", vm / "s", vm / "c", vm / "a"))
    with operation(ctx, "test", "create"):
        (view,), _, _ = list_vms(ctx)
        assert view.drift is None  # state "creating" while its create runs is not drift
    ctx.ledger.operations.begin("test", "create", dead_holder(), None, "local", {})
    (view,), _, _ = list_vms(ctx)
    assert view.drift == "an interrupted create (step begun): `hvctl doctor --repair` finishes or undoes it"


def test_a_vm_left_half_made_or_half_removed_is_named_by_the_command_that_left_it(ctx: Context) -> None:
    from hvctl.host import DomainState
    from hvctl.ledger import VMPaths, VMState
    from hvctl.ops.inspect import describe_drift
    from hvctl.spec import VMSpec

    vm = ctx.paths.root / "half"
    ctx.ledger.vms.reserve(VMSpec(name="half"), "local", VMPaths(vm / "b", vm / "o", vm / "s", vm / "c", vm / "a"))
    record = ctx.ledger.vms.get("half")
    assert record.state is VMState.CREATING
    assert describe_drift(record, DomainState.RUNNING) == "an interrupted create left it half-done (libvirt: running)"
    ctx.ledger.vms.set_state("half", VMState.DESTROYING)
    assert describe_drift(ctx.ledger.vms.get("half"), DomainState.SHUTOFF) == \
        "an interrupted destroy left it half-done (libvirt: shutoff)"
    with pytest.raises(ValueError):
        ctx.ledger.vms.set_state("half", "exploded")


def test_an_orphan_is_listed_with_the_command_that_removes_it_and_only_hvctls_own_files_go(ctx: Context) -> None:
    """A domain with hvctl's metadata that no VM in the ledger is (on libvirt's test driver): `list` names it with
    `destroy --orphan`, which removes the domain and its directory under the state dir, and nothing else: not a
    domain hvctl did not make, not a VM the ledger has."""
    from hvctl.designer import BootArtifacts, HostCapabilities, VMAllocation, design
    from hvctl.domain import Accel
    from hvctl.errors import HvctlError
    from hvctl.ops.inspect import list_vms
    from hvctl.ops.lifecycle import destroy_orphan
    from hvctl.spec import VMSpec

    files = ctx.paths.vm_files("ghost")
    files.dir.mkdir(parents=True)
    files.overlay.write_bytes(b"disk")
    domain = design(VMSpec(name="ghost"), HostCapabilities("local", Accel.TCG),
                    BootArtifacts(Path("/boot/vmlinuz"), Path("/boot/initrd.img")),
                    VMAllocation(files.overlay, files.console_log, files.agent_socket, 22200))
    ctx.host().define(domain.to_xml())
    _, orphans, _ = list_vms(ctx)
    assert [(o.vm, o.problem) for o in orphans] == [
        ("ghost", "domain made by hvctl but absent from the ledger: `hvctl adopt ghost --host local` takes it "
                  "back, `hvctl destroy ghost --orphan --host local` removes it")]
    with pytest.raises(HvctlError, match="was not made by hvctl"):
        destroy_orphan(ctx, "test", "local")  # the test driver's own domain
    removed = destroy_orphan(ctx, "ghost", "local")
    assert removed[0].startswith("domain ghost (") and str(files.dir) in removed
    assert ctx.host().find_guest("ghost") is None and not files.dir.exists()
    assert list_vms(ctx)[1] == [] and ctx.ledger.operations.all() == []


def test_with_wait_a_second_command_waits_for_the_first_to_end_and_then_goes_on(ctx: Context) -> None:
    """The holder lets go only once the waiter has said it waits (an event, not a timing): the waiter then takes
    the lock within its --wait."""
    import dataclasses
    import threading

    waiting, released = threading.Event(), threading.Event()
    holder_ctx = Context(state_dir=ctx.state_dir, uri="test:///default", ledger_url=ctx.ledger_url)

    def hold() -> None:
        with operation(holder_ctx, "vm1", "migrate", target="h2"):
            taken.set()
            waiting.wait(60)
        released.set()

    taken = threading.Event()
    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert taken.wait(60)
        patient = dataclasses.replace(ctx, lock_wait_s=120.0)
        said: list[str] = []

        def say(line: str) -> None:
            said.append(line)
            waiting.set()

        with operation(patient, "vm1", "destroy", say=say):
            assert released.is_set()
            assert [op.kind for op in ctx.ledger.operations.all()] == ["destroy"]
        assert said and said[0].startswith("waiting up to 120 s for the migrate of vm1 to h2")
    finally:
        waiting.set()
        thread.join(60)
        holder_ctx.close()


def test_an_unreachable_host_leaves_its_operation_undecided_and_never_blocks_repair_of_the_others(
        ctx: Context) -> None:
    """Two interrupted operations: a migration to a host that does not answer, and a start of a VM on a host that
    does (libvirt's test driver, whose domain "test" runs). The repair decides the second and keeps the first."""
    from hvctl.ledger import VMPaths
    from hvctl.ops.doctor import repair
    from hvctl.spec import VMSpec

    ctx.ledger.hosts.ensure("gone", "qemu:///system?socket=/nonexistent")
    for name in ("test", "far-away"):
        vm = ctx.paths.root / name
        ctx.ledger.vms.reserve(VMSpec(name=name), "local", VMPaths(vm / "b", vm / "o", vm / "s", vm / "c", vm / "a"))
        ctx.ledger.vms.set_state(name, "stopped")
    ctx.ledger.operations.begin("far-away", "migrate", dead_holder(), None, "gone",
                               {"source": "local", "uuid": "00000000-0000-0000-0000-000000000000"})
    ctx.ledger.operations.begin("test", "start", dead_holder(), None, None, {})
    outcomes = {r.operation.split(" of ")[1].split()[0]: r.outcome for r in repair(ctx).operations}
    assert outcomes["far-away"].startswith("undecided: cannot reach libvirt at qemu:///system?socket=/nonexistent")
    assert outcomes["test"] == "libvirt says running: the ledger says running"
    assert [op.vm for op in ctx.ledger.operations.all()] == ["far-away"]
    assert ctx.ledger.vms.get("test").state == "running"


def _orphan(ctx: Context, name: str, tenant: str = "default", vcpus: int = 1) -> tuple[Path, str]:
    """A domain with hvctl's metadata and the files hvctl gives a VM (a qcow2 overlay on a base, a real seed ISO),
    defined on libvirt's test driver with no ledger row: what a lost ledger leaves. Returns the overlay and token."""
    from hvctl.designer import BootArtifacts, HostCapabilities, VMAllocation, design
    from hvctl.domain import Accel
    from hvctl.seed import build_seed, generate_ed25519, new_agent_token
    from hvctl.spec import VMSpec

    files = ctx.paths.vm_files(name)
    files.dir.mkdir(parents=True)
    base = files.dir / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(files.overlay)],
                   check=True)
    token = new_agent_token()
    build_seed(files.seed, name, [], generate_ed25519(name), token)
    spec = VMSpec(name=name, tenant=tenant, vcpus=vcpus)
    domain = design(spec, HostCapabilities("local", Accel.TCG),
                    BootArtifacts(Path("/boot/vmlinuz"), Path("/boot/initrd.img")),
                    VMAllocation(files.overlay, files.console_log, files.agent_socket, 22300, seed=files.seed))
    ctx.host().define(domain.to_xml())
    return base, token


def test_adopt_takes_an_orphan_back_as_it_is_and_refuses_what_it_cannot_prove(
        ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    """`hvctl adopt` reads the VM back from its domain and seed (libvirt's test driver as the host, real files): the
    ledger row has the domain's UUID, its port, its files, the seed's token and host key, and the VM is no longer an
    orphan. Refused, leaving nothing: a domain hvctl did not make, a VM already in the ledger, one over its tenant's
    quota, and one whose port another VM holds. The test driver drops <qemu:commandline>, where the SSH forward is,
    so the forward design() wrote is put back when the XML is parsed; tests/functional/test_vm_crash.py adopts a real
    guest."""
    import dataclasses

    from hvctl.domain import Domain, UserNetwork
    from hvctl.errors import AlreadyExists, HvctlError
    from hvctl.ledger import QuotaExceeded
    from hvctl.ops.adopt import adopt
    from hvctl.ops.inspect import list_vms
    from hvctl.seed import read_seed_file

    parse = Domain.from_xml
    monkeypatch.setattr(Domain, "from_xml", classmethod(
        lambda cls, xml: dataclasses.replace(parse(xml), network=UserNetwork(22300, "127.0.0.1", True, 0x9))))
    ctx.ledger.hosts.record_facts("local", "qemu", 8, 16384)  # the accelerator probe needs a real daemon
    base, token = _orphan(ctx, "ghost")
    assert [o.vm for o in list_vms(ctx)[1]] == ["ghost"]
    with pytest.raises(HvctlError, match="was not made by hvctl"):
        adopt(ctx, "test", "local")
    record = adopt(ctx, "ghost", "local")
    files = ctx.paths.vm_files("ghost")
    assert (record.host, record.state, record.ssh_port, record.tenant) == ("local", "stopped", 22300, "default")
    assert record.domain_uuid == ctx.host().guest("ghost").uuid
    assert (record.overlay, record.seed, record.base_disk) == (files.overlay, files.seed, base)
    assert record.console_log == files.console_log and record.agent_socket == files.agent_socket
    assert record.agent_token == token
    assert record.host_pubkey == read_seed_file(files.seed, "hvctl/ssh_host_ed25519_key.pub").decode().strip()
    assert list_vms(ctx)[1] == [] and ctx.ledger.operations.all() == []
    assert [e.kind for e in ctx.ledger.events.recent("ghost")][0] == "vm.adopted"
    with pytest.raises(AlreadyExists, match="already in the ledger"):
        adopt(ctx, "ghost", "local")

    _orphan(ctx, "twin")  # the same forward port as ghost: both cannot run
    with pytest.raises(HvctlError, match="port 22300 is VM ghost's"):
        adopt(ctx, "twin", "local")
    ctx.ledger.vms.delete("ghost", "test")
    from hvctl.policy import SHIPPED

    (ctx.state_dir / "policy.yaml").write_text(
        (SHIPPED / "default.yaml").read_text().rstrip() + "\n  small:\n    weight: 1\n"
        "    quota: {vcpus: 1, memory_mib: 4096, disk_gib: 50, gpus: 0, vms: 4}\n")
    ctx.__dict__.pop("policy", None)  # the cached policy: read the one just installed
    _orphan(ctx, "big", tenant="small", vcpus=2)
    with pytest.raises(QuotaExceeded, match="tenant small"):
        adopt(ctx, "big", "local")
    assert {r.name for r in ctx.ledger.vms.all()} == set() and ctx.ledger.operations.all() == []
    assert {o.vm for o in list_vms(ctx)[1]} == {"big", "ghost", "twin"}


def _ckpt_rig(ctx: Context, on: str) -> tuple[Path, Path, Path]:
    """VM ml in the ledger on ``on``, with generation 0 (the source's files) and generation 1 (the new
    incarnation's) on disk, and the controller's copy of the checkpoints: what a checkpoint migration from local
    to h2 has made by the time it is killed."""
    from hvctl.ledger import VMPaths
    from hvctl.spec import VMSpec

    ctx.ledger.hosts.ensure("h2", "test:///default")
    source, target = ctx.paths.vm_files("ml"), ctx.paths.vm_files("ml", 1)
    for files in (source, target):
        files.dir.mkdir(parents=True)
        files.overlay.write_bytes(b"disk")
    mine = target if on == "h2" else source
    ctx.ledger.vms.reserve(VMSpec(name="ml"), on, VMPaths(Path("/base.qcow2"), mine.overlay, mine.seed,
                                                         mine.console_log, mine.agent_socket))
    workdir = short_tempdir("hvctl-ckpt-ml-")
    (workdir / "ckpt-00000004.pt").write_bytes(b"state")
    return source.dir, target.dir, workdir


def test_a_checkpoint_migration_killed_before_its_commit_loses_the_new_incarnation_only(ctx: Context) -> None:
    """Reconciled with the ledger still naming the source: the reservation, the new incarnation's files and the
    checkpoints copied here go; the source's files and ledger row stay. (The VM test kills hvctl after every step
    with real guests; here, the decision on libvirt's test driver.)"""
    from hvctl.accounting import host_footprint
    from hvctl.ops.intent import reconcile
    from hvctl.spec import VMSpec

    source, target, workdir = _ckpt_rig(ctx, "local")
    held = ctx.ledger.reservations.hold("h2", "default", host_footprint(VMSpec(name="ml")), "migration", vm="ml")
    ctx.ledger.operations.begin("ml", "migrate-checkpoint", dead_holder(), None, "h2", {
        "source": "local", "source_uuid": "6695eb01-f6a4-8304-79aa-97f2502e193f", "source_dir": str(source),
        "reservation": held, "workdir": str(workdir), "target_dir": str(target)})
    (op,) = interrupted(ctx)
    outcome = reconcile(ctx, op)
    assert outcome == "rolled back: the new incarnation on h2 is removed; ml kept running on local"
    assert ctx.ledger.vms.get("ml").host == "local" and source.exists()
    assert not target.exists() and not workdir.exists()
    assert ctx.ledger.reservations.all() == [] and ctx.ledger.operations.all() == []


def test_a_checkpoint_migration_killed_after_its_commit_loses_the_source_incarnation_only(ctx: Context) -> None:
    """Reconciled with the ledger naming the target: the source's domain (found by the UUID the intent recorded,
    never by name: the new incarnation has the same one) and its files go; the new incarnation's stay."""
    from hvctl.designer import BootArtifacts, HostCapabilities, VMAllocation, design
    from hvctl.domain import Accel
    from hvctl.ops.intent import reconcile
    from hvctl.spec import VMSpec

    source, target, workdir = _ckpt_rig(ctx, "h2")
    files = ctx.paths.vm_files("ml")
    old = ctx.host().define(design(VMSpec(name="ml"), HostCapabilities("local", Accel.TCG),
                                   BootArtifacts(Path("/boot/vmlinuz"), Path("/boot/initrd.img")),
                                   VMAllocation(files.overlay, files.console_log, files.agent_socket, 22200)).to_xml())
    ctx.ledger.operations.begin("ml", "migrate-checkpoint", dead_holder(), None, "h2", {
        "source": "local", "source_uuid": old.uuid, "source_dir": str(source), "workdir": str(workdir),
        "target_dir": str(target)})
    (op,) = interrupted(ctx)
    assert reconcile(ctx, op) == "it had been committed on h2; the source incarnation on local is removed"
    assert ctx.host().find_guest_by_uuid(old.uuid) is None
    assert not source.exists() and target.exists() and not workdir.exists()
    assert ctx.ledger.vms.get("ml").host == "h2" and ctx.ledger.operations.all() == []
