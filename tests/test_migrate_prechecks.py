"""Migration prechecks that refuse from the ledger alone, before any host is contacted."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from conftest import short_tempdir

from hvctl.context import Context
from hvctl.errors import InvalidSpec, NotFound
from hvctl.ledger import VMPaths
from hvctl.ops.migrate import MigrateOptions, migrate
from hvctl.spec import VMSpec


@pytest.fixture
def ctx() -> Iterator[Context]:
    state = short_tempdir("hvq-")
    # URIs that would fail loudly if a precheck tried to connect anywhere.
    context = Context(state_dir=state, uri="qemu:///system?socket=/nonexistent")
    for host in ("h1", "h2"):
        context.ledger.ensure_host(host, f"qemu+tcp://127.0.0.1:1/{host}")
        context.ledger.record_host_facts(host, "qemu", 8, 16384)
    vm = state / "vms" / "gpu-vm"
    context.ledger.reserve_vm(VMSpec(name="gpu-vm", gpus={"count": 1}), "h1",
                              VMPaths(state / "base", vm / "disk", vm / "seed", vm / "console", vm / "agent"))
    yield context
    context.close()
    shutil.rmtree(state, ignore_errors=True)


def test_live_migration_of_a_gpu_vm_points_to_checkpoint_mode(ctx: Context) -> None:
    with pytest.raises(InvalidSpec, match="passthrough GPU") as exc:
        migrate(ctx, "gpu-vm", "h2", MigrateOptions(mode="live"))
    assert exc.value.hint == "use --mode checkpoint"
    assert ctx.ledger.reservations() == [] and ctx.ledger.get_vm("gpu-vm").host == "h1"


def test_same_host_unknown_host_and_unknown_vm(ctx: Context) -> None:
    with pytest.raises(InvalidSpec, match="already on host h1"):
        migrate(ctx, "gpu-vm", "h1", MigrateOptions(mode="checkpoint"))
    with pytest.raises(NotFound, match="unknown host 'h9'"):
        migrate(ctx, "gpu-vm", "h9", MigrateOptions())
    with pytest.raises(NotFound, match="no VM named 'nope'"):
        migrate(ctx, "nope", "h2", MigrateOptions())
    assert ctx.ledger.reservations() == []


def test_checkpoint_mode_needs_an_agent_and_says_so_before_reserving(ctx: Context) -> None:
    with pytest.raises(InvalidSpec, match="has no agent") as exc:
        migrate(ctx, "gpu-vm", "h2", MigrateOptions(mode="checkpoint"))
    assert exc.value.hint == "use --mode offline"
    assert ctx.ledger.reservations() == [] and ctx.ledger.get_vm("gpu-vm").host == "h1"


