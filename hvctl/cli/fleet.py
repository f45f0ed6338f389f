"""hvctl host, policy, plan and gpu."""

import os
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

from hvctl.cli.common import (
    JsonOpt,
    RichReporter,
    Table,
    app,
    ctx,
    emit_json,
    err,
    fail,
    gpu_app,
    host_app,
    out,
    policy_app,
    safe,
)

# -- hosts, policy, plan ---------------------------------------------------------------------------------------


@host_app.command("add")
def host_add(
    name: str,
    uri: str,
    underlay: Annotated[str | None, typer.Option(help="The host's own IPv4 address that other hosts reach: tenant "
                                                      "networks spanning hosts run VXLAN over it.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a host: capacity, NUMA cells and GPUs are read from its libvirt; the accelerator is probed."""
    from hvctl.ops.hosts import add_host

    with RichReporter(f"host add {name}") as reporter:
        reporter.step(f"connecting to {uri}")
        added = add_host(ctx(), name, uri, underlay)
    if as_json:
        emit_json(added.as_json())
    else:
        record, hardware, pool = added.view.record, added.view.hardware, added.pool
        out.print(f"host {name}: {record.cpus} CPUs, {record.memory_mib} MiB, {len(hardware.numa_cells)} NUMA "
                  f"cell(s), {len(hardware.gpus)} GPU(s), accelerator {record.accel}; storage pool {pool.name} "
                  f"at {pool.path} ({'made' if pool.made else 'adopted'}, "
                  f"{pool.available_bytes / 2**30:.1f} GiB free); libvirt {added.libvirt_version}, CPU "
                  f"{added.cpu_model or '?'}")
        for other, verdict in added.migration_from.items():
            out.print(f"  guests from {other} can migrate here: {verdict}" if not verdict.startswith("incompatible")
                      else f"  [yellow]guests from {other} cannot migrate here[/]: {verdict}")


@host_app.command("list")
def host_list(as_json: JsonOpt = False) -> None:
    """Hosts with capacity, what is allocated and what the policy allows."""
    from hvctl.ops.hosts import host_view

    c = ctx()
    c.capabilities()  # the host -c names: probed once, so that it is listed with its size
    views = [host_view(c, h.name) for h in c.ledger.hosts.all()]
    if as_json:
        emit_json([v.as_json() for v in views])
        return
    table = Table("HOST", "URI", "ON", "ACCEL", "VCPU used/alloc", "MEM MiB used/alloc", "GPUS", "VMS")
    for v in views:
        lim, used, r = v.allocatable, v.allocated, v.record
        table.add_row(r.name, r.uri, "yes" if r.enabled else "no", r.accel or "?",
                      f"{used.vcpus:g}/{lim['vcpus']:g}", f"{used.memory_mib:g}/{lim['memory_mib']:g}",
                      f"{used.gpus:g}/{lim['gpus']:g}", str(v.vms))
    out.print(table)


def _switch_host(name: str, enabled: bool, reason: str, as_json: bool) -> None:
    from hvctl.ops.hosts import set_enabled

    changed = set_enabled(ctx(), name, enabled, reason)
    what = "enabled" if enabled else "disabled"
    if as_json:
        emit_json({"host": name, "enabled": enabled, "changed": changed})
    else:
        out.print(f"host {name} {what if changed else 'was already ' + what}")


@host_app.command("disable")
def host_disable(name: str, reason: Annotated[str, typer.Option(help="Why, for the event log.")] = "",
                 as_json: JsonOpt = False) -> None:
    """Stop placing new VMs on a host (its VMs keep running); create --host and migrate --to refuse it."""
    _switch_host(name, False, reason, as_json)


@host_app.command("enable")
def host_enable(name: str, as_json: JsonOpt = False) -> None:
    """Let the scheduler place VMs on a host again."""
    _switch_host(name, True, "", as_json)


@host_app.command("evacuate")
def host_evacuate(name: str, as_json: JsonOpt = False) -> None:
    """Disable a host and move every VM off it to hosts the scheduler picks: running ones live, stopped ones
    offline, GPU ones by checkpoint migration, copying disks where the hosts share no storage. Exits 1 if any VM
    could not move, naming each with why."""
    from hvctl.ops.hosts import evacuate

    with RichReporter(f"evacuate {name}") as reporter:
        result = evacuate(ctx(), name, reporter.step)
    if as_json:
        emit_json(result.as_json())
    else:
        for vm, to, mode, total_s in result.moved:
            out.print(f"{vm} → {to} ({mode}, {total_s} s)")
        for vm, why in result.failed:
            out.print(f"[red]{safe(vm)} stays on {name}: {safe(why)}[/]")
        out.print(f"host {name} is disabled; {len(result.moved)} VM(s) moved, {len(result.failed)} could not be")
    if result.failed:
        raise typer.Exit(1)


@host_app.command("prepare")
def host_prepare(
    target: Annotated[str, typer.Argument(help="A registered host (its qemu+ssh URI says how to reach it), or "
                                               "[USER@]ADDRESS.")],
    identity: Annotated[Path | None, typer.Option("--identity", "-i", help="SSH private key.")] = None,
    known_hosts: Annotated[Path | None, typer.Option(help="known_hosts with the host's key (default: the URI's "
                                                          "known_hosts, else ~/.ssh/known_hosts).")] = None,
    port: Annotated[int | None, typer.Option(help="SSH port.")] = None,
    vfio: Annotated[bool, typer.Option("--vfio", help="Load vfio-pci now and at boot.")] = False,
    hugepages: Annotated[int | None, typer.Option(help="Reserve this many 2 MiB huge pages now and at boot.",
                                                  min=0)] = None,
    tls: Annotated[bool, typer.Option("--tls", help="Install a server certificate from hvctl's CA (made in the "
                                                    "state dir on first use) and have libvirtd listen for "
                                                    "qemu+tls.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would change; change nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Make a fresh Debian 12 machine a hypervisor host over SSH (fabric): packages, libvirtd, hvctl's storage pool
    directory, and with --vfio / --hugepages / --tls those. Idempotent: each step checks first and acts only if
    needed."""
    from urllib.parse import parse_qsl, urlsplit

    from hvctl.errors import NotFound
    from hvctl.ops.prepare import connect, prepare

    user, address, uri_port, query = "root", target, None, {}
    try:
        uri = ctx().ledger.hosts.get(target).uri
        parts = urlsplit(uri)
        if "ssh" not in parts.scheme:
            fail(f"host {target} is reached as {uri}, with no SSH for prepare to use; give its [USER@]ADDRESS", 2)
        user, address, uri_port = parts.username or "root", parts.hostname or "", parts.port
        query = dict(parse_qsl(parts.query))
    except NotFound:
        if "@" in target:
            user, address = target.split("@", 1)
    key = identity or (Path(query["keyfile"]) if "keyfile" in query else None)
    pins = known_hosts or (Path(query["known_hosts"]) if "known_hosts" in query else None)
    authority = None
    if tls:
        from hvctl.pki import Authority

        authority = Authority(ctx().paths.pki)
    with RichReporter(f"host prepare {target}") as reporter:
        done = prepare(connect(address, user, port or uri_port or 22, key, pins), vfio, hugepages, dry_run,
                       reporter.step, (authority, address) if authority else None)
    tls_uri = authority.tls_uri(address) if authority else None
    if as_json:
        emit_json({"host": target, "dry_run": dry_run, "steps": done} | ({"tls_uri": tls_uri} if tls_uri else {}))
        return
    for d in done:
        colour = {"ok": "green", "changed": "yellow"}.get(d["outcome"], "cyan")
        out.print(f"[{colour}]{d['outcome']:<12}[/] {d['step']}: {safe(d['detail'])}")
    if tls_uri and not dry_run:
        out.print(f"reach it over TLS: hvctl host add NAME '{tls_uri}'")


@host_app.command("rm")
def host_rm(name: str) -> None:
    """Forget a host that runs no VMs."""
    ctx().ledger.hosts.remove(name)
    out.print(f"host {name} removed")


@policy_app.command("check")
def policy_check(
    file: Annotated[Path | None, typer.Argument(help="Policy file (default: the one in effect).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Validate a policy file; every error is reported with its file, line and field."""
    from hvctl.policy import PolicyError, load_policy

    path = file or ctx().policy_source
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        if as_json:
            emit_json({"ok": False, "problems": exc.problems})
        else:
            for problem in exc.problems:
                err.print(problem, soft_wrap=True, markup=False, style="red")
        raise typer.Exit(2) from None
    if as_json:
        emit_json({"ok": True, "tenants": sorted(policy.tenants), "flavors": sorted(policy.flavors)})
    else:
        out.print(f"policy ok: {len(policy.tenants)} tenant(s), {len(policy.flavors)} flavor(s), "
                  f"placement {policy.placement.mode}")


@app.command()
def plan(requests: Path, as_json: JsonOpt = False) -> None:
    """Dry run: where each request would go, which are refused and why, and the resulting utilisation."""
    from hvctl.ops.plan import load_requests
    from hvctl.ops.plan import plan as make_plan

    c = ctx()
    specs = load_requests(c, requests)  # the file is checked before any host is asked
    c.capabilities()  # the host -c names: probed once, so that the plan counts it
    result = make_plan(c, specs)
    if as_json:
        emit_json(result.as_json())
        return
    table = Table("REQUEST", "TENANT", "VCPU", "MEM MiB", "HOST", "REFUSED BECAUSE")
    for r in result.requests:
        table.add_row(r.name, r.tenant, str(r.vcpus), str(r.memory_mib), r.decision.host or "-",
                      f"[red]{r.decision.reason}[/]" if r.decision.reason else "")
    out.print(table)
    hosts = Table("HOST", "VCPU", "MEM MiB", "GPUS")
    for h in result.hosts:
        u, lim = h.used, h.limit
        hosts.add_row(h.name, f"{u.vcpus:g}/{lim['vcpus']:g}", f"{u.memory_mib:g}/{lim['memory_mib']:g}",
                      f"{u.gpus:g}/{lim['gpus']:g}")
    out.print(hosts)
    tenants = Table("TENANT", "WEIGHT", "VCPU", "MEM MiB", "VMS")
    for t in result.tenants:
        u, q = t.used, t.quota
        tenants.add_row(t.name, f"{t.weight:g}", f"{u.vcpus:g}/{q.vcpus}", f"{u.memory_mib:g}/{q.memory_mib}",
                        f"{u.vms:g}/{q.vms}")
    out.print(tenants)


@gpu_app.command("release")
def gpu_release(
    address: str,
    host: Annotated[str | None, typer.Option("--host", help="The host the GPU is on (default: the one hvctl acts "
                                                             "on, `local` or -c's).")] = None,
    sysfs: Annotated[Path | None, typer.Option(help="This machine's sysfs root (tests point this at a fake "
                                                    "tree).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Give a GPU hvctl bound back to its host driver, when its VM is gone (a crash, a host reboot)."""
    from hvctl.ops.gpus import release_gpu

    done = release_gpu(ctx(), address, host, sysfs)
    if as_json:
        emit_json(done.as_json())
    else:
        out.print(f"{done.gpu}: {', '.join(done.released)} back on their host drivers")


@gpu_app.command("list")
def gpu_list(
    host: Annotated[list[str] | None, typer.Option("--host", help="Only this host (repeatable); default: every "
                                                                   "registered host.")] = None,
    sysfs: Annotated[Path | None, typer.Option(help="This machine's sysfs root (tests point this at a fake "
                                                    "tree).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """GPUs on every host of the fleet: address, model, IOMMU group, driver, NUMA node, owner VM, and whether
    passable. This machine's come from sysfs, other hosts' from their libvirt's node devices."""
    from hvctl.ops.gpus import list_fleet_gpus

    c = ctx()
    data = list_fleet_gpus(c, host, sysfs)
    if as_json:
        emit_json(data.as_json())
        return
    rows = [(name, g) for name, found in data.hosts.items() for g in found.gpus]
    if rows:
        table = Table("HOST", "ADDRESS", "MODEL", "GROUP", "DRIVER", "NUMA", "RESET", "OWNER", "PASSABLE")
        for name, g in rows:
            table.add_row(name, g.address, g.model, str(g.iommu_group), g.driver or "-", str(g.numa_node),
                          ",".join(g.reset_method) or "[yellow]none[/]", g.owner or "-",
                          "yes" if g.passable else f"[red]no: {safe(g.why_not)}[/]")
        out.print(table)
    else:
        out.print(f"no GPUs found on {'host ' + ', '.join(host) if host else 'any host'}")
    for name, found in data.hosts.items():
        for check in found.checks:
            if not check.ok:
                out.print(f"[yellow]host {name}: {check.name} unavailable[/]: {check.hint}")
    for name, why in data.unreachable.items():
        out.print(f"[red]host {name} unreachable[/]: {safe(why)}")


@app.command()
def metrics(
    textfile: Annotated[Path | None, typer.Option(
        "--textfile", help="Write the exposition to this file (atomically, for node_exporter's textfile "
                           "collector) instead of standard output.")] = None,
    listen: Annotated[str | None, typer.Option(
        "--listen", metavar="ADDRESS:PORT", help="Serve /metrics over HTTP here until interrupted, gathered "
                                                 "fresh at each scrape.")] = None,
) -> None:
    """Prometheus metrics for the fleet: per-VM CPU, memory, disk and network (libvirt's bulk domain stats),
    per-tenant quota use, per-host allocation and reservations, GPU ownership, migration totals and downtime."""
    from hvctl.context import Context
    from hvctl.ops import metrics as m

    c = ctx()

    def fresh() -> Context:
        return Context(state_dir=c.state_dir, uri=c.uri, policy_path=c.policy_path, ledger_url=c.ledger_url)

    if textfile is not None and listen is not None:
        fail("--textfile and --listen are two different ways out; pick one", 2)
    if listen is None:
        text = m.exposition(fresh)
        if textfile is None:
            sys.stdout.buffer.write(text)
            return
        partial = textfile.with_name(f".{textfile.name}.{os.getpid()}.tmp")
        try:
            partial.write_bytes(text)
            partial.chmod(0o644)
            partial.replace(textfile)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            fail(f"cannot write {textfile}: {exc.strerror}", 2)
        return
    address, _, port = listen.rpartition(":")
    if not address or not port.isdigit() or not 0 < int(port) < 65536:
        fail(f"--listen takes ADDRESS:PORT, e.g. 127.0.0.1:9177, not {listen!r}", 2)
    try:
        server = m.serve(fresh, address.strip("[]"), int(port))
    except OSError as exc:
        fail(f"cannot listen on {listen}: {exc.strerror}", 2)
    err.print(f"serving metrics on http://{listen}/metrics (Ctrl-C stops)")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()


@app.command("config")
def config_cmd(as_json: JsonOpt = False) -> None:
    """The global settings in effect and where each came from: a flag, its environment variable, a config file
    (/etc/hvctl/config.toml, then ~/.config/hvctl/config.toml; HVCTL_CONFIG names another), or the default."""
    from hvctl import config
    from hvctl.cli.common import State

    c = ctx()
    values = {"connect": c.uri, "state_dir": str(c.state_dir), "policy": str(c.policy_path or c.policy_source),
              "wait": c.lock_wait_s, "ledger": c.ledger_location}
    rows = [{"setting": k, "value": values[k], "from": State.option_sources.get(k, "default")}
            for k in config.SETTINGS]
    if as_json:
        emit_json({"settings": rows, "files": [str(p) for p in config.config_files()]})
        return
    table = Table("SETTING", "VALUE", "FROM")
    for row in rows:
        value = str(row["value"]) if row["value"] is not None else "(host local, qemu:///system on first use)"
        table.add_row(str(row["setting"]), safe(value), safe(row["from"]))
    out.print(table)
    out.print("config files, later overriding earlier: " + ", ".join(
        f"{p}{'' if p.exists() else ' (absent)'}" for p in config.config_files()))
