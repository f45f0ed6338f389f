"""hvctl's side of a distributed job (hvctl/ops/distributed.py drive): real agents (guest/agent.py, each serving its
own unix socket in a thread, as in development) run a stand-in launcher that speaks the real one's protocol without
torch (tests/guest_scripts/fake_ddp_launcher.py), so the barrier, the progress, a lost VM, --min-nodes and the
cancel-all on failure are tested in seconds. The real launcher's training is
tests/unit/test_workload_distributed.py's."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from guest import rpc
from guest.agent import Agent, serve_socket
from hvctl.agent_client import AgentClient
from hvctl.ops.ckpt_member import rejoin_args
from hvctl.ops.distributed import Event, JobPlan, Member, Node, drive, plan_job
from hvctl.ops.run import WorkloadFailed

FAKE = Path(__file__).parents[1] / "guest_scripts" / "fake_ddp_launcher.py"
TOKEN = "t" * 32


@dataclass
class FakeVM:
    """A "VM": its agent, the thread serving it, and whether its domain runs."""

    name: str
    agent: Agent
    thread: threading.Thread
    socket: Path
    running: bool = True
    client: AgentClient = field(init=False)

    def __post_init__(self) -> None:
        self.client = AgentClient.over_socket(self.socket, TOKEN, timeout=10)

    def destroy(self) -> None:
        """As `virsh destroy`: the agent goes silent and its processes are gone."""
        self.running = False
        self.agent.shutdown_requested.set()
        self.thread.join()
        for wid in list(self.agent._running):
            self.agent.rpc_workload_cancel(rpc.WorkloadRef(id=wid))

    def state(self, wid: str) -> str:
        return self.client.typed("workload.status", rpc.WorkloadStatus, rpc.WorkloadRef(id=wid)).state


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Path, dict[str, FakeVM], object]]:
    vms: dict[str, FakeVM] = {}

    def start(name: str, behaviour: str) -> FakeVM:
        def command(args: list[str]) -> list[str]:
            return [sys.executable, str(FAKE), behaviour, str(tmp_path), *args]

        agent = Agent(token=TOKEN, workdir=tmp_path / name, workloads={"train-ddp": command})
        sock = Path("/tmp") / f"hvctl-ddp-test-{time.time_ns()}.sock"
        thread = threading.Thread(target=serve_socket, args=(agent, sock), daemon=True)
        thread.start()
        vm = vms[name] = FakeVM(name, agent, thread, sock)
        vm.client.wait_ready(20)
        return vm

    yield tmp_path, vms, start
    for vm in vms.values():
        if vm.running:
            vm.destroy()


def plan(tmp_path: Path, names: list[str], min_nodes: int | None = None, steps: int = 6) -> JobPlan:
    members = [Member(n, "acme", {"lab": f"198.18.7.{10 + i}"}) for i, n in enumerate(names)]
    return plan_job(members, ["--objective", "ssl", "--steps", str(steps)], batch_size=6, min_nodes=min_nodes,
                    go_dir=str(tmp_path / "go"))


def nodes(vms: dict[str, FakeVM]) -> dict[str, Node]:
    return {name: Node(name, vm.client, lambda vm=vm: vm.running) for name, vm in vms.items()}  # type: ignore[misc]


def test_every_vm_gets_ready_before_the_go_and_every_ranks_progress_is_reported(cluster) -> None:  # type: ignore[no-untyped-def]
    tmp_path, vms, start = cluster
    for name in ("a", "b"):
        start(name, "ok")
    (tmp_path / "release").touch()
    events: list[Event] = []
    result = drive(plan(tmp_path, ["a", "b"]), nodes(vms), events.append, poll=0.02)

    kinds = [e.kind for e in events]
    go = kinds.index("go")
    assert sorted(e.vm for e in events[:go] if e.kind == "ready") == ["a", "b"]
    assert all(k in ("started", "ready") for k in kinds[:go]) and set(kinds[go + 1:]) == {"progress"}
    steps = {vm: [e.progress.step for e in events if e.progress and e.vm == vm] for vm in ("a", "b")}
    assert steps == {"a": [1, 2, 3, 4, 5, 6], "b": [1, 2, 3, 4, 5, 6]}
    assert (result.finished, result.dropped, result.result["final_step"]) == (["a", "b"], {}, 6)
    assert result.result["address"] == "198.18.7.10"  # the first VM's, which hosted the rendezvous
    assert all(vms[vm].state(wid) == "succeeded" for vm, wid in result.workloads.items())


def test_a_vm_that_fails_before_the_go_fails_the_job_and_the_others_are_cancelled(cluster) -> None:  # type: ignore[no-untyped-def]
    tmp_path, vms, start = cluster
    start("a", "ok")
    start("b", "fail-early")
    started: dict[str, str] = {}
    with pytest.raises(WorkloadFailed, match="b failed before the job began: cannot import torch"):
        drive(plan(tmp_path, ["a", "b"]), nodes(vms),
              lambda e: started.update({e.vm: str(e.workload)}) if e.kind == "started" else None, poll=0.02)
    assert vms["a"].state(started["a"]) == "cancelled"
    assert not (tmp_path / "go").exists() or not list((tmp_path / "go").iterdir())  # no go was given


def destroy_on_step_2_of(victim: str, vms: dict[str, FakeVM], tmp_path: Path, events: list[Event],  # type: ignore[no-untyped-def]
                         release: bool = True):
    """Destroy ``victim`` once it reports step 2; once it is dropped, let the others finish if ``release``."""
    def on_event(event: Event) -> None:
        events.append(event)
        if event.progress and event.vm == victim and event.progress.step == 2:
            vms[victim].destroy()
        if event.kind == "dropped" and release:
            (tmp_path / "release").touch()

    return on_event


def test_a_destroyed_vm_is_dropped_and_the_job_finishes_on_the_rest(cluster) -> None:  # type: ignore[no-untyped-def]
    tmp_path, vms, start = cluster
    for name, behaviour in (("a", "ok"), ("b", "ok"), ("c", "hold")):
        start(name, behaviour)
    events: list[Event] = []
    result = drive(plan(tmp_path, ["a", "b", "c"], min_nodes=2), nodes(vms),
                   destroy_on_step_2_of("c", vms, tmp_path, events), poll=0.02)
    assert result.finished == ["a", "b"] and list(result.dropped) == ["c"]
    assert result.dropped["c"].startswith("its VM stopped (cannot connect to the agent channel")
    assert [e.vm for e in events if e.kind == "dropped"] == ["c"]


def test_a_job_left_with_fewer_than_min_nodes_is_refused_and_the_rest_cancelled(cluster) -> None:  # type: ignore[no-untyped-def]
    tmp_path, vms, start = cluster
    for name, behaviour in (("a", "ok"), ("b", "ok"), ("c", "hold")):
        start(name, behaviour)
    events: list[Event] = []
    with pytest.raises(WorkloadFailed, match=r"only 2 of 3 VMs are left, fewer than the job's minimum of 3 \(c: its "
                                             r"VM stopped"):
        drive(plan(tmp_path, ["a", "b", "c"]), nodes(vms),
              destroy_on_step_2_of("c", vms, tmp_path, events, release=False), poll=0.02)
    workloads = {e.vm: str(e.workload) for e in events if e.kind == "started"}
    assert {vms[vm].state(workloads[vm]) for vm in ("a", "b")} == {"cancelled"}


def test_ctrl_c_cancels_every_vms_part(cluster) -> None:  # type: ignore[no-untyped-def]
    tmp_path, vms, start = cluster
    for name in ("a", "b"):
        start(name, "ok")
    workloads: dict[str, str] = {}

    def on_event(event: Event) -> None:
        if event.kind == "started":
            workloads[event.vm] = str(event.workload)
        if event.kind == "progress":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        drive(plan(tmp_path, ["a", "b"]), nodes(vms), on_event, poll=0.02)
    assert {vms[vm].state(wid) for vm, wid in workloads.items()} == {"cancelled"}


def test_detached_the_job_is_left_running_after_the_go_and_finishes_on_its_own(cluster) -> None:  # type: ignore[no-untyped-def]
    tmp_path, vms, start = cluster
    for name in ("a", "b"):
        start(name, "ok")
    started = drive(plan(tmp_path, ["a", "b"]), nodes(vms), poll=0.02, detach=True)
    assert started.state == "started" and started.finished == []
    assert {vms[vm].state(wid) for vm, wid in started.workloads.items()} == {"running"}  # held until released
    (tmp_path / "release").touch()
    for vm, wid in started.workloads.items():
        deadline = time.monotonic() + 60  # a hang guard: the release, not a clock, ends them
        while vms[vm].state(wid) == "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert vms[vm].state(wid) == "succeeded"


def test_an_agent_lost_while_its_vm_runs_is_reached_anew_and_a_lasting_loss_ends_the_job(cluster) -> None:  # type: ignore[no-untyped-def]
    """As when the connection to a host is closed under a long job: b's client fails while b still runs."""
    from hvctl.agent_client import AgentError

    tmp_path, vms, start = cluster
    for name in ("a", "b"):
        start(name, "ok")
    (tmp_path / "release").touch()
    broken = AgentClient.over_socket(tmp_path / "closed.sock", TOKEN, timeout=2)
    renewed = nodes(vms)
    renewed["b"].reconnect = lambda: vms["b"].client

    def break_b(event: Event) -> None:
        if event.kind == "go":
            renewed["b"].agent = broken

    result = drive(plan(tmp_path, ["a", "b"]), renewed, break_b, poll=0.02)
    assert (result.finished, result.dropped) == (["a", "b"], {})

    (tmp_path / "release").unlink()
    lasting = nodes(vms)
    lasting["b"].reconnect = lambda: broken
    workloads: dict[str, str] = {}

    def break_b_for_good(event: Event) -> None:
        if event.kind == "started":
            workloads[event.vm] = str(event.workload)
        if event.kind == "go":
            lasting["b"].agent = broken

    with pytest.raises(AgentError, match="cannot connect"):
        drive(plan(tmp_path, ["a", "b"]), lasting, break_b_for_good, poll=0.02)
    assert vms["a"].state(workloads["a"]) == "cancelled"


def test_a_member_moved_by_a_checkpoint_migration_is_followed_to_its_new_incarnation(cluster) -> None:  # type: ignore[no-untyped-def]
    """hvctl.ops.ckpt_member cancels the member's launcher in the source VM and starts it again, without its go file,
    in the new incarnation (here a new agent, "c-new"); the driver must neither fail the job on the cancellation
    nor lose the rank, and the job ends with every member."""
    tmp_path, vms, start = cluster
    for name, behaviour in (("a", "ok"), ("b", "ok"), ("c", "hold")):
        start(name, behaviour)
    job = plan(tmp_path, ["a", "b", "c"], min_nodes=2)
    moving = {"c": False}
    where: dict[str, tuple[AgentClient, str] | None] = {"c": None}
    ours = nodes(vms)
    ours["c"].migrating = lambda: moving["c"]
    ours["c"].relocate = lambda: where["c"]
    events: list[Event] = []
    started: dict[str, str] = {}

    def on_event(event: Event) -> None:
        events.append(event)
        if event.kind == "started":
            started[event.vm] = str(event.workload)
        if event.progress and event.vm == "c" and event.progress.step == 2 and "c-new" not in vms:
            moving["c"] = True  # the migration's intent row is there before it cancels the member
            vms["c"].client.call("workload.cancel", rpc.WorkloadRef(id=started["c"]))
        if event.kind == "moving":
            new = start("c-new", "ok")
            rejoined = new.client.typed("workload.start", rpc.WorkloadStatus, rpc.WorkloadStartParams(
                kind="train-ddp", args=rejoin_args(job.launches[2].args)))
            where["c"] = (new.client, rejoined.id)
            moving["c"] = False  # the move is over
        if event.kind == "rejoined":
            (tmp_path / "release").touch()

    result = drive(job, ours, on_event, poll=0.02)
    assert (result.finished, result.dropped) == (["a", "b", "c"], {})
    assert [e.kind for e in events if e.kind in ("moving", "rejoined", "dropped")] == ["moving", "rejoined"]
    assert vms["c"].state(started["c"]) == "cancelled"
    assert vms["c-new"].state(result.workloads["c"]) == "succeeded"  # the rank it follows now is the new one's


def test_a_member_args_without_the_go_file_join_at_once_and_keep_the_training_args() -> None:
    from hvctl.ops.ckpt_member import flag

    args = ["--job", "j1", "--go-file", "/run/hvctl-ddp/j1.go", "--min-nodes", "2", "--",
            "--objective", "ssl", "--go-file", "x"]  # after "--": the training's, left alone
    assert rejoin_args(args) == ["--job", "j1", "--min-nodes", "2", "--", "--objective", "ssl", "--go-file", "x"]
    assert (flag(args, "--job"), flag(args, "--min-nodes"), flag(args, "--objective")) == ("j1", "2", None)


def test_a_member_moving_live_is_not_dropped_and_is_read_again_once_it_has_arrived(cluster) -> None:  # type: ignore[no-untyped-def]
    """A live migration of b: while it runs, b's agent does not answer through its old host and its domain there
    does not run (its switch-over); b is neither dropped nor counted as failing, and is read where it arrived."""
    tmp_path, vms, start = cluster
    for name in ("a", "b"):
        start(name, "ok")
    (tmp_path / "release").touch()
    moving = {"b": False}
    broken = AgentClient.over_socket(tmp_path / "closed.sock", TOKEN, timeout=2)
    ours = nodes(vms)
    ours["b"].migrating = lambda: moving["b"]
    ours["b"].running = lambda: not moving["b"]
    ours["b"].reconnect = lambda: vms["b"].client  # through its new host

    def on_event(event: Event) -> None:
        if event.kind == "go":
            moving["b"], ours["b"].agent = True, broken
        if event.progress and event.vm == "a" and event.progress.step == 6:
            moving["b"] = False  # arrived

    result = drive(plan(tmp_path, ["a", "b"]), ours, on_event, poll=0.02)
    assert (result.finished, result.dropped) == (["a", "b"], {})
