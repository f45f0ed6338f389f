"""hvctl snapshot create|list|revert|rm."""

import time
from typing import Annotated

import typer

from hvctl.cli.common import JsonOpt, RichReporter, Table, app, ctx, emit_json, out

snapshot_app = typer.Typer(no_args_is_help=True, help="A VM's snapshots (internal qcow2 snapshots through libvirt), "
                                                      "charged against its tenant's disk quota.")
app.add_typer(snapshot_app, name="snapshot")


@snapshot_app.command("create")
def snapshot_create(
    name: str,
    snap: Annotated[str, typer.Argument(help="The snapshot's name.")],
    memory: Annotated[bool, typer.Option("--memory", help="Also save the running guest's memory and device state; "
                                                          "required for a running VM.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Snapshot a VM's disk (a stopped VM), or its disk and memory (--memory: a running or paused one)."""
    from hvctl.ops.snapshot import create

    started = time.monotonic()
    with RichReporter(f"snapshot {name} {snap}") as reporter:
        record = create(ctx(), name, snap, memory, reporter)
    elapsed = time.monotonic() - started
    if as_json:
        emit_json(record.as_dict() | {"seconds": round(elapsed, 3)})
    else:
        out.print(f"snapshot {snap} of {name} taken in {elapsed:.1f} s "
                  f"({'disk and memory' if memory else 'disk'}; {record.disk_gib:g} GiB charged to {record.tenant})")


@snapshot_app.command("list")
def snapshot_list(name: str, as_json: JsonOpt = False) -> None:
    """A VM's snapshots, with what each is charged and whether libvirt has it."""
    from hvctl.ops.snapshot import list_snapshots

    snaps = list_snapshots(ctx(), name)
    if as_json:
        emit_json([s.as_json() for s in snaps])
        return
    table = Table("NAME", "CREATED", "MEMORY", "CHARGED GiB", "STATE")
    for view in snaps:
        s = view.record
        state = s.state if view.in_libvirt else f"[red]{s.state}, missing from libvirt[/]"
        table.add_row(s.name, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.created_at)),
                      "yes" if s.memory else "no", f"{s.disk_gib:g}", state)
    out.print(table)


@snapshot_app.command("revert")
def snapshot_revert(name: str, snap: str, as_json: JsonOpt = False) -> None:
    """Return a VM to a snapshot: running as it was (a memory snapshot), or its disk as it was (a stopped VM)."""
    from hvctl.ops.snapshot import revert

    with RichReporter(f"revert {name} to {snap}") as reporter:
        state = revert(ctx(), name, snap, reporter)
    if as_json:
        emit_json({"name": name, "snapshot": snap, "state": state})
    else:
        out.print(f"{name} reverted to {snap} ({state})")


@snapshot_app.command("rm")
def snapshot_rm(name: str, snap: str, as_json: JsonOpt = False) -> None:
    """Delete a snapshot; its charge against the tenant's disk quota is released."""
    from hvctl.ops.snapshot import remove

    with RichReporter(f"snapshot rm {name} {snap}") as reporter:
        remove(ctx(), name, snap, reporter)
    if as_json:
        emit_json({"name": name, "snapshot": snap, "deleted": True})
    else:
        out.print(f"snapshot {snap} of {name} deleted")
