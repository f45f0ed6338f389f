"""hvctl migrate --mode checkpoint: move a VM whose machine state cannot move live (it holds a passthrough GPU) by
moving its workload instead.

The source is left exactly as it was until the last step: its training keeps running through the whole operation
(asking for a checkpoint does not pause it), so a failure anywhere before the commit leaves nothing to put back.

    prechecks → reserve the target's capacity
    1. drain every running inference workload; ask every training workload for a checkpoint at its next step
       boundary; copy the checkpoints to the controller
    2. boot a new incarnation of the VM on the target: its own files, SSH port, host key, agent token, and the
       capacity (GPUs included) the reservation holds
    3. copy the checkpoints in and start each training workload again with its original arguments: it resumes
    4. verify through the target's agent: each resumed at step k+1, with the loss the source computed for k+1
    5. one ledger transaction moves the VM and turns the reservation into its allocation; then the source domain
       and its files are destroyed

Every step registers its undo (the new incarnation's domain and files, the reservation) before the next runs, and
records what it made in the operation's intent row (``hvctl.ops.intent``), so that hvctl killed at any step is
decided by ``reconcile_checkpoint_migration``: before the commit, the new incarnation is removed and the source,
which never stopped, stays; after it, the source incarnation is removed.

A member of a distributed training job cannot keep training on the source meanwhile: by default it is refused;
with ``rejoin_job`` (experimental: its VM test has not passed yet) it leaves its job before the target boots and
rejoins from the new incarnation (``hvctl.ops.ckpt_member``), and a rollback brings it back.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

from guest import rpc
from guest.kinds import CHECKPOINTABLE, DISTRIBUTED
from guest.workloads.schema import TrainProgress
from hvctl import passthrough
from hvctl.access import copy, route_for
from hvctl.accounting import host_footprint
from hvctl.agent_client import AgentClient, AgentError
from hvctl.context import Context
from hvctl.errors import HvctlError, InvalidSpec, NotFound
from hvctl.ledger import OperationRecord, VMRecord
from hvctl.ops import Say, Undo, pooled
from hvctl.ops.ckpt_member import find_member, leave, rejoin_and_verify, restart_after_rollback
from hvctl.ops.incarnation import (
    DEFAULT_BOOT_TIMEOUT,
    BootOptions,
    GuestSecrets,
    Incarnation,
    LocalStorage,
    Storage,
    boot,
)
from hvctl.ops.intent import Operation
from hvctl.ops.migrated import Migrated, Resumed
from hvctl.ops.networks import leave_if_unused
from hvctl.ops.run import checkpoint_name, operator_identity
from hvctl.ops.target import Target
from hvctl.ops.train_progress import CheckpointMigrationFailed, wait_for_progress, wait_until
from images.store import Image

DEFAULT_TIMEOUT_S = 900.0


@dataclasses.dataclass(frozen=True)
class Moving:
    """A training workload being moved: where it stood on the source and what became of it on the target."""

    source_id: str
    args: list[str]
    checkpoint_dir: str
    step: int = 0
    remote_checkpoint: str = ""
    local_checkpoint: Path | None = None
    log_offset: int = 0  # in the source workload's log, at or before the checkpoint's line


@dataclasses.dataclass
class _Move:
    """What every step of one checkpoint migration reads: the VM, where it goes, the agents, the deadline."""

    ctx: Context
    record: VMRecord
    dest: Target
    key: Path  # hvctl's SSH key: checkpoints move over SSH
    source_agent: AgentClient
    deadline: float
    say: Say
    op: Operation
    workdir: Path = Path()
    port: int = 0  # the SSH forward port the target's incarnation gets, held with the reservation

    @property
    def target(self) -> str:
        return self.dest.name

    def drain(self, draining: list[str]) -> None:
        """Wait for every inference workload to finish (the source keeps serving until then)."""
        for wid in draining:
            self.say(f"draining inference workload {wid}")
            wait_until(lambda wid=wid: self.source_agent.typed(  # type: ignore[misc]
                "workload.status", rpc.WorkloadStatus, rpc.WorkloadRef(id=wid)).state != "running",
                self.deadline, f"inference workload {wid} did not finish")

    def checkpoint_out(self, moving: list[Moving]) -> list[Moving]:
        """Each training workload checkpoints at its next step boundary (it keeps training); the checkpoint comes
        to this machine's work dir, under a name hvctl gives it (the index of the workload), never the guest's."""
        moved: list[Moving] = []
        for item in moving:
            self.say(f"waiting for {item.source_id} to finish a step (it may still be starting up)")
            _, offset = wait_for_progress(self.source_agent, item.source_id, 0, self.deadline, lambda _: True,
                                           "its first step")
            self.say(f"checkpointing {item.source_id} at its next step boundary")
            asked = self.source_agent.typed("workload.checkpoint", rpc.WorkloadCheckpointed,
                                            rpc.WorkloadRef(id=item.source_id))
            event, offset = wait_for_progress(self.source_agent, item.source_id, max(offset, asked.log_offset),
                                               self.deadline, lambda p: p.requested, "the requested checkpoint")
            remote = _reported_checkpoint(event, item)
            local = self.workdir / str(len(moved)) / checkpoint_name(event.step)
            local.parent.mkdir(mode=0o700)
            self.say(f"copying the step-{event.step} checkpoint out of {self.record.name}")
            copy(self.record, self.key, remote, str(local), upload=False, route=route_for(self.ctx, self.record),
                 overwrite=False)
            moved.append(dataclasses.replace(item, step=event.step, remote_checkpoint=remote,
                                             local_checkpoint=local, log_offset=offset))
        return moved

    def boot_target(self, image: Image, undo: Undo) -> tuple[Incarnation, VMRecord, AgentClient]:
        """The new incarnation on the target: its own files, SSH port, host key, agent token and GPUs. Returns it,
        the VM's record as it will be once moved, and a client for its agent."""
        record, target = self.record, self.target
        port = self.port  # held with the reservation
        storage = self._storage(image)
        secrets = GuestSecrets.fresh(self.ctx, record.spec)
        gpu_alloc = passthrough.allocate(self.ctx, self.ctx.gpu_env, record.spec, target, undo)
        new = Incarnation(record.spec, image, self.dest, storage, port, secrets, gpu_alloc)
        boot(self.ctx, new, BootOptions(timeout=min(DEFAULT_BOOT_TIMEOUT * 2,
                                                    max(self.deadline - time.monotonic(), 1.0))),
             undo, self.say, step=self.op.step)  # "files", "defined" (the new domain's uuid), "started"
        self.op.step("booted")
        files = storage.paths
        as_moved = dataclasses.replace(
            record, host=target, ssh_port=port, overlay=files.overlay, console_log=files.console_log,
            agent_socket=files.agent_socket, seed=files.seed, agent_token=secrets.token,
            host_pubkey=secrets.host_key.public_line)
        return new, as_moved, self.ctx.agent(target, record.name, secrets.token, timeout=60)

    def _storage(self, image: Image) -> Storage:
        """The new incarnation's files: here, in the state dir beside the source's (generation 1 or 0); on a host
        that does not share this machine's filesystem, in its storage pool (the image uploaded once), as a create
        there makes them. Recorded in the intent row before anything is made, for the repair."""
        record, target = self.record, self.target
        if self.dest.here:
            files = self.ctx.paths.next_vm_files(record.name, record.overlay)
            self.op.step("checkpointed", target_dir=str(files.dir))
            return LocalStorage(files, image, self.dest.host.qemu_gid())
        pool_files = pooled.open_files(self.dest.host, record.name)
        pooled.check_room(pool_files, record.spec, target)
        self.op.step("checkpointed", target_pool=True)
        return pooled.PoolStorage(pool_files, pooled.upload_image(self.ctx, target, pool_files, image, self.say))

    def restore_and_verify(self, moved: list[Moving], as_moved: VMRecord,
                           target_agent: AgentClient) -> list[Resumed]:
        """Each checkpoint copied in, its workload started again with its original arguments, and its first step
        checked against the source's own (``_verify``)."""
        verified: list[Resumed] = []
        for item in moved:
            assert item.local_checkpoint is not None
            self.say(f"restoring the step-{item.step} checkpoint on {self.target}")
            made = target_agent.typed("exec", rpc.ExecResult,
                                      rpc.ExecParams(argv=["mkdir", "-p", item.checkpoint_dir]))
            if made.exit_code != 0:
                raise CheckpointMigrationFailed(f"cannot create {item.checkpoint_dir} on {self.target}: "
                                                f"{made.stderr.strip()}")
            copy(as_moved, self.key, str(item.local_checkpoint), item.remote_checkpoint, upload=True,
                 route=route_for(self.ctx, as_moved))
            status = target_agent.typed("workload.start", rpc.WorkloadStatus,
                                        rpc.WorkloadStartParams(kind="train", args=item.args))
            self.say(f"verifying that {status.id} on {self.target} resumed at step {item.step + 1}")
            verified.append(_verify(self.source_agent, target_agent, item, status.id, self.deadline))
        self.op.step("verified")
        return verified


def checkpoint_migrate(ctx: Context, record: VMRecord, dest: Target, timeout_s: float | None,
                       say: Say, op: Operation, rejoin_job: bool = False) -> Migrated:
    started = time.monotonic()
    ledger, name = ctx.ledger, record.name
    if record.agent_token is None:
        raise InvalidSpec(f"{name} has no agent, and checkpoint mode moves workloads through it",
                          hint="use --mode offline")
    target = dest.name
    move = _Move(ctx, record, dest, operator_identity(ctx, record),
                 ctx.agent(record.host, name, record.agent_token, timeout=60),
                 started + (timeout_s or DEFAULT_TIMEOUT_S), say, op)
    say("asking the source agent for its workloads")
    running = [w for w in move.source_agent.typed("workload.list", rpc.WorkloadList).workloads
               if w.state == "running"]
    member = next((w for w in running if w.kind in DISTRIBUTED), None)
    if member is not None and not rejoin_job:
        # Its job would re-form without it at once, and the new incarnation would share its tenant address with
        # the source until the commit: by default a job's member moves by running the job again.
        raise InvalidSpec(f"{name} runs {member.id}, its part of a distributed training job: checkpoint migration "
                          "moves a VM's own workloads, not one member of a job that spans VMs",
                          hint=f"`hvctl cancel` the job's VMs, migrate {name}, and run the job again: it resumes "
                               "from its newest checkpoint (or, experimental, --rejoin-job)")
    # --rejoin-job: the member leaves the job and rejoins from the target (hvctl.ops.ckpt_member)
    joining = find_member(ctx, record, member, running) if member is not None else None
    moving = [Moving(w.id, w.args, _checkpoint_dir(w)) for w in running if w.kind in CHECKPOINTABLE]
    draining = [w.id for w in running if w.kind not in CHECKPOINTABLE and w.kind not in DISTRIBUTED]
    image = ctx.images.get(record.spec.image)
    image.verify()
    source_uuid = ctx.host(record.host).guest(name).uuid
    op.step("checked", source=record.host, source_uuid=source_uuid, source_dir=str(record.overlay.parent))
    reservation, move.port = ledger.reservations.hold_with_port(
        target, record.tenant, host_footprint(record.spec), "migration", name,
        host_limit=dest.allowance, port_free=dest.port_check(str(record.spec.ssh_bind)))
    move.workdir = Path(tempfile.mkdtemp(prefix=f"hvctl-ckpt-{name}-"))
    op.step("reserved", reservation=reservation, workdir=str(move.workdir))
    try:
        with Undo() as undo:
            undo.push("release the reservation", lambda: ledger.reservations.release(reservation))
            move.drain(draining)
            moved = move.checkpoint_out(moving)
            if joining is not None:
                leave(ctx, record, joining, move.source_agent, move.deadline, undo, say, op)
            new, as_moved, target_agent = move.boot_target(image, undo)
            # A member runs alone in its VM (find_member refuses training beside it): one or the other is verified.
            verified = [rejoin_and_verify(joining, target, target_agent, move.deadline, say)] if joining else []
            verified += move.restore_and_verify(moved, as_moved, target_agent)  # records "verified"
            say("committing the move in the ledger")
            stats = Migrated(mode="checkpoint", total_s=round(time.monotonic() - started, 3), downtime_ms=None,
                             bytes=sum(i.local_checkpoint.stat().st_size for i in moved if i.local_checkpoint),
                             workloads=tuple(verified), drained=tuple(draining), source_host=record.host)
            # The new incarnation is a new domain: its UUID moves with the rest, in the same transaction.
            ledger.vms.complete_migration(name, target, new.ssh_port, reservation, stats.as_json(),
                                      moved=new.ledger_columns() | {"domain_uuid": dest.host.guest(name).uuid})
            undo.commit()
            op.step("committed")
    finally:
        shutil.rmtree(move.workdir, ignore_errors=True)
    say(f"destroying the source incarnation on {record.host}")
    _retire_source(ctx, name, record.host, record.overlay.parent, source_uuid)
    op.step("retired")
    if record.spec.network is not None and record.spec.network.tenant_network is not None:
        leave_if_unused(ctx, record.spec.network.tenant_network, record.host, say)
    return stats


def reconcile_checkpoint_migration(ctx: Context, op: OperationRecord) -> str:
    """An interrupted checkpoint migration, decided by the ledger's commit (one transaction moved the VM, or not):
    - committed: the source incarnation (its domain, by the UUID recorded at the start, its files, its GPUs) is
      removed, as the command would have done next;
    - not committed: the new incarnation on the target (its domain, by the UUID its definition recorded, else by
      name and hvctl's metadata when it is not the source's domain; its files; its GPUs) and the reservation go. The
      source never stopped, so its workloads are still running.
    Either way the checkpoints copied to this machine are deleted."""
    vm, target, data = op.vm, op.target_host, op.data
    ledger = ctx.ledger
    if data.get("workdir"):
        shutil.rmtree(data["workdir"], ignore_errors=True)
    source = data.get("source")
    if source is None:
        ledger.operations.end(vm)
        return "nothing had been done yet"
    try:
        record = ledger.vms.get(vm)
    except NotFound:
        ledger.operations.end(vm)
        return "the VM is gone"
    if record.host == target:
        _retire_source(ctx, vm, source, Path(data["source_dir"]), data["source_uuid"], strict=True)
        ledger.operations.end(vm)
        return f"it had been committed on {target}; the source incarnation on {source} is removed"
    host = ctx.host(target)
    uuid = data.get("uuid")
    guest = host.find_guest_by_uuid(uuid) if uuid else host.find_guest(vm)
    if guest is not None and (uuid or (guest.made_by_hvctl() and guest.uuid != data["source_uuid"])):
        guest.destroy()
        guest.undefine()
    if ledger.gpus.bindings(target, vm):
        passthrough.release_vm(ctx, ctx.gpu_env, vm, target)
    target_dir = data.get("target_dir")
    if target_dir and Path(target_dir) != record.overlay.parent and Path(target_dir).parent == ctx.paths.root / "vms":
        shutil.rmtree(target_dir, ignore_errors=True)
    if data.get("target_pool"):  # the new incarnation's volumes in the target's pool (the source's are on another)
        pooled.open_files(host, vm).delete()
    if "reservation" in data:
        ledger.reservations.release_for(vm, "migration", target)
    if "member_args" in data:  # a distributed job's member had left its job, and its source domain was paused
        rejoined = restart_after_rollback(ctx, vm, source, record.agent_token, data["source_uuid"],
                                          data["member_args"])
        ledger.operations.end(vm)
        return f"rolled back: the new incarnation on {target} is removed; {rejoined}"
    ledger.operations.end(vm)
    return f"rolled back: the new incarnation on {target} is removed; {vm} kept running on {source}"


def _reported_checkpoint(event: TrainProgress, item: Moving) -> str:
    """The checkpoint path a training workload reported, accepted only as the file it must be: the step it
    reported, in the directory it was started with."""
    step, path = event.step, str(event.checkpoint)
    if path != f"{item.checkpoint_dir}/{checkpoint_name(step)}":
        raise CheckpointMigrationFailed(f"workload {item.source_id} reported checkpoint {path!r} for step {step!r}, "
                                        f"not a file of {item.checkpoint_dir}; refusing to copy it")
    return path


def _checkpoint_dir(status: rpc.WorkloadStatus) -> str:
    args = status.args
    if "--checkpoint-dir" not in args or args.index("--checkpoint-dir") + 1 >= len(args):
        raise InvalidSpec(f"training workload {status.id} runs without --checkpoint-dir, so it cannot checkpoint",
                          hint="start training with `hvctl run NAME train`, which always sets one")
    return args[args.index("--checkpoint-dir") + 1]


def _verify(source: AgentClient, target: AgentClient, item: Moving, target_id: str,
            deadline: float) -> Resumed:
    """The resumed run's first step must be k+1 and its loss must equal the source's own step k+1: the source kept
    training past the checkpoint, so it is the uninterrupted run, on the same emulated CPU."""
    first, _ = wait_for_progress(target, target_id, 0, deadline, lambda _: True, "its first step after resuming")
    if first.step != item.step + 1:
        raise CheckpointMigrationFailed(f"the restored workload started at step {first.step}, "
                                        f"not {item.step + 1}: the checkpoint was not picked up")
    reference, _ = wait_for_progress(source, item.source_id, item.log_offset, deadline,
                                      lambda p: p.step == item.step + 1, f"step {item.step + 1}")
    if first.loss != reference.loss:
        raise CheckpointMigrationFailed(f"step {item.step + 1} loss on the target is {first.loss!r}, on the source "
                                        f"{reference.loss!r}: the restore is not exact")
    return Resumed(item.source_id, target_id, item.step, first.step, first.loss, reference.loss)


def _retire_source(ctx: Context, name: str, host_name: str, directory: Path, uuid: str, strict: bool = False) -> None:
    """After the commit the source incarnation is surplus: its domain (found by its UUID, never by name: the new
    incarnation has the same name), its files, its GPUs. From the command, a failure is logged, not raised (the VM
    has moved, and the intent row left behind lets `doctor --repair` finish); from the repair (``strict``) it
    raises, so the row stays until the source host answers."""
    try:
        guest = ctx.host(host_name).find_guest_by_uuid(uuid)
        try:
            if guest is not None:
                guest.destroy()
                guest.undefine()
        except NotFound:
            pass
        if not ctx.is_this_machine(host_name):  # its volumes in its host's pool
            pooled.open_files(ctx.host(host_name), name).delete()
        elif directory.parent == ctx.paths.root / "vms" and directory != ctx.ledger.vms.get(name).overlay.parent:
            shutil.rmtree(directory, ignore_errors=True)
        passthrough.release_vm(ctx, ctx.gpu_env, name, host_name)  # "its GPU returned to the host"
    except (HvctlError, AgentError) as exc:
        if strict:
            raise
        ctx.ledger.events.log(name, host_name, "migration.source-left",
                             f"the source incarnation on {host_name} could not be removed: {exc}")
