"""hvctl create, list, show, start, stop, destroy, console-log, doctor."""

import sys
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from hvctl.cli.common import (
    JsonOpt,
    OutputOpt,
    RichReporter,
    Table,
    app,
    ctx,
    emit,
    emit_json,
    err,
    fail,
    out,
    output_format,
    plain,
    safe,
)
from hvctl.errors import HostUnreachable

if TYPE_CHECKING:
    from collections.abc import Sequence

    from hvctl.ledger import Event
    from hvctl.ops.events import StreamEvent
    from hvctl.ops.inspect import Drift, VMView

# -- VM lifecycle ---------------------------------------------------------------------------------------------


@app.command()
def create(
    name: str,
    flavor: Annotated[str | None, typer.Option(help="A named size from the policy; flags below override it.")] = None,
    host: Annotated[str | None, typer.Option(help="Host to create on (default: the scheduler picks).")] = None,
    vcpus: Annotated[int | None, typer.Option(help="Virtual CPUs.")] = None,
    cpu_limit: Annotated[float | None, typer.Option(help="Cap on host CPU time, in CPUs (e.g. 0.5).")] = None,
    io_weight: Annotated[int | None, typer.Option(help="Block I/O weight, 100-1000.")] = None,
    anti_affinity: Annotated[str | None, typer.Option(help="Never share a host with VMs of this group.")] = None,
    viommu: Annotated[bool, typer.Option(help="Give the guest a virtual Intel IOMMU (VFIO inside the guest).")] = False,
    memory: Annotated[int | None, typer.Option(help="Memory in MiB.")] = None,
    disk: Annotated[int | None, typer.Option(help="Overlay disk size in GiB.")] = None,
    gpus: Annotated[int | None, typer.Option(help="Whole GPUs to pass through.")] = None,
    gpu_model: Annotated[str | None, typer.Option(help="GPU model: a policy accelerator name or vendor:device ids.")]
    = None,
    image: Annotated[str, typer.Option(help="Image name (see `hvctl image list`).")] = "minimal",
    tenant: Annotated[str, typer.Option(help="Owning tenant.")] = "default",
    boot_timeout: Annotated[float, typer.Option(help="Seconds to wait for the guest to report ready.")] = 120.0,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Return once the domain runs, without waiting for the "
                                                             "guest; `hvctl wait NAME --for agent|ssh` later.")]
    = False,
    ssh_bind: Annotated[str, typer.Option(help="Host address the VM's SSH forward listens on.")] = "127.0.0.1",
    bridge: Annotated[str | None, typer.Option(help="Add a NIC on this host bridge (production traffic).")] = None,
    network: Annotated[str | None, typer.Option(help="Add a NIC on this libvirt network (NAT or isolated).")] = None,
    ip: Annotated[str | None, typer.Option(help="Static address of that NIC, e.g. 198.18.77.10/24.")] = None,
    gateway: Annotated[str | None, typer.Option(help="Default route via that NIC, through this gateway.")] = None,
    net: Annotated[str | None, typer.Option("--net", help="Add a NIC on this tenant network (`hvctl network`); "
                                                          "the ledger gives its address.")] = None,
    operator_key: Annotated[bool, typer.Option(
        "--operator-key/--no-operator-key",
        help="Authorise hvctl's operator key for root (default). Without it only the tenant's keys open the VM; "
             "the agent still works, but hvctl checkpoint/restore and checkpoint migration do not.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Create a VM: overlay disk, domain, start, and wait until the guest itself reports it is up."""
    from hvctl.ops.create import create as create_vm
    from hvctl.ops.incarnation import BootOptions
    from hvctl.spec import VMSpec

    sizes = ctx().policy.sizes(flavor, vcpus=vcpus, memory_mib=memory, disk_gib=disk, gpus=gpus)
    if gpu_model is not None:
        if not sizes["gpus"]["count"]:
            fail("--gpu-model needs --gpus N (or a flavor with GPUs)", 2)
        sizes["gpus"] = sizes["gpus"] | {"model": gpu_model}
    if (ip or gateway) and not (bridge or network):
        fail("--ip and --gateway configure the NIC that --bridge or --network adds", 2)
    if net is not None and (bridge or network):
        fail("--net adds the VM's second NIC, as --bridge and --network do: give one of them", 2)
    attach: Any = {"bridge": bridge, "network": network, "address": ip, "gateway": gateway} \
        if bridge or network else None
    if net is not None:
        from hvctl.ops.networks import tenant_attach

        attach = tenant_attach(ctx(), net)
    spec = VMSpec.parse(name=name, image=image, tenant=tenant, host=host, ssh_bind=ssh_bind, cpu_limit=cpu_limit,
                        io_weight=io_weight, anti_affinity=anti_affinity, viommu=viommu, network=attach,
                        operator_key=operator_key, **sizes)
    started = time.monotonic()
    with RichReporter(f"create {name}") as reporter:
        stats: dict[str, object] = {}
        record = create_vm(ctx(), spec, reporter, BootOptions(timeout=boot_timeout, wait=not no_wait), stats=stats)
    elapsed = time.monotonic() - started
    if as_json:
        emit_json(record.as_dict() | {"create_seconds": round(elapsed, 3), "waited": not no_wait} | stats)
    elif no_wait:
        out.print(f"[bold]{name}[/] started on {record.host} in {elapsed:.1f} s, not waited for "
                  f"(ssh forward {spec.ssh_bind}:{record.ssh_port}); `hvctl wait {name} --for agent` waits")
    else:
        out.print(f"[bold]{name}[/] is up on {record.host} in {elapsed:.1f} s "
                  f"(ssh forward {spec.ssh_bind}:{record.ssh_port})")


@app.command("list")
def list_cmd(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's VMs.")] = None,
    host: Annotated[str | None, typer.Option(help="Only the VMs on this host.")] = None,
    state: Annotated[str | None, typer.Option(help="Only VMs in this ledger state (running, paused, stopped, "
                                                   "creating, destroying).")] = None,
    output: OutputOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List VMs with the ledger's state, libvirt's state, and any disagreement between them. -o name prints one
    name per line, for scripts."""
    from hvctl.ledger import VM_STATES
    from hvctl.ops.inspect import list_vms

    fmt = output_format(output, as_json)
    if state is not None and state not in VM_STATES:
        fail(f"--state takes {', '.join(VM_STATES)}, not {state!r}", 2)
    views, orphans, unreachable = list_vms(ctx())
    views = [v for v in views if (tenant is None or v.record.tenant == tenant)
             and (host is None or v.record.host == host) and (state is None or v.record.state == state)]
    if tenant or host or state:
        orphans = [o for o in orphans if host is None or o.host == host] if not (tenant or state) else []
    if fmt == "name":
        sys.stdout.write("".join(f"{v.record.name}\n" for v in views))
    elif fmt in ("json", "yaml"):
        emit({"vms": [v.as_dict() for v in views], "orphans": [o.as_dict() for o in orphans],
              "unreachable_hosts": [u.as_dict() for u in unreachable]}, fmt)
    else:
        print_vm_table(views, orphans)
    if unreachable:
        # Show what the ledger knows, but a listing that could not ask every host must not look like success.
        fail("; ".join(f"host {u.host}: {u.problem}" for u in unreachable), HostUnreachable.exit_code)


def print_vm_table(views: "list[VMView]", orphans: "list[Drift]") -> None:
    table = Table("NAME", "TENANT", "HOST", "STATE", "LIBVIRT", "VCPU", "MEM MiB", "SSH", "DRIFT")
    for v in views:
        r = v.record
        actual = v.actual.value if v.actual else "unreachable"
        table.add_row(r.name, r.tenant, r.host, r.state, actual, str(r.spec_fields["vcpus"]),
                      str(r.spec_fields["memory_mib"]),
                      str(r.ssh_port), f"[red]{safe(v.drift)}[/]" if v.drift else "")
    for o in orphans:
        table.add_row(safe(o.vm), "?", o.host, "-", "?", "", "", "", f"[red]{safe(o.problem)}[/]")
    out.print(table)


@app.command()
def show(name: str, output: OutputOpt = None, as_json: JsonOpt = False) -> None:
    """Everything hvctl knows about one VM, with its recent events."""
    from hvctl.ops.inspect import show_vm

    fmt = output_format(output, as_json, ("table", "json", "yaml"))
    detail = show_vm(ctx(), name)
    if fmt != "table":
        emit(detail.as_json(), fmt)
        return
    r = detail.record
    spec = r.spec
    rows = (("name", r.name), ("tenant", r.tenant), ("host", r.host), ("state", r.state),
            ("actual", detail.view.actual.value if detail.view.actual else "unreachable"), ("drift", detail.view.drift),
            ("image", r.image), ("vcpus", spec.vcpus), ("memory_mib", spec.memory_mib), ("disk_gib", spec.disk_gib),
            ("network", detail.network), ("ssh_port", r.ssh_port), ("overlay", r.overlay),
            ("console_log", r.console_log), ("agent_socket", r.agent_socket))
    table = Table.grid(padding=(0, 2))
    for key, value in rows:
        if key == "network" and value is None:
            continue
        table.add_row(f"[bold]{key}[/]", f"[red]{safe(value)}[/]" if key == "drift" and value else safe(value))
    out.print(table)
    report = detail.enforcement
    if report and report.enforced:
        cfg, got = report.configured, report.enforced
        quota = f"{cfg.global_quota_us}/{cfg.global_period_us}" if cfg.global_quota_us else "none"
        out.print(f"[bold]enforcement[/] (cgroup v{got.version}, QEMU pid {report.pid}): "
                  f"CPU quota configured {quota}, enforced {got.cpu_quota_us or 'none'}/{got.cpu_period_us}; "
                  f"memory hard limit configured {cfg.memory_hard_limit_kib or 'none'} KiB, "
                  f"enforced {got.memory_limit_bytes or 'none'} bytes")
        for problem in report.mismatches:
            out.print(f"  [red]mismatch: {problem}[/]")
    if detail.last_migration:
        m = detail.last_migration
        downtime = ("workloads resumed from checkpoints" if m["mode"] == "checkpoint"
                    else f"downtime {m['downtime_ms']} ms")
        out.print(f"[bold]last migration[/]: {m['total_s']} s total, {downtime}, "
                  f"{(m['bytes'] or 0) / 2**20:.1f} MiB, mode {m['mode']}")
    if detail.operation:
        op = detail.operation
        progress = op.progress or {}
        done = f", {progress['percent']:.0f}% after {progress['elapsed_s']} s" \
            if progress.get("percent") is not None else ""
        out.print(f"[bold]in progress[/]: {safe(op.kind)}" + (f" to {safe(op.target)}" if op.target else "")
                  + f" (step {safe(op.step)}{done})")
    if detail.snapshots:
        out.print("[bold]snapshots[/]: " + ", ".join(
            f"{safe(s.name)} ({'memory' if s.memory else 'disk'}, {s.disk_gib:g} GiB)" for s in detail.snapshots))
    out.print("[bold]events[/]")
    out.print(render_events(detail.events))


def render_events(events: "Sequence[Event]") -> str:
    """Events can quote a guest (a workload's error): rendered as plain text, never as markup or escapes."""
    return "\n".join(f"  {time.strftime('%H:%M:%S', time.localtime(e.ts))} {safe(e.kind):<18} "
                     f"{safe(e.message)}" for e in events)


@app.command()
def events(
    vm: Annotated[str | None, typer.Option("--vm", help="Only this VM's events.")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events as they come, hvctl's "
                                                                "and libvirt's (Ctrl-C ends).")] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", help="How many past events to show first.", min=0)] = 50,
    as_json: JsonOpt = False,
) -> None:
    """The event log: what hvctl did (ledger) and, with --follow, what libvirt saw happen to the VMs (lifecycle,
    guest reboots, disk I/O errors, migration passes). --json: a list; with --follow, one object per line."""
    import json as jsonlib

    from hvctl.ops.events import follow as follow_events
    from hvctl.ops.events import history

    def show_one(e: "StreamEvent") -> None:
        if as_json:
            sys.stdout.write(jsonlib.dumps(e.as_json()) + "\n")
            sys.stdout.flush()
            return
        when = time.strftime("%H:%M:%S", time.localtime(e.ts))
        source = "" if e.source == "ledger" else f" [{e.source}]"
        out.print(f"{when} {safe(e.vm or '-'):<14} {safe(e.kind):<24} {safe(e.message)}{source}", highlight=False)

    if not follow:
        past = history(ctx(), vm, lines)
        if as_json:
            emit_json([e.as_json() for e in past])
        else:
            for e in past:
                show_one(e)
        return
    try:
        for e in follow_events(ctx(), vm, lines, on_problem=lambda p: err.print(f"[yellow]{safe(p)}[/]")):
            show_one(e)
    except KeyboardInterrupt:
        return


@app.command()
def start(name: str, as_json: JsonOpt = False) -> None:
    """Start a stopped VM and wait until the guest reports ready."""
    from hvctl.ops.lifecycle import start as start_vm

    with RichReporter(f"start {name}") as reporter:
        waited = start_vm(ctx(), name, reporter)
    if as_json:
        emit_json({"name": name, "state": "running", "boot_seconds": round(waited, 3)})
    else:
        out.print(f"{name} is up ({waited:.1f} s)")


@app.command()
def stop(
    name: str,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for a graceful power-off before destroying.")] = 30,
    as_json: JsonOpt = False,
) -> None:
    """Gracefully shut a VM down; destroy it if it has not powered off within the timeout."""
    from hvctl.ops.lifecycle import stop as stop_vm

    with RichReporter(f"stop {name}") as reporter:
        how = stop_vm(ctx(), name, timeout, reporter)
    if as_json:
        emit_json({"name": name, "state": "stopped", "how": how})
    else:
        out.print(f"{name} stopped ({how})")


@app.command()
def restart(
    name: str,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for a graceful power-off before destroying.")] = 30,
    force: Annotated[bool, typer.Option("--force", help="Power off at once, without asking the guest.")] = False,
    boot_timeout: Annotated[float, typer.Option(help="Seconds to wait for the guest to report ready.")] = 120.0,
    as_json: JsonOpt = False,
) -> None:
    """Power a VM off and boot it again (a new QEMU process), and wait until the guest reports ready."""
    from hvctl.ops.lifecycle import restart as restart_vm

    with RichReporter(f"restart {name}") as reporter:
        how, waited = restart_vm(ctx(), name, timeout, reporter, boot_timeout, force)
    if as_json:
        emit_json({"name": name, "state": "running", "stop": how, "boot_seconds": round(waited, 3)})
    else:
        out.print(f"{name} restarted ({how} stop, up after {waited:.1f} s)")


@app.command()
def resize(
    name: str,
    vcpus: Annotated[int | None, typer.Option(help="Virtual CPUs (at the next boot).")] = None,
    memory: Annotated[int | None, typer.Option(help="Memory in MiB (at the next boot).")] = None,
    disk: Annotated[int | None, typer.Option(help="Disk size in GiB; only grows, live on a running VM (its "
                                                  "filesystem too, through the agent).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Change a VM's vCPUs, memory or disk, admitted against its tenant's quota and its host's capacity."""
    from hvctl.ops.resize import resize as resize_vm

    with RichReporter(f"resize {name}") as reporter:
        done = resize_vm(ctx(), name, vcpus, memory, disk, reporter)
    if as_json:
        emit_json(done.as_json())
        return
    size, applied = done.spec, done.applied
    out.print(f"{name}: {size.vcpus} vCPU, {size.memory_mib} MiB, {size.disk_gib} GiB disk")
    if applied.cpu_memory != "unchanged":
        out.print(f"  vCPUs and memory take effect {applied.cpu_memory}"
                  + (f" (`hvctl restart {name}`)" if applied.cpu_memory == "at the next boot" else ""))
    if applied.disk != "unchanged":
        out.print(f"  disk {applied.disk}; filesystem {safe(applied.filesystem)}")


@app.command()
def pause(name: str, as_json: JsonOpt = False) -> None:
    """Freeze a running VM's vCPUs; its memory stays allocated. `hvctl resume` lets it run again."""
    from hvctl.ops.lifecycle import pause as pause_vm

    pause_vm(ctx(), name)
    if as_json:
        emit_json({"name": name, "state": "paused"})
    else:
        out.print(f"{name} paused")


@app.command()
def resume(name: str, as_json: JsonOpt = False) -> None:
    """Let a paused VM run again."""
    from hvctl.ops.lifecycle import resume as resume_vm

    resume_vm(ctx(), name)
    if as_json:
        emit_json({"name": name, "state": "running"})
    else:
        out.print(f"{name} resumed")


@app.command("wait")
def wait_cmd(
    name: str,
    condition: Annotated[str, typer.Option("--for", help="agent: its agent answers; ssh: SSH with the pinned host "
                                                          "key opens; stopped: the domain is shut off.")] = "agent",
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds (exit 7).", min=0)] = 120.0,
    as_json: JsonOpt = False,
) -> None:
    """Block until a VM's agent answers, its SSH opens, or it has stopped."""
    from hvctl.ops.wait import CONDITIONS, wait

    if condition not in CONDITIONS:
        fail(f"--for takes {', '.join(CONDITIONS)}, not {condition!r}", 2)
    waited = wait(ctx(), name, condition, timeout)
    if as_json:
        emit_json({"name": name, "for": condition, "waited_seconds": round(waited, 3)})
    else:
        out.print(f"{name}: {condition} ready after {waited:.1f} s" if condition != "stopped"
                  else f"{name} is stopped (waited {waited:.1f} s)")


@app.command()
def destroy(
    name: str,
    orphan: Annotated[bool, typer.Option("--orphan", help="NAME is a domain with hvctl's metadata on --host that "
                                                            "no VM in the ledger is (`doctor` lists them).")]
    = False,
    host: Annotated[str | None, typer.Option("--host", help="With --orphan: the host it is on.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove a VM entirely: domain, overlay disk, console log and ledger entry."""
    from hvctl.ops.lifecycle import destroy as destroy_vm
    from hvctl.ops.lifecycle import destroy_orphan

    if host is not None and not orphan:
        fail("--host goes with --orphan: a VM in the ledger is destroyed where the ledger says it is", 2)
    with RichReporter(f"destroy {name}") as reporter:
        if orphan:
            removed = destroy_orphan(ctx(), name, host or ctx().host_name, reporter)
        else:
            destroy_vm(ctx(), name, reporter)
            removed = []
    if as_json:
        emit_json({"name": name, "destroyed": True} | ({"removed": removed} if orphan else {}))
    else:
        out.print(f"{name} destroyed" + (f": {', '.join(removed)}" if orphan else ""))


@app.command()
def adopt(
    name: str,
    host: Annotated[str | None, typer.Option("--host", help="The host the orphan is on (default: the connected "
                                                             "host).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Take an orphan (a domain with hvctl's metadata that no VM in the ledger is) back into the ledger, as it is:
    its spec, port, files, agent token and host key are read from the domain and its seed; the tenant's quota and
    the host's capacity are checked as for a create. Nothing on the host changes."""
    from hvctl.ops.adopt import adopt as adopt_vm

    with RichReporter(f"adopt {name}") as reporter:
        record = adopt_vm(ctx(), name, host or ctx().host_name, reporter)
    if as_json:
        emit_json(record.as_dict())
    else:
        out.print(f"{name} adopted on {record.host} ({record.state}, tenant {record.tenant}, "
                  f"ssh port {record.ssh_port})")


@app.command("console-log")
def console_log(
    name: str,
    lines: Annotated[int, typer.Option("--lines", "-n", help="Only the last N lines (0: all).")] = 0,
) -> None:
    """Print the guest's serial console output."""
    from hvctl.console import read_console
    from hvctl.ops.pooled import console_of

    c = ctx()
    text = read_console(console_of(c, c.ledger.vms.get(name)))
    if lines:
        text = "\n".join(text.splitlines()[-lines:])
    text = plain(text)
    sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")


@app.command("console")
def console(
    name: str,
    force: Annotated[bool, typer.Option("--force", help="Take the console from another client holding it.")]
    = False,
) -> None:
    """Attach to the guest's serial console, wherever the VM runs (Ctrl-] leaves). Input may be a pipe: the
    session then ends when the input does and the guest has gone quiet."""
    from hvctl.ops.console import attach

    c = ctx()
    record = c.ledger.vms.get(name)

    def connected() -> None:
        sys.stderr.write(f"connected to the console of {name} on {record.host}; escape character is ^]\r\n")
        sys.stderr.flush()

    end = attach(c, name, sys.stdin.fileno(), sys.stdout.fileno(), force=force, connected=connected)
    if end.reason == "guest-ended":
        sys.stderr.write(f"\r\nthe console of {name} closed (the guest stopped, or another client took it)\r\n")
    sys.stderr.flush()


@app.command()
def doctor(
    repair: Annotated[bool, typer.Option("--repair", help="Return GPUs a crash left bound to their drivers.")]
    = False,
    as_json: JsonOpt = False,
) -> None:
    """Check libvirtd, the accelerator, images, the state dir, drift between the ledger and libvirt, and GPUs left
    bound; --repair returns those first (with --json: {"repaired": ..., "checks": [...]})."""
    from hvctl.ops import doctor as doc

    context = ctx()
    repaired = doc.repair(context) if repair else None
    if repaired is not None and not as_json:
        for fixed in repaired.operations:
            out.print(f"repair: {safe(fixed.operation)}: {safe(fixed.outcome)}")
        if repaired.gpus_returned:
            out.print(f"repair: returned {', '.join(repaired.gpus_returned)} to their host drivers")
        if repaired.gpus_revived:
            out.print(f"repair: {', '.join(repaired.gpus_revived)} answer on the bus again and are placed again")
        for host, why in repaired.gpus_unreachable.items():
            out.print(f"[red]repair: host {host} could not be reached; its GPUs are as they were[/]: {safe(why)}")
        for network in repaired.vxlan:
            out.print(f"repair: tenant network {safe(network)}: VXLAN set up again")
        if repaired.nothing:
            out.print("repair: nothing to repair")
    checks = doc.run_checks(context)
    if as_json:
        listed = [c.as_dict() for c in checks]
        # `doctor --json` is the list of checks; with --repair, an object holding what was repaired and that list.
        emit_json(listed if repaired is None else {"repaired": repaired.as_json(), "checks": listed})
    else:
        for c in checks:
            mark = "[green]ok[/]  " if c.ok else "[red]FAIL[/]"
            out.print(f"{mark} {c.name:<14} {safe(c.detail)}"
                      + (f"\n       [dim]{safe(c.hint)}[/]" if c.hint and not c.ok else ""))
    if not all(c.ok for c in checks):
        raise typer.Exit(1)
