"""Checkpoint migration of one member of a distributed training job (``hvctl.ops.ckpt_migrate`` calls these).

A member cannot keep training on the source while its new incarnation starts, as a VM's own training does: the job
is one computation across VMs, and both incarnations would hold the same tenant address. So the member leaves the job
and comes back, through the job's own elasticity (torch's elastic launcher, guest/workloads/distributed.py):

    1. its train-ddp workload on the source is cancelled: the launcher gets SIGTERM, which does not close the
       rendezvous; the other members' collective fails at once and they re-form without it, from the newest
       checkpoint any of them holds. The source domain is then paused, so that its tenant address falls silent.
    2. the new incarnation boots on the target (same name, MAC and tenant address) and its agent starts the member's
       launcher again with the same arguments, but no go file: it joins the running job, whose launchers see a node
       waiting and re-form with it, from the newest checkpoint (the new disk holds none; a peer sends it).
    3. verified: the new member's first step is the job's, with the loss a peer computed for that step in the same
       world.

Until the commit everything can be put back: the source is resumed and its launcher started again, and it rejoins.

Refused before anything is reserved: the member that hosts the rendezvous store (the job's first VM: the job ends
with it), and a job that would fall below its ``--min-nodes`` while the member is away.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from guest import rpc
from guest.kinds import CHECKPOINTABLE, DISTRIBUTED

from ..agent_client import AgentClient, AgentError
from ..context import Context
from ..errors import HvctlError, InvalidSpec, MigrationFailed
from ..ledger import VMRecord
from . import Say, Undo
from .intent import Operation
from .migrated import Resumed
from .run import workloads
from .train_progress import CheckpointMigrationFailed, progress, wait_for_progress, wait_until

_HINT = "`hvctl cancel` the job's VMs, migrate {name}, and run the job again: it resumes from its newest checkpoint"


def _split(args: list[str]) -> tuple[list[str], list[str]]:
    """A train-ddp workload's arguments: the launcher's own, and from ``--`` on, the training's."""
    at = args.index("--") if "--" in args else len(args)
    return args[:at], args[at:]


def flag(args: list[str], name: str) -> str | None:
    """The value of launcher option ``name`` in a train-ddp workload's arguments (before its ``--``)."""
    own, _ = _split(args)
    return own[own.index(name) + 1] if name in own and own.index(name) + 1 < len(own) else None


def job_workload(workloads: list[rpc.WorkloadStatus], job: str) -> rpc.WorkloadStatus | None:
    """The newest running launcher of distributed job ``job`` among a VM's workloads."""
    ours = [w for w in workloads if w.state == "running" and w.kind in DISTRIBUTED and flag(w.args, "--job") == job]
    return ours[-1] if ours else None


def rejoin_args(args: list[str]) -> list[str]:
    """The member's arguments without its go file: a launcher started with them joins the running job at once."""
    own, rest = _split(args)
    if "--go-file" in own:
        at = own.index("--go-file")
        own = own[:at] + own[at + 2:]
    return own + rest


@dataclass(frozen=True)
class Peer:
    vm: str
    agent: AgentClient
    workload: str  # its train-ddp workload: the launcher, which lives through the job's re-formations


@dataclass
class JobMember:
    """The member workload a checkpoint migration moves, and the job it is part of."""

    vm: str
    workload: str
    args: list[str]
    job: str
    peers: list[Peer]
    peer_offset: int = 0  # in the first peer's log, when the member left: its steps after the rejoin come later


def find_member(ctx: Context, record: VMRecord, member: rpc.WorkloadStatus,
                running: list[rpc.WorkloadStatus]) -> JobMember:
    """``member``, the VM's part of a distributed job, once checked that the job can go on while it moves."""
    name = record.name
    job = flag(member.args, "--job") or "?"
    if "--hosts-store" in _split(member.args)[0]:
        raise InvalidSpec(f"{name} hosts the rendezvous of distributed job {job} (it is the job's first VM), and the "
                          "job ends without it", hint=_HINT.format(name=name))
    others = [w.id for w in running if w.kind in CHECKPOINTABLE]
    if others:
        raise InvalidSpec(f"{name} runs {member.id}, its part of distributed job {job}, beside its own training "
                          f"({', '.join(others)}); a checkpoint migration moves one or the other",
                          hint=f"`hvctl cancel {name} --id` one of them first")
    peers = _peers(ctx, record, job)
    floor = int(flag(member.args, "--min-nodes") or "1")
    if len(peers) < floor:
        raise InvalidSpec(f"distributed job {job} runs on {len(peers) + 1} VM(s) with a minimum of {floor}: it cannot "
                          f"go on without {name} while it moves", hint=_HINT.format(name=name))
    return JobMember(name, member.id, list(member.args), job, peers)


def _peers(ctx: Context, record: VMRecord, job: str) -> list[Peer]:
    """The job's other members: the VMs on this VM's tenant network (a job spans one) whose agents run a launcher
    of ``job``."""
    network = record.spec.network.tenant_network if record.spec.network is not None else None
    found = []
    for other in ctx.ledger.vms.all():
        net = other.spec.network
        if other.name == record.name or net is None or net.tenant_network != network or other.agent_token is None:
            continue
        try:
            agent = ctx.agent(other.host, other.name, other.agent_token, timeout=30)
            ours = job_workload(workloads(agent), job)
        except (AgentError, HvctlError):  # stopped, or no agent answering: not training in any job
            continue
        if ours is not None:
            found.append(Peer(other.name, agent, ours.id))
    return found


def leave(ctx: Context, record: VMRecord, member: JobMember, source_agent: AgentClient, deadline: float,
          undo: Undo, say: Say, op: Operation) -> None:
    """Step 1: the member leaves the job, and the source domain is paused. Undo: resumed, and the member rejoins."""
    peers = ", ".join(p.vm for p in member.peers)
    member.peer_offset = _log_end(member.peers[0])
    say(f"taking {member.vm} out of job {member.job}: {peers} re-form without it and go on")
    source_agent.call("workload.cancel", rpc.WorkloadRef(id=member.workload))
    wait_until(lambda: source_agent.typed("workload.status", rpc.WorkloadStatus,
                                          rpc.WorkloadRef(id=member.workload)).state != "running",
               deadline, f"workload {member.workload} did not stop")
    undo.push(f"{member.vm} rejoins job {member.job} on {record.host}",
              lambda: _start(source_agent, member.args))
    guest = ctx.host(record.host).guest(record.name)
    guest.suspend()  # its tenant address falls silent: the new incarnation takes it over
    undo.push(f"resume {member.vm} on {record.host}", guest.resume)
    op.step("left", member_args=rejoin_args(member.args), job=member.job)


def rejoin_and_verify(member: JobMember, target: str, target_agent: AgentClient, deadline: float,
                      say: Say) -> Resumed:
    """Steps 2 and 3: the member's launcher again, on the new incarnation, and its first step checked against a
    peer's step of the same number in the same world (every rank reports the loss averaged over all ranks)."""
    status = _start(target_agent, member.args)
    say(f"waiting for {status.id} on {target} to rejoin job {member.job} (it imports torch first)")
    first, _ = wait_for_progress(target_agent, status.id, 0, deadline, lambda _: True, "its first step in the job")
    peer = member.peers[0]
    reference, _ = wait_for_progress(peer.agent, peer.workload, member.peer_offset, deadline,
                                      lambda p: p.step == first.step and p.world_size == first.world_size,
                                      f"step {first.step} in a world of {first.world_size}")
    if first.loss != reference.loss:
        raise CheckpointMigrationFailed(f"step {first.step} loss on {target} is {first.loss!r}, on {peer.vm} "
                                        f"{reference.loss!r}: the rejoined member does not train in the same job")
    return Resumed(member.workload, status.id, first.step - 1, first.step, first.loss, reference.loss, peer=peer.vm)


def _start(agent: AgentClient, args: list[str]) -> rpc.WorkloadStatus:
    return agent.typed("workload.start", rpc.WorkloadStatus,
                       rpc.WorkloadStartParams(kind="train-ddp", args=rejoin_args(args)))


def _log_end(peer: Peer) -> int:
    """The offset just past the whole lines of ``peer``'s log so far."""
    offset = 0
    while True:
        _, after, ended = progress(peer.agent, peer.workload, offset)
        if after == offset or ended:
            return after
        offset = after


def restart_after_rollback(ctx: Context, vm: str, host: str, token: str | None, source_uuid: str,
                           member_args: list[str]) -> str:
    """The repair's part for an interrupted member move that did not commit: the paused source resumed and its
    launcher started again (it rejoins the job). Returns what was done, for the repair's message."""
    guest = ctx.host(host).find_guest_by_uuid(source_uuid)
    if guest is None:
        return f"{vm}'s source domain is gone; its job went on without it"
    with contextlib.suppress(HvctlError):
        guest.resume()  # paused by the move (resuming a running domain is refused, and nothing to do)
    if token is None:
        raise MigrationFailed(f"{vm} has no agent token; its launcher cannot be started again")
    status = _start(ctx.agent(host, vm, token, timeout=60), member_args)
    return f"{vm} was resumed and rejoined job {flag(member_args, '--job')} ({status.id})"
