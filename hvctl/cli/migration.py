"""hvctl migrate."""

from typing import Annotated, Any

import typer

from hvctl.cli.common import (
    JsonOpt,
    app,
    ctx,
    emit_json,
    err,
    fail,
    out,
)

# -- migration ------------------------------------------------------------------------------------------------


@app.command()
def migrate(
    name: str,
    to: Annotated[str | None, typer.Option("--to", help="Target host (see `hvctl host list`).")] = None,
    mode: Annotated[str, typer.Option(help="live, postcopy, offline or checkpoint.")] = "live",
    max_downtime: Annotated[int | None, typer.Option(help="Max downtime in ms.")] = None,
    bandwidth: Annotated[int | None, typer.Option(help="Bandwidth cap in MiB/s.")] = None,
    auto_converge: Annotated[bool, typer.Option(help="Throttle the guest's vCPUs until memory converges.")] = False,
    copy_storage: Annotated[bool, typer.Option(help="Copy disks too (non-shared storage).")] = False,
    timeout: Annotated[float | None, typer.Option(help="Seconds before --timeout-action applies (checkpoint mode: "
                                                        "the whole operation, default 900).")] = None,
    timeout_action: Annotated[str, typer.Option(help="abort or postcopy.")] = "abort",
    rejoin_job: Annotated[bool, typer.Option(help="Checkpoint mode, experimental: a member of a distributed training "
                                                  "job leaves it and rejoins from the target.")] = False,
    cancel: Annotated[bool, typer.Option("--cancel", help="Cancel this VM's migration in progress.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Move a running VM to another host; prechecks and the target's reservation come before anything moves."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    from hvctl.ops.migrate import MigrateOptions
    from hvctl.ops.migrate import migrate as do_migrate

    c = ctx()
    if cancel:
        record = c.ledger.vms.get(name)
        c.host(record.host).guest(name).abort_job()
        out.print(f"cancelled the migration of {name}; it stays on {record.host}")
        return
    if to is None:
        fail("--to HOST is required", 2)
    if mode not in ("live", "postcopy", "offline", "checkpoint") or timeout_action not in ("abort", "postcopy"):
        fail("--mode must be live, postcopy, offline or checkpoint; --timeout-action abort or postcopy", 2)
    opts = MigrateOptions(mode=mode, max_downtime_ms=max_downtime, bandwidth_mib_s=bandwidth,  # type: ignore[arg-type]
                          auto_converge=auto_converge, copy_storage=copy_storage, timeout_s=timeout,
                          timeout_action=timeout_action, rejoin_job=rejoin_job)  # type: ignore[arg-type]
    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                        TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=err.console, transient=True)
    task = progress.add_task(f"migrate {name} → {to}", total=None, detail="prechecks")

    def on_progress(stats: dict[str, Any]) -> None:
        done, left = int(stats.get("data_processed", 0)), int(stats.get("data_remaining", 0))
        rate = float(stats.get("memory_dirty_rate", 0)) * float(stats.get("memory_page_size", 4096))
        detail = (f"iter {stats.get('memory_iteration', 0)}, dirty {rate / 2**20:.1f} MiB/s, "
                  f"expected downtime {stats.get('downtime', '?')} ms")
        progress.update(task, completed=done, total=done + left or None, detail=detail)

    def say(step: str) -> None:
        progress.update(task, detail=step)

    with progress:
        stats = do_migrate(c, name, to, opts, on_progress, say)
    if as_json:
        emit_json({"name": name, "host": to} | stats.as_json())
    elif mode == "checkpoint":
        resumed = "; ".join(f"{w.source_id} → {w.target_id} resumed at step {w.resumed_step} "
                            f"(loss {w.loss:.6f}, equal to {f'{w.peer} in its job' if w.peer else 'the source'}'s)"
                            for w in stats.workloads)
        out.print(f"{name} is on {to} (a new incarnation; the one on {stats.source_host} is destroyed): "
                  f"{stats.total_s:.1f} s total, {(stats.bytes or 0) / 2**20:.1f} MiB of checkpoints"
                  + (f"; {resumed}" if resumed else "; no training workload was running"))
    else:
        out.print(f"{name} is on {to}: {stats.total_s:.2f} s total, downtime {stats.downtime_ms} ms, "
                  f"{(stats.bytes or 0) / 2**20:.1f} MiB transferred")
