"""Migration prechecks that refuse from the ledger alone, before any host is contacted."""

from __future__ import annotations

import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import short_tempdir
from test_gpu_create import Rig

from guest import rpc
from guest.agent import Agent, serve_socket
from hvctl.agent_client import AgentClient
from hvctl.context import Context
from hvctl.errors import InvalidSpec, NotFound
from hvctl.ledger import VMPaths
from hvctl.ops.lifecycle import destroy
from hvctl.ops.migrate import MigrateOptions, migrate
from hvctl.ops.run import cancel
from hvctl.spec import VMSpec

TOKEN = "t" * 32


@pytest.fixture
def ctx() -> Iterator[Context]:
    state = short_tempdir("hvq-")
    # URIs that would fail loudly if a precheck tried to connect anywhere.
    context = Context(state_dir=state, uri="qemu:///system?socket=/nonexistent")
    for host in ("h1", "h2"):
        context.ledger.hosts.ensure(host, f"qemu+tcp://127.0.0.1:1/{host}")
        context.ledger.hosts.record_facts(host, "qemu", 8, 16384)
    vm = state / "vms" / "gpu-vm"
    context.ledger.vms.reserve(VMSpec(name="gpu-vm", gpus={"count": 1}), "h1",
                              VMPaths(state / "base", vm / "disk", vm / "seed", vm / "console", vm / "agent"))
    yield context
    context.close()
    shutil.rmtree(state, ignore_errors=True)


def test_live_migration_of_a_gpu_vm_points_to_checkpoint_mode(ctx: Context) -> None:
    with pytest.raises(InvalidSpec, match="passthrough GPU") as exc:
        migrate(ctx, "gpu-vm", "h2", MigrateOptions(mode="live"))
    assert exc.value.hint == "use --mode checkpoint"
    assert ctx.ledger.reservations.all() == [] and ctx.ledger.vms.get("gpu-vm").host == "h1"


def test_same_host_unknown_host_and_unknown_vm(ctx: Context) -> None:
    with pytest.raises(InvalidSpec, match="already on host h1"):
        migrate(ctx, "gpu-vm", "h1", MigrateOptions(mode="checkpoint"))
    with pytest.raises(NotFound, match="unknown host 'h9'"):
        migrate(ctx, "gpu-vm", "h9", MigrateOptions())
    with pytest.raises(NotFound, match="no VM named 'nope'"):
        migrate(ctx, "nope", "h2", MigrateOptions())
    assert ctx.ledger.reservations.all() == []


def test_checkpoint_mode_needs_an_agent_and_says_so_before_reserving(ctx: Context) -> None:
    with pytest.raises(InvalidSpec, match="has no agent") as exc:
        migrate(ctx, "gpu-vm", "h2", MigrateOptions(mode="checkpoint"))
    assert exc.value.hint == "use --mode offline"
    assert ctx.ledger.reservations.all() == [] and ctx.ledger.vms.get("gpu-vm").host == "h1"





def test_checkpoint_mode_refuses_a_member_of_a_distributed_job_before_reserving(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A running domain on libvirt's test driver, and a real agent (guest/agent.py serving a unix socket in a
    thread, its train-ddp a sleeping stand-in): only the channel to the agent is a socket here instead of the
    domain's virtio-serial one."""
    rig = Rig(tmp_path)
    rig.create("member", gpus=0)
    rig.ctx.ledger.hosts.ensure("h2", "test:///default")
    rig.ctx.ledger.hosts.record_facts("h2", "qemu", 8, 16384)  # what `hvctl host add` probes
    agent = Agent(token=TOKEN, workdir=tmp_path / "agent",
                  workloads={"train-ddp": lambda _args: [sys.executable, "-c", "import time; time.sleep(60)"]})
    sock = Path("/tmp") / f"hvctl-ckpt-test-{time.time_ns()}.sock"
    threading.Thread(target=serve_socket, args=(agent, sock), daemon=True).start()
    client = AgentClient.over_socket(sock, TOKEN, timeout=10)
    try:
        client.wait_ready(20)
        started = client.typed("workload.start", rpc.WorkloadStatus, rpc.WorkloadStartParams(
            kind="train-ddp", args=["--job", "ddp-1", "--min-nodes", "1", "--", "--objective", "ssl"]))
        monkeypatch.setattr(rig.ctx, "agent", lambda *_a, **_k: client)
        with pytest.raises(InvalidSpec, match=f"member runs {started.id}, its part of a distributed training job"):
            migrate(rig.ctx, "member", "h2", MigrateOptions(mode="checkpoint"))
        # Experimental, asked for: its job's other members would train on while it moves; here it has none left.
        with pytest.raises(InvalidSpec, match="job ddp-1 runs on 1 VM.s. with a minimum of 1: it cannot go on "
                                              "without member while it moves"):
            migrate(rig.ctx, "member", "h2", MigrateOptions(mode="checkpoint", rejoin_job=True))
        assert rig.ctx.ledger.reservations.all() == [] and rig.ctx.ledger.vms.get("member").host == "local"
        assert client.typed("workload.status", rpc.WorkloadStatus, rpc.WorkloadRef(id=started.id)).state == "running"
        # `hvctl cancel`'s core: every running workload stopped, and reported; an unknown id refused.
        assert [(vm, s.state) for vm, s in cancel({"member": client})] == [("member", "cancelled")]
        assert cancel({"member": client}) == []
        with pytest.raises(NotFound, match="member has no workload w99"):
            cancel({"member": client}, "w99")
    finally:
        agent.shutdown_requested.set()
        for wid in list(agent._running):
            agent.rpc_workload_cancel(rpc.WorkloadRef(id=wid))
        sock.unlink(missing_ok=True)
        destroy(rig.ctx, "member")
        rig.ctx.close()
        shutil.rmtree(rig.state, ignore_errors=True)
