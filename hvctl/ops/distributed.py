"""A data-parallel training job across a tenant's VMs: ``hvctl run --vms a,b,c train --distributed``.

- :func:`plan_job` (pure) checks that the VMs can train together and says what each VM's agent runs: the first VM
  hosts the rendezvous on its tenant-network address, every VM runs ``train-ddp`` (guest/workloads/distributed.py).
- :func:`drive` starts those through the agents, keeps a barrier (each VM's launcher prints ``{"ready"}`` once
  torch is imported; hvctl then creates the go file in every VM, so all join the first rendezvous together), follows
  every rank's progress, and drops a member whose VM stopped running or whose launcher failed. The job goes on while
  ``min_nodes`` members are left (the launchers re-form and resume from the last checkpoint), is refused as soon as
  fewer are, and on any failure or Ctrl-C every member's workload is cancelled.
- :func:`run_job` reads the members from the ledger and drives them through their agent channels.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from guest import rpc
from guest.workloads.protocol import parse_progress, parse_ready
from guest.workloads.schema import TrainProgress

from ..agent_client import AgentClient, AgentError
from ..errors import HvctlError, InvalidSpec
from ..host.guest import DomainState
from .ckpt_member import job_workload
from .run import WorkloadFailed, agent_for, workloads

if TYPE_CHECKING:
    from ..context import Context

GO_DIR = "/run/hvctl-ddp"  # in the guest: where the go files of its jobs are created


@dataclass(frozen=True)
class Member:
    vm: str
    tenant: str
    addresses: dict[str, str]  # tenant network name -> this VM's address on it


@dataclass(frozen=True)
class Launch:
    vm: str
    args: list[str]  # the train-ddp workload's arguments, as the agent passes them to ``run train-ddp``
    go_file: str


@dataclass(frozen=True)
class JobPlan:
    job: str
    network: str
    rendezvous: str
    min_nodes: int
    launches: list[Launch]


def plan_job(members: list[Member], train_args: list[str], batch_size: int, min_nodes: int | None = None,
             max_restarts: int = 3, job: str | None = None, go_dir: str = GO_DIR) -> JobPlan:
    """Check that ``members`` can train together and say what each runs. Raises InvalidSpec with one line."""
    names = [m.vm for m in members]
    if len(members) < 2:
        raise InvalidSpec("distributed training needs at least two VMs (--vms a,b)")
    if len(set(names)) != len(names):
        raise InvalidSpec(f"a VM is named twice in --vms: {','.join(names)}")
    tenants = sorted({m.tenant for m in members})
    if len(tenants) > 1:
        raise InvalidSpec(f"the VMs belong to different tenants ({', '.join(tenants)}); a job stays in one tenant")
    shared = set(members[0].addresses).intersection(*(m.addresses for m in members[1:]))
    if not shared:
        raise InvalidSpec("the VMs share no tenant network; a job needs VMs created with the same --net NET")
    network = sorted(shared)[0]
    floor = len(members) if min_nodes is None else min_nodes
    if not 1 <= floor <= len(members):
        raise InvalidSpec(f"--min-nodes must be between 1 and {len(members)}, not {floor}")
    uneven = [w for w in range(floor, len(members) + 1) if batch_size % w]
    if uneven:
        raise InvalidSpec(f"a global batch of {batch_size} does not split evenly over {uneven[0]} VMs; the job may "
                          f"run on {floor} to {len(members)} of them")
    job = job or f"ddp-{secrets.token_hex(4)}"
    rendezvous = members[0].addresses[network]
    go_file = f"{go_dir}/{job}.go"
    launches = []
    for i, member in enumerate(members):
        args = ["--job", job, "--rendezvous", rendezvous,
                "--address", member.addresses[network], "--min-nodes", str(floor),
                "--max-nodes", str(len(members)), "--max-restarts", str(max_restarts), "--go-file", go_file,
                *(["--hosts-store"] if i == 0 else []), "--", *train_args, "--batch-size", str(batch_size)]
        launches.append(Launch(member.vm, args, go_file))
    return JobPlan(job, network, rendezvous, floor, launches)


# -- running a planned job -----------------------------------------------------------------------------------------

READY_TIMEOUT_S = 1800.0  # importing torch in a TCG guest takes minutes; on real hardware, seconds
MAX_AGENT_RETRIES = 3  # reconnections to a running VM's agent in a row before the job is given up


@dataclass
class Node:
    """One member while the job runs: its agent, whether its VM still runs, and how far hvctl has read its log."""

    vm: str
    agent: AgentClient
    running: Callable[[], bool]  # is the VM's domain still running (asked when its agent stops answering)
    # A fresh client, for an agent that stopped answering while its VM runs (a host connection closed under a long
    # job); None: such a failure ends the job.
    reconnect: Callable[[], AgentClient] | None = None
    failures: int = 0  # consecutive failed reads of a running VM's agent
    workload: str | None = None
    offset: int = 0
    partial: str = ""  # the start of a line whose end has not been read yet
    ready: bool = False
    status: rpc.WorkloadStatus | None = None
    dropped: str | None = None  # why the job goes on without it
    # Whether a migration of its VM is under way (live, or by checkpoint): its agent may not answer meanwhile, and a
    # checkpoint migration cancels its workload (the member leaves the job and rejoins from the new incarnation).
    migrating: Callable[[], bool] = lambda: False
    # Once such a move is over: the agent and train-ddp workload that carry its rank now (the new incarnation's, or
    # the source's again after a rollback), or None (it did not come back).
    relocate: Callable[[], tuple[AgentClient, str] | None] | None = None
    away: bool = False  # its workload was cancelled by a checkpoint migration: it counts as a member, and rejoins


@dataclass(frozen=True)
class Event:
    """What :func:`drive` reports as the job runs."""

    kind: Literal["started", "ready", "go", "progress", "dropped", "moving", "rejoined"]
    vm: str  # for go: the VM that hosts the rendezvous
    workload: str | None = None  # started, rejoined: the VM's workload id
    progress: TrainProgress | None = None  # progress: one step of the rank in this VM
    reason: str | None = None  # dropped: why the job goes on without the VM


@dataclass(frozen=True)
class JobResult:
    job: str
    network: str
    rendezvous: str
    state: Literal["started", "succeeded"]  # started: detached after the go, the launchers carry on alone
    workloads: dict[str, str]  # vm -> its workload id (`hvctl logs VM --id ID` shows its ranks' progress)
    finished: list[str] = field(default_factory=list)  # the VMs that ran the job to its end
    dropped: dict[str, str] = field(default_factory=dict)  # vm -> why the job went on without it
    result: dict[str, Any] = field(default_factory=dict)  # the training result, as the first finished VM gave it

    def as_dict(self) -> dict[str, Any]:
        return {"job": self.job, "network": self.network, "rendezvous": self.rendezvous, "state": self.state,
                "workloads": self.workloads, "finished": self.finished, "dropped": self.dropped,
                "result": self.result}


def drive(plan: JobPlan, nodes: dict[str, Node], on_event: Callable[[Event], None] = lambda e: None,
          timeout: float | None = None, ready_timeout: float = READY_TIMEOUT_S, poll: float = 0.5,
          detach: bool = False) -> JobResult:
    """Run ``plan`` on ``nodes`` (one per launch, by VM name) until it ends, or with ``detach`` until the go. Raises
    WorkloadFailed (every member's workload cancelled) when it cannot finish; KeyboardInterrupt cancels them too.
    Detached, nothing watches the job after the go: the launchers re-form without a lost VM on their own, and give
    up when fewer than the minimum are left after their join timeout."""
    members = [nodes[launch.vm] for launch in plan.launches]
    started = time.monotonic()
    try:
        go_dir = plan.launches[0].go_file.rsplit("/", 1)[0]
        for node, launch in zip(members, plan.launches, strict=True):
            _exec(node, ["mkdir", "-p", go_dir])
            status = node.agent.typed("workload.start", rpc.WorkloadStatus,
                                      rpc.WorkloadStartParams(kind="train-ddp", args=launch.args))
            node.workload, node.status = status.id, status
            on_event(Event("started", node.vm, workload=status.id))
        while not all(n.ready for n in members):  # the barrier: every launcher has torch imported
            for node in members:
                if not node.ready:
                    node.ready = parse_ready(_read(node)) is not None
                    if node.ready:
                        on_event(Event("ready", node.vm))
                    elif node.status is not None and node.status.state != "running":
                        raise WorkloadFailed(f"{node.vm} {node.status.state} before the job began: "
                                             f"{node.status.error}")
            if time.monotonic() - started > ready_timeout:
                late = ", ".join(n.vm for n in members if not n.ready)
                raise WorkloadFailed(f"{late} did not get ready within {ready_timeout:.0f} s")
            time.sleep(poll)
        for node, launch in zip(members, plan.launches, strict=True):
            _exec(node, ["touch", launch.go_file])
        on_event(Event("go", plan.launches[0].vm))
        if detach:
            return JobResult(plan.job, plan.network, plan.rendezvous, "started",
                             {n.vm: n.workload for n in members if n.workload is not None})
        return _follow(plan, members, on_event, started, timeout, poll)
    except BaseException:
        for node in members:
            if node.workload is not None and node.dropped is None:
                with contextlib.suppress(AgentError):
                    node.agent.call("workload.cancel", rpc.WorkloadRef(id=node.workload))
        raise


def _follow(plan: JobPlan, members: list[Node], on_event: Callable[[Event], None], started: float,
            timeout: float | None, poll: float) -> JobResult:
    while True:
        for node in members:
            if node.away:
                _follow_move(node, on_event)
            if node.dropped is not None or (node.status is not None and node.status.state != "running"):
                continue
            try:
                for progress in parse_progress(_read(node)):
                    on_event(Event("progress", node.vm, progress=progress))
                node.failures = 0
            except (AgentError, HvctlError) as exc:
                if node.migrating():  # moving live, or by checkpoint: read it again once it has arrived
                    continue
                if node.running():
                    if node.reconnect is None or node.failures >= MAX_AGENT_RETRIES:
                        raise
                    node.failures += 1
                    node.agent = node.reconnect()
                    continue
                node.dropped = f"its VM stopped ({exc})"
                on_event(Event("dropped", node.vm, reason=node.dropped))
                continue
            if node.status is not None and node.status.state == "failed":
                node.dropped = f"its launcher failed: {node.status.error}"
                on_event(Event("dropped", node.vm, reason=node.dropped))
            elif node.status is not None and node.status.state == "cancelled" and node.relocate is not None \
                    and node.migrating():
                node.away = True
                on_event(Event("moving", node.vm))
        left = [n for n in members if n.dropped is None]
        if len(left) < plan.min_nodes:
            gone = "; ".join(f"{n.vm}: {n.dropped}" for n in members if n.dropped is not None)
            raise WorkloadFailed(f"only {len(left)} of {len(members)} VMs are left, fewer than the job's minimum "
                                 f"of {plan.min_nodes} ({gone})")
        if all(n.status is not None and n.status.state != "running" and not n.away for n in left):
            done = [n for n in left if n.status is not None and n.status.state == "succeeded"]
            if len(done) != len(left):
                raise WorkloadFailed(f"the job was cancelled in {', '.join(n.vm for n in left if n not in done)}")
            return JobResult(plan.job, plan.network, plan.rendezvous, "succeeded",
                             {n.vm: n.workload for n in members if n.workload is not None},
                             [n.vm for n in done], {n.vm: n.dropped for n in members if n.dropped is not None},
                             (done[0].status.result if done[0].status else None) or {})
        if timeout is not None and time.monotonic() - started > timeout:
            raise WorkloadFailed(f"the job ran past {timeout:.0f} s; cancelled")
        time.sleep(poll)


def _follow_move(node: Node, on_event: Callable[[Event], None]) -> None:
    """A member whose VM a checkpoint migration is moving: once the move is over, follow its rank where it is now."""
    assert node.relocate is not None
    if node.migrating():
        return
    found = node.relocate()
    node.away = False
    if found is None:
        node.dropped = "its workload was cancelled by a checkpoint migration that did not start it again"
        on_event(Event("dropped", node.vm, reason=node.dropped))
        return
    node.agent, node.workload = found
    node.offset, node.partial, node.status = 0, "", None
    on_event(Event("rejoined", node.vm, workload=node.workload))


def _read(node: Node) -> str:
    """The node's next whole lines of workload output, and its status as of after them."""
    assert node.workload is not None
    logs = node.agent.typed("workload.logs", rpc.WorkloadLogs,
                            rpc.WorkloadLogsParams(id=node.workload, offset=node.offset))
    node.offset = logs.next_offset
    data = node.partial + logs.data
    if logs.eof:  # only once everything it wrote is read, so no progress line is missed
        node.status = node.agent.typed("workload.status", rpc.WorkloadStatus, rpc.WorkloadRef(id=node.workload))
    if node.status is not None and node.status.state != "running":
        node.partial = ""
        return data
    lines, _, node.partial = data.rpartition("\n")  # a line cut by the chunk's end waits for its rest
    return lines


def _exec(node: Node, argv: list[str]) -> None:
    done = node.agent.typed("exec", rpc.ExecResult, rpc.ExecParams(argv=argv))
    if done.exit_code != 0:
        raise WorkloadFailed(f"{' '.join(argv)} failed in {node.vm}: {done.stderr.strip()}")


def run_job(ctx: Context, vms: list[str], train_args: list[str], batch_size: int, min_nodes: int | None = None,
            on_event: Callable[[Event], None] = lambda e: None, timeout: float | None = None,
            detach: bool = False) -> JobResult:
    """Plan and run a job on ledger VMs ``vms``, over their shared tenant network."""
    records = [ctx.ledger.vms.get(name) for name in vms]
    members = []
    for record in records:
        net = record.spec.network
        addresses = {net.tenant_network: str(net.address.ip)} \
            if net is not None and net.tenant_network is not None and net.address is not None else {}
        members.append(Member(record.name, record.spec.tenant, addresses))
    plan = plan_job(members, train_args, batch_size, min_nodes)

    # Each reads the VM's record anew: a checkpoint migration may have moved it to another host since the start.
    def running(name: str) -> Callable[[], bool]:
        def ask() -> bool:
            host = ctx.ledger.vms.get(name).host
            try:
                return ctx.host(host).state(name) == DomainState.RUNNING
            except HvctlError:  # the connection to its host was closed under this long command: once more, anew
                return ctx.reconnect(host).state(name) == DomainState.RUNNING

        return ask

    def reconnect(name: str) -> Callable[[], AgentClient]:
        return lambda: agent_for(ctx, ctx.ledger.vms.get(name))  # through ctx.host, which running() renews

    def migrating(name: str) -> Callable[[], bool]:
        return lambda: any(op.vm == name and op.kind.startswith("migrate") for op in ctx.ledger.operations.all())

    def relocate(name: str) -> Callable[[], tuple[AgentClient, str] | None]:
        def find() -> tuple[AgentClient, str] | None:
            try:
                agent = agent_for(ctx, ctx.ledger.vms.get(name))  # on whichever host the move left it
                ours = job_workload(workloads(agent), plan.job)
            except (AgentError, HvctlError):
                return None
            return (agent, ours.id) if ours is not None else None

        return find

    nodes = {r.name: Node(r.name, agent_for(ctx, r), running(r.name), reconnect(r.name), migrating=migrating(r.name),
                          relocate=relocate(r.name)) for r in records}
    for record in records:
        ctx.ledger.events.log(record.name, record.host, "workload.started", f"distributed job {plan.job} started",
                             {"job": plan.job, "kind": "train-ddp"})
    try:
        result = drive(plan, nodes, on_event, timeout, detach=detach)
    except BaseException as exc:
        for record in records:
            ctx.ledger.events.log(record.name, record.host, "workload.finished",
                                 f"distributed job {plan.job} failed: {exc or type(exc).__name__}", {"job": plan.job})
        raise
    for record in records if result.state == "succeeded" else []:
        ctx.ledger.events.log(record.name, record.host, "workload.finished", f"distributed job {plan.job} finished",
                             {"job": plan.job, "dropped": result.dropped.get(record.name)})
    return result
