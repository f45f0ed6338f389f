"""The hvctl command line: parses arguments, renders tables and progress. The only module that prints or exits."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from hvctl import __version__
from hvctl.context import DEFAULT_URI, Context
from hvctl.errors import GuestTimeout, HostUnreachable, HvctlError
from hvctl.ops.inspect import Drift, VMView
from hvctl.paths import DEFAULT_STATE_DIR

app = typer.Typer(
    name="hvctl", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Provision and run model VMs on libvirt hosts: quotas, GPUs, an in-guest agent.",
)
image_app = typer.Typer(no_args_is_help=True, help="Build, list and remove guest images.")
app.add_typer(image_app, name="image")
key_app = typer.Typer(no_args_is_help=True, help="Tenants' SSH public keys.")
app.add_typer(key_app, name="key")
host_app = typer.Typer(no_args_is_help=True, help="Hypervisor hosts (libvirt URIs) and their capacity.")
app.add_typer(host_app, name="host")
policy_app = typer.Typer(no_args_is_help=True, help="Quotas, flavors, overcommit and placement policy.")
app.add_typer(policy_app, name="policy")
gpu_app = typer.Typer(no_args_is_help=True, help="GPUs for VFIO passthrough.")
app.add_typer(gpu_app, name="gpu")

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]


class State:
    debug = False
    ctx: Context | None = None


def ctx() -> Context:
    assert State.ctx is not None
    return State.ctx


@app.callback()
def main_options(
    connect: Annotated[str, typer.Option("--connect", "-c", envvar="HVCTL_CONNECT",
                                         help="libvirt URI of the host to act on.")] = DEFAULT_URI,
    state_dir: Annotated[Path, typer.Option("--state-dir", envvar="HVCTL_STATE_DIR",
                                            help="Where the ledger, images and VM disks live.")] = DEFAULT_STATE_DIR,
    policy: Annotated[Path | None, typer.Option("--policy", envvar="HVCTL_POLICY",
                                                help="Policy file (default: STATE_DIR/policy.yaml, else the "
                                                     "shipped policies/default.yaml).")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    State.debug = debug
    State.ctx = Context(state_dir=state_dir, uri=connect, policy_path=policy)


class RichReporter:
    """Shows each step with a spinner on stderr, so stdout stays clean for --json."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.status = err.status(title)
        self.started = time.monotonic()
        self.last: tuple[str, float] | None = None

    def step(self, message: str) -> None:
        now = time.monotonic()
        if self.last is not None:
            err.print(f"  [green]✓[/] {self.last[0]} [dim]({now - self.last[1]:.2f} s)[/]")
        self.last = (message, now)
        self.status.update(f"{self.title}: {message}")

    def __enter__(self) -> RichReporter:
        self.status.start()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.status.stop()
        if self.last is not None:
            mark = "[green]✓[/]" if exc is None else "[red]✗[/]"
            err.print(f"  {mark} {self.last[0]} [dim]({time.monotonic() - self.last[1]:.2f} s)[/]")


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


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
    memory: Annotated[int | None, typer.Option(help="Memory in MiB.")] = None,
    disk: Annotated[int | None, typer.Option(help="Overlay disk size in GiB.")] = None,
    gpus: Annotated[int | None, typer.Option(help="Whole GPUs to pass through.")] = None,
    image: Annotated[str, typer.Option(help="Image name (see `hvctl image list`).")] = "minimal",
    tenant: Annotated[str, typer.Option(help="Owning tenant.")] = "default",
    boot_timeout: Annotated[float, typer.Option(help="Seconds to wait for the guest to report ready.")] = 120.0,
    ssh_bind: Annotated[str, typer.Option(help="Host address the VM's SSH forward listens on.")] = "127.0.0.1",
    as_json: JsonOpt = False,
) -> None:
    """Create a VM: overlay disk, domain, start, and wait until the guest itself reports it is up."""
    from hvctl.ops.create import create as create_vm
    from hvctl.spec import VMSpec

    sizes: dict[str, Any] = {"vcpus": 1, "memory_mib": 256, "disk_gib": 1, "gpus": {"count": 0}}
    if flavor is not None:
        f = ctx().policy.flavor(flavor)
        sizes = {"vcpus": f.vcpus, "memory_mib": f.memory_mib, "disk_gib": f.disk_gib, "gpus": {"count": f.gpus}}
    explicit = {"vcpus": vcpus, "memory_mib": memory, "disk_gib": disk,
                "gpus": {"count": gpus} if gpus is not None else None}
    sizes |= {k: v for k, v in explicit.items() if v is not None}
    spec = VMSpec.parse(name=name, image=image, tenant=tenant, host=host, ssh_bind=ssh_bind, cpu_limit=cpu_limit,
                        io_weight=io_weight, anti_affinity=anti_affinity, **sizes)
    started = time.monotonic()
    with RichReporter(f"create {name}") as reporter:
        record = create_vm(ctx(), spec, reporter, boot_timeout=boot_timeout)
    elapsed = time.monotonic() - started
    if as_json:
        emit_json(record.as_dict() | {"create_seconds": round(elapsed, 3)})
    else:
        out.print(f"[bold]{name}[/] is up on {record.host} in {elapsed:.1f} s "
                  f"(ssh forward {spec.ssh_bind}:{record.ssh_port})")


@app.command("list")
def list_cmd(as_json: JsonOpt = False) -> None:
    """List VMs with the ledger's state, libvirt's state, and any disagreement between them."""
    from hvctl.ops.inspect import list_vms

    views, orphans, unreachable = list_vms(ctx())
    if as_json:
        emit_json({"vms": [v.as_dict() for v in views], "orphans": [o.as_dict() for o in orphans],
                   "unreachable_hosts": [u.as_dict() for u in unreachable]})
    else:
        print_vm_table(views, orphans)
    if unreachable:
        # Show what the ledger knows, but a listing that could not ask every host must not look like success.
        fail("; ".join(f"host {u.host}: {u.problem}" for u in unreachable), HostUnreachable.exit_code)


def print_vm_table(views: list[VMView], orphans: list[Drift]) -> None:
    table = Table("NAME", "TENANT", "HOST", "STATE", "LIBVIRT", "VCPU", "MEM MiB", "SSH", "DRIFT")
    for v in views:
        r = v.record
        table.add_row(r.name, r.tenant, r.host, r.state, v.actual.value if v.actual else "?", str(r.spec.vcpus),
                      str(r.spec.memory_mib), str(r.ssh_port), f"[red]{v.drift}[/]" if v.drift else "")
    for o in orphans:
        table.add_row(o.vm, "?", o.host, "-", "?", "", "", "", f"[red]{o.problem}[/]")
    out.print(table)


@app.command()
def show(name: str, as_json: JsonOpt = False) -> None:
    """Everything hvctl knows about one VM, with its recent events."""
    from hvctl.ops.inspect import describe_drift, enforcement_report

    c = ctx()
    record = c.ledger.get_vm(name)
    host = c.host(record.host)
    actual = host.state(name)
    data = record.as_dict() | {"actual": actual.value, "drift": describe_drift(record, actual)}
    data["events"] = [{"ts": e.ts, "kind": e.kind, "message": e.message} for e in c.ledger.events(name, 20)]
    data["enforcement"] = enforcement_report(c, record)
    data["last_migration"] = c.ledger.last_event_data(name, "migration.completed")
    if as_json:
        emit_json(data)
        return
    table = Table.grid(padding=(0, 2))
    for key in ("name", "tenant", "host", "state", "actual", "drift", "image", "vcpus", "memory_mib", "disk_gib",
                "ssh_port", "overlay", "console_log", "agent_socket"):
        value = data[key]
        table.add_row(f"[bold]{key}[/]", f"[red]{value}[/]" if key == "drift" and value else str(value))
    out.print(table)
    enforcement = data["enforcement"]
    if enforcement and "enforced" in enforcement:
        cfg, got = enforcement["configured"], enforcement["enforced"]
        quota = f"{cfg['global_quota_us']}/{cfg['global_period_us']}" if cfg["global_quota_us"] else "none"
        out.print(f"[bold]enforcement[/] (cgroup v{got['version']}, QEMU pid {enforcement['pid']}): "
                  f"CPU quota configured {quota}, enforced {got['cpu_quota_us'] or 'none'}/{got['cpu_period_us']}; "
                  f"memory hard limit configured {cfg['memory_hard_limit_kib'] or 'none'} KiB, "
                  f"enforced {got['memory_limit_bytes'] or 'none'} bytes")
        for problem in enforcement["mismatches"]:
            out.print(f"  [red]mismatch: {problem}[/]")
    if data["last_migration"]:
        m = data["last_migration"]
        out.print(f"[bold]last migration[/]: {m['total_s']} s total, downtime {m['downtime_ms']} ms, "
                  f"{(m['bytes'] or 0) / 2**20:.1f} MiB, mode {m['mode']}")
    out.print("[bold]events[/]")
    for e in data["events"]:
        out.print(f"  {time.strftime('%H:%M:%S', time.localtime(e['ts']))} {e['kind']:<18} {e['message']}")


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
def destroy(name: str, as_json: JsonOpt = False) -> None:
    """Remove a VM entirely: domain, overlay disk, console log and ledger entry."""
    from hvctl.ops.lifecycle import destroy as destroy_vm

    with RichReporter(f"destroy {name}") as reporter:
        destroy_vm(ctx(), name, reporter)
    if as_json:
        emit_json({"name": name, "destroyed": True})
    else:
        out.print(f"{name} destroyed")


@app.command("console-log")
def console_log(
    name: str,
    lines: Annotated[int, typer.Option("--lines", "-n", help="Only the last N lines (0: all).")] = 0,
) -> None:
    """Print the guest's serial console output."""
    from hvctl.console import read_console

    text = read_console(ctx().ledger.get_vm(name).console_log)
    if lines:
        text = "\n".join(text.splitlines()[-lines:])
    sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")


@app.command()
def doctor(as_json: JsonOpt = False) -> None:
    """Check libvirtd, the accelerator, images, the state dir, and drift between the ledger and libvirt."""
    from hvctl.doctor import run_checks

    checks = run_checks(ctx())
    if as_json:
        emit_json([c.as_dict() for c in checks])
    else:
        for c in checks:
            mark = "[green]ok[/]  " if c.ok else "[red]FAIL[/]"
            out.print(f"{mark} {c.name:<14} {c.detail}" + (f"\n       [dim]{c.hint}[/]" if c.hint and not c.ok else ""))
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


# -- agent and tenant access ------------------------------------------------------------------------------------


@app.command()
def agent(
    name: str,
    method: Annotated[str, typer.Argument(help="ping or info")] = "ping",
    as_json: JsonOpt = False,
) -> None:
    """Talk to a VM's agent over its host-only virtio-serial channel."""
    from guest import rpc
    from hvctl.agent_client import AgentClient

    if method not in ("ping", "info"):
        fail(f"unknown agent method {method!r}; use ping or info", 2)
    record = ctx().ledger.get_vm(name)
    if not record.agent_token:
        fail(f"VM {name} has no agent (its image was built without one)", 2)
    started = time.monotonic()
    result = AgentClient(record.agent_socket, record.agent_token).call(method)
    rtt_ms = (time.monotonic() - started) * 1000
    data = result.model_dump(mode="json")
    if as_json:
        emit_json(data | ({"rtt_ms": round(rtt_ms, 2)} if method == "ping" else {}))
    elif isinstance(result, rpc.PingResult):
        out.print(f"pong from {name}: agent {result.agent_version}, up {result.uptime_s:.1f} s, rtt {rtt_ms:.1f} ms")
    else:
        table = Table.grid(padding=(0, 2))
        for key, value in data.items():
            table.add_row(f"[bold]{key}[/]", ", ".join(f"{k} {v}" for k, v in value.items())
                          if isinstance(value, dict) else ", ".join(value) if isinstance(value, list) else str(value))
        out.print(table)


IdentityOpt = Annotated[Path | None, typer.Option("--identity", "-i", help="SSH private key (default: the "
                                                     "operator key hvctl authorised on every VM).")]


def identity_for(identity: Path | None) -> Path:
    from hvctl.seed import operator_key

    return identity or operator_key(ctx().paths.keys)


@app.command()
def ssh(name: str, identity: IdentityOpt = None, user: Annotated[str, typer.Option()] = "root") -> None:
    """Open an interactive shell in a VM, verifying the host key hvctl generated for it."""
    from hvctl.access import interactive_shell

    code = interactive_shell(ctx().ledger.get_vm(name), identity_for(identity), user)
    raise typer.Exit(code)


@app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def exec_cmd(
    name: str,
    command: Annotated[list[str], typer.Argument(help="The command, after --.")],
    identity: IdentityOpt = None,
    user: Annotated[str, typer.Option()] = "root",
) -> None:
    """Run a command in a VM over SSH, streaming its output; its exit code becomes hvctl's."""
    import shlex

    from hvctl.access import run_command

    code = run_command(ctx().ledger.get_vm(name), identity_for(identity), shlex.join(command),
                       sys.stdout.buffer, sys.stderr.buffer, user)
    raise typer.Exit(code)


@app.command()
def cp(
    source: Annotated[str, typer.Argument(help="LOCAL or NAME:PATH")],
    dest: Annotated[str, typer.Argument(help="NAME:PATH or LOCAL")],
    identity: IdentityOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Copy a file into or out of a VM over SFTP."""
    from hvctl.access import copy

    def remote(spec: str) -> tuple[str, str] | None:
        head, sep, tail = spec.partition(":")
        return (head, tail) if sep and "/" not in head else None

    src, dst = remote(source), remote(dest)
    if (src is None) == (dst is None):
        fail("exactly one of SOURCE and DEST must be NAME:PATH", 2)
    vm, path = src or dst  # type: ignore[misc]
    upload = dst is not None
    copied = copy(ctx().ledger.get_vm(vm), identity_for(identity), source if upload else path,
                  path if upload else dest, upload)
    if as_json:
        emit_json({"vm": vm, "direction": "in" if upload else "out", "bytes": copied})
    else:
        out.print(f"copied {copied} bytes {'into' if upload else 'out of'} {vm}")


@key_app.command("add")
def key_add(tenant: str, public_key_file: Path) -> None:
    """Authorise an SSH public key for a tenant's VMs created from now on."""
    from hvctl.spec import check_name

    check_name(tenant, "tenant")
    try:
        line = public_key_file.read_text().strip()
    except OSError as exc:
        fail(f"cannot read {public_key_file}: {exc.strerror}", 2)
    parts = line.split()
    if len(parts) < 2 or not parts[0].startswith(("ssh-", "ecdsa-")) or "\n" in line:
        fail(f"{public_key_file} is not an OpenSSH public key", 2)
    added = ctx().ledger.add_tenant_key(tenant, line)
    out.print(f"key {'added for' if added else 'was already authorised for'} tenant {tenant}")


@key_app.command("list")
def key_list(tenant: Annotated[str | None, typer.Argument()] = None, as_json: JsonOpt = False) -> None:
    """List tenants' authorised SSH keys."""
    keys = ctx().ledger.tenant_keys(tenant)
    if as_json:
        emit_json([{"tenant": t, "key": k} for t, k in keys])
        return
    table = Table("TENANT", "KEY")
    for t, k in keys:
        table.add_row(t, k if len(k) < 90 else k[:40] + "…" + k[-40:])
    out.print(table)


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
    timeout: Annotated[float | None, typer.Option(help="Seconds before --timeout-action applies.")] = None,
    timeout_action: Annotated[str, typer.Option(help="abort or postcopy.")] = "abort",
    cancel: Annotated[bool, typer.Option("--cancel", help="Cancel this VM's migration in progress.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Move a running VM to another host; prechecks and the target's reservation come before anything moves."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    from hvctl.ops.migrate import MigrateOptions
    from hvctl.ops.migrate import migrate as do_migrate

    c = ctx()
    if cancel:
        record = c.ledger.get_vm(name)
        c.host(record.host).abort_job(name)
        out.print(f"cancelled the migration of {name}; it stays on {record.host}")
        return
    if to is None:
        fail("--to HOST is required", 2)
    if mode not in ("live", "postcopy", "offline", "checkpoint") or timeout_action not in ("abort", "postcopy"):
        fail("--mode must be live, postcopy, offline or checkpoint; --timeout-action abort or postcopy", 2)
    opts = MigrateOptions(mode=mode, max_downtime_ms=max_downtime, bandwidth_mib_s=bandwidth,  # type: ignore[arg-type]
                          auto_converge=auto_converge, copy_storage=copy_storage, timeout_s=timeout,
                          timeout_action=timeout_action)  # type: ignore[arg-type]
    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                        TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=err, transient=True)
    task = progress.add_task(f"migrate {name} → {to}", total=None, detail="prechecks")

    def on_progress(stats: dict[str, Any]) -> None:
        done, left = int(stats.get("data_processed", 0)), int(stats.get("data_remaining", 0))
        rate = float(stats.get("memory_dirty_rate", 0)) * float(stats.get("memory_page_size", 4096))
        detail = (f"iter {stats.get('memory_iteration', 0)}, dirty {rate / 2**20:.1f} MiB/s, "
                  f"expected downtime {stats.get('downtime', '?')} ms")
        progress.update(task, completed=done, total=done + left or None, detail=detail)

    with progress:
        stats = do_migrate(c, name, to, opts, on_progress)
    if as_json:
        emit_json({"name": name, "host": to} | stats)
    else:
        out.print(f"{name} is on {to}: {stats['total_s']:.2f} s total, downtime {stats['downtime_ms']} ms, "
                  f"{(stats['bytes'] or 0) / 2**20:.1f} MiB transferred")


# -- workloads ------------------------------------------------------------------------------------------------


@app.command()
def run(
    name: str,
    kind: Annotated[str, typer.Argument(help="llm, perception or train")],
    prompt: Annotated[list[str] | None, typer.Option(help="llm: a prompt (repeat for a batch).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="llm: tokens to generate.")] = 16,
    stream: Annotated[bool, typer.Option(help="llm: print tokens as they are generated.")] = False,
    temperature: Annotated[float | None, typer.Option(help="llm: sample at this temperature.")] = None,
    top_p: Annotated[float | None, typer.Option(help="llm: nucleus sampling.")] = None,
    seed: Annotated[int | None, typer.Option(help="llm: sampling seed.")] = None,
    text: Annotated[str | None, typer.Option(help="perception: caption.")] = None,
    image: Annotated[Path | None, typer.Option(help="perception: PNG or .npy image.")] = None,
    audio: Annotated[Path | None, typer.Option(help="perception: WAV or .npy audio.")] = None,
    objective: Annotated[str, typer.Option(help="train: ssl, rl or seed-rl.")] = "ssl",
    steps: Annotated[int, typer.Option(help="train: steps to run (resumes from the latest checkpoint).")] = 10,
    checkpoint_every: Annotated[int, typer.Option(help="train: checkpoint every K steps.")] = 5,
    timeout: Annotated[float | None, typer.Option(help="Cancel the workload after this many seconds.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run a model workload inside a VM through its agent, following its output."""
    from hvctl.ops import run as ops

    c = ctx()
    record = c.ledger.get_vm(name)
    if kind == "llm":
        args = ops.llm_args(prompt or [], max_new_tokens, stream, temperature, top_p, seed, None)
    elif kind == "perception":
        args = ops.perception_args(c, record, text, image, audio)
    elif kind == "train":
        if objective not in ("ssl", "rl", "seed-rl"):
            fail(f"unknown objective {objective!r}; use ssl, rl or seed-rl", 2)
        args = ops.train_args(objective, steps, checkpoint_every)
    else:
        fail(f"unknown workload {kind!r}; use llm, perception or train", 2)

    started = time.monotonic()
    status_line = err.status(f"{kind} in {name}: starting")
    status_line.start()

    def on_output(chunk: str) -> None:
        if stream and kind == "llm" and not as_json:
            status_line.stop()
            sys.stdout.write("".join(ops.stream_text(chunk)))
            sys.stdout.flush()
        else:
            last = [line for line in chunk.splitlines() if line.strip() and not line.startswith("{")]
            if last:
                status_line.update(f"{kind} in {name} ({time.monotonic() - started:.0f} s): {last[-1][:100]}")
            else:
                status_line.update(f"{kind} in {name}: running ({time.monotonic() - started:.0f} s)")

    try:
        result = ops.run_workload(record, kind, args, on_output, timeout=timeout)
    finally:
        status_line.stop()
    c.ledger.log_event(name, record.host, "workload.finished", f"{kind} {result.id} {result.state}",
                       {"id": result.id, "kind": kind})
    if stream and kind == "llm" and not as_json:
        sys.stdout.write("\n")
    if as_json:
        emit_json(result.model_dump(mode="json"))
    elif result.state == "succeeded":
        out.print(describe_result(kind, result.result or {}, time.monotonic() - started))
    if result.state != "succeeded":
        fail(f"workload {result.id} in {name} {result.state}: {result.error}", ops.WorkloadFailed.exit_code)


def describe_result(kind: str, r: dict[str, Any], wall: float) -> str:
    if kind == "llm":
        texts = "\n".join(f"  [{i}] {c['text']!r}" for i, c in enumerate(r.get("completions", [])))
        return (f"{texts}\n{r.get('backend')} on {r.get('device')}: ttft {r.get('ttft_s', 0) * 1000:.0f} ms, "
                f"decode {r.get('decode_tokens_per_s', 0):.1f} tok/s, prompt {r.get('prompt_tokens_per_s', 0):.1f} "
                f"tok/s (wall {wall:.1f} s, including Python start-up in the guest)")
    if kind == "perception":
        probs = ", ".join(f"{k} {v:.2f}" for k, v in (r.get("probabilities") or {}).items())
        return f"label {r.get('label')} ({probs}) in {wall:.1f} s"
    losses = r.get("losses") or []
    return (f"{r.get('objective')}: steps {r.get('start_step', 0) + 1}..{r.get('final_step')}, "
            f"loss {losses[0] if losses else float('nan'):.4f} -> {losses[-1] if losses else float('nan'):.4f}, "
            f"{r.get('steps_per_s', 0):.2f} steps/s, {len(r.get('checkpoints') or [])} checkpoint(s)")


@app.command()
def logs(
    name: str,
    workload: Annotated[str | None, typer.Option("--id", help="Workload id (default: the latest).")] = None,
) -> None:
    """Print the output of a VM's workload."""
    from guest import rpc
    from hvctl.ops.run import agent_for

    c = ctx()
    record = c.ledger.get_vm(name)
    if workload is None:
        started = [e for e in c.ledger.events(name, 200) if e.kind == "workload.finished"]
        if not started:
            fail(f"{name} has run no workload through hvctl", 3)
        workload = started[-1].message.split()[1]
    client = agent_for(record)
    offset = 0
    while True:
        chunk = client.typed("workload.logs", rpc.WorkloadLogs, rpc.WorkloadLogsParams(id=workload, offset=offset))
        sys.stdout.write(chunk.data)
        offset = chunk.next_offset
        if chunk.eof or not chunk.data:
            break


@app.command()
def checkpoint(
    name: str,
    objective: Annotated[str, typer.Option(help="Which training run: ssl, rl or seed-rl.")] = "ssl",
    out_dir: Annotated[Path | None, typer.Option("--out", help="Where to put it (default: STATE/checkpoints/NAME).")]
    = None,
    as_json: JsonOpt = False,
) -> None:
    """Copy a VM's latest training checkpoint (written at a step boundary) to the host."""
    from hvctl.ops.run import fetch_checkpoint

    c = ctx()
    local = fetch_checkpoint(c, c.ledger.get_vm(name), objective, out_dir or c.paths.root / "checkpoints" / name)
    if as_json:
        emit_json({"vm": name, "objective": objective, "checkpoint": str(local), "bytes": local.stat().st_size})
    else:
        out.print(f"checkpoint of {name} ({objective}) saved to {local}")


@app.command()
def restore(
    name: str,
    ckpt: Path,
    objective: Annotated[str, typer.Option(help="Which training run: ssl, rl or seed-rl.")] = "ssl",
) -> None:
    """Put a checkpoint into a VM; its next `hvctl run NAME train` resumes from it."""
    from hvctl.ops.run import push_checkpoint

    c = ctx()
    remote = push_checkpoint(c, c.ledger.get_vm(name), objective, ckpt)
    out.print(f"{ckpt.name} restored into {name} at {remote}; the next train run resumes from it")


# -- hosts, policy, plan ---------------------------------------------------------------------------------------


@host_app.command("add")
def host_add(name: str, uri: str, as_json: JsonOpt = False) -> None:
    """Register a host: capacity, NUMA cells and GPUs are read from its libvirt; the accelerator is probed."""
    from hvctl.ops.hosts import add_host

    with RichReporter(f"host add {name}") as reporter:
        reporter.step(f"connecting to {uri}")
        view = add_host(ctx(), name, uri)
    if as_json:
        emit_json(view)
    else:
        out.print(f"host {name}: {view['cpus']} CPUs, {view['memory_mib']} MiB, {len(view['numa_cells'])} NUMA "
                  f"cell(s), {len(view['gpus'])} GPU(s), accelerator {view['accel']}")


@host_app.command("list")
def host_list(as_json: JsonOpt = False) -> None:
    """Hosts with capacity, what is allocated and what the policy allows."""
    from hvctl.ops.hosts import host_view

    c = ctx()
    c.capabilities(c.host_name)
    views = [host_view(c, h.name) for h in c.ledger.list_hosts()]
    if as_json:
        emit_json(views)
        return
    table = Table("HOST", "URI", "ON", "ACCEL", "VCPU used/alloc", "MEM MiB used/alloc", "GPUS", "VMS")
    for v in views:
        lim, used = v["allocatable"], v["allocated"]
        table.add_row(v["name"], v["uri"], "yes" if v["enabled"] else "no", v["accel"] or "?",
                      f"{used['vcpus']:g}/{lim['vcpus']:g}", f"{used['memory_mib']:g}/{lim['memory_mib']:g}",
                      f"{used['gpus']:g}/{lim['gpus']:g}", str(v["vms"]))
    out.print(table)


@host_app.command("rm")
def host_rm(name: str) -> None:
    """Forget a host that runs no VMs."""
    ctx().ledger.remove_host(name)
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
    c.capabilities(c.host_name)
    result = make_plan(c, load_requests(c, requests))
    if as_json:
        emit_json(result)
        return
    table = Table("REQUEST", "TENANT", "VCPU", "MEM MiB", "HOST", "REFUSED BECAUSE")
    for r in result["requests"]:
        table.add_row(r["name"], r["tenant"], str(r["vcpus"]), str(r["memory_mib"]), r["host"] or "-",
                      f"[red]{r['reason']}[/]" if r["reason"] else "")
    out.print(table)
    hosts = Table("HOST", "VCPU", "MEM MiB", "GPUS")
    for h in result["hosts"]:
        u, lim = h["used"], h["limit"]
        hosts.add_row(h["name"], f"{u['vcpus']:g}/{lim['vcpus']:g}", f"{u['memory_mib']:g}/{lim['memory_mib']:g}",
                      f"{u['gpus']:g}/{lim['gpus']:g}")
    out.print(hosts)
    tenants = Table("TENANT", "WEIGHT", "VCPU", "MEM MiB", "VMS")
    for t in result["tenants"]:
        u, q = t["used"], t["quota"]
        tenants.add_row(t["name"], f"{t['weight']:g}", f"{u['vcpus']:g}/{q['vcpus']}",
                        f"{u['memory_mib']:g}/{q['memory_mib']}", f"{u['vms']:g}/{q['vms']}")
    out.print(tenants)


@gpu_app.command("list")
def gpu_list(
    sysfs: Annotated[Path, typer.Option(help="sysfs root (tests point this at a fake tree).")] = Path("/sys"),
    as_json: JsonOpt = False,
) -> None:
    """GPUs on this host: address, ids, IOMMU group, driver, NUMA node, owner VM, and whether passable."""
    from hvctl.ops.gpus import list_gpus

    data = list_gpus(sysfs)
    if as_json:
        emit_json(data)
        return
    if data["gpus"]:
        table = Table("ADDRESS", "IDS", "GROUP", "DRIVER", "NUMA", "OWNER", "PASSABLE")
        for g in data["gpus"]:
            table.add_row(g["address"], g["ids"], str(g["iommu_group"]), g["driver"] or "-", str(g["numa_node"]),
                          g["owner"] or "-", "yes" if g["passable"] else f"[red]no: {g['why_not']}[/]")
        out.print(table)
    else:
        out.print("no GPUs found on this host")
    for check in data["host"]:
        if not check["ok"]:
            out.print(f"[yellow]{check['name']} unavailable[/]: {check['hint']}")


# -- images ---------------------------------------------------------------------------------------------------


@image_app.command("build")
def image_build(
    recipe: Annotated[str, typer.Argument(help="Shipped recipe name or path to a recipe .toml.")] = "minimal",
    force: Annotated[bool, typer.Option(help="Rebuild even if an identical build is cached.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Build a guest image from a recipe; an unchanged recipe is served from the cache."""
    started = time.monotonic()
    with RichReporter(f"image build {recipe}") as reporter:
        image = ctx().images.build(recipe, reporter.step, force=force)
    if as_json:
        emit_json(json.loads(image.model_dump_json()))
    else:
        out.print(f"image {image.name}@{image.content_hash} ready in {time.monotonic() - started:.1f} s "
                  f"(kernel {image.kernel_version}, {image.size_bytes / 2**20:.1f} MiB)")


@image_app.command("list")
def image_list(as_json: JsonOpt = False) -> None:
    """List built images."""
    images = ctx().images.list()
    if as_json:
        emit_json([json.loads(i.model_dump_json()) for i in images])
        return
    table = Table("NAME", "HASH", "KIND", "KERNEL", "SIZE MiB", "BUILT")
    for i in images:
        table.add_row(i.name, i.content_hash, i.kind.value, i.kernel_version, f"{i.size_bytes / 2**20:.1f}",
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(i.built_at)))
    out.print(table)


@image_app.command("rm")
def image_rm(name: str, as_json: JsonOpt = False) -> None:
    """Remove every build of an image, unless a VM still uses it."""
    c = ctx()
    in_use = {r.base_disk for r in c.ledger.list_vms()}
    removed = c.images.remove(name, in_use)
    if as_json:
        emit_json({"removed": [f"{i.name}@{i.content_hash}" for i in removed]})
    else:
        out.print(f"removed {len(removed)} build(s) of {name}")


# -- entry point ----------------------------------------------------------------------------------------------


def fail(message: str, code: int, hint: str | None = None, detail: str = "") -> NoReturn:
    err.print(f"[red]hvctl: error:[/] {message}" + (f" [dim](hint: {hint})[/]" if hint else ""), soft_wrap=True)
    if detail:
        err.print(detail, markup=False, soft_wrap=True)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    try:
        try:
            # Standalone mode: typer reports usage errors (unknown option, missing argument) itself, exit code 2.
            app(args=argv, prog_name="hvctl")
        finally:
            if State.ctx is not None:
                State.ctx.close()
    except GuestTimeout as exc:
        if State.debug:
            raise
        tail = "\n".join("  | " + line for line in exc.console_tail.splitlines())
        fail(exc.message, exc.exit_code, exc.hint, f"last console lines:\n{tail}" if tail else "")
    except HvctlError as exc:
        if State.debug:
            raise
        fail(exc.message, exc.exit_code, exc.hint)
    except KeyboardInterrupt:
        fail("interrupted", 130)


def version_string() -> str:
    return f"hvctl {__version__}"


if __name__ == "__main__":
    os.environ.setdefault("COLUMNS", "120")
    main()
