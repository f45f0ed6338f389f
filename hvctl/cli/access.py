"""hvctl agent, ssh, exec, cp, and tenants' keys."""

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from hvctl.cli.common import (
    JsonOpt,
    MaxBytesOpt,
    Table,
    app,
    ctx,
    emit_json,
    fail,
    key_app,
    out,
    safe,
)
from hvctl.limits import DEFAULT_MAX_DOWNLOAD_BYTES

# -- agent and tenant access ------------------------------------------------------------------------------------


@app.command()
def agent(
    name: str,
    method: Annotated[str, typer.Argument(help="ping, info or rotate-token")] = "ping",
    as_json: JsonOpt = False,
) -> None:
    """Talk to a VM's agent over its host-only virtio-serial channel; rotate-token gives it a new token."""
    from guest import rpc

    if method not in ("ping", "info", "rotate-token"):
        fail(f"unknown agent method {method!r}; use ping, info or rotate-token", 2)
    if method == "rotate-token":
        from hvctl.ops.keys import rotate_agent_token

        rotated = rotate_agent_token(ctx(), name)
        if as_json:
            emit_json(rotated.as_json())
        else:
            out.print(f"{name}: new agent token " + ("in use now and at the next boot" if rotated.live
                                                     else "takes effect at the next start"))
        return
    from hvctl.ops.run import agent_for

    client = agent_for(ctx(), ctx().ledger.vms.get(name))
    started = time.monotonic()
    result = client.call(method)
    rtt_ms = (time.monotonic() - started) * 1000
    data = result.model_dump(mode="json")
    if as_json:
        emit_json(data | ({"rtt_ms": round(rtt_ms, 2)} if method == "ping" else {}))
    elif isinstance(result, rpc.PingResult):
        out.print(f"pong from {name}: agent {safe(result.agent_version)}, up {result.uptime_s:.1f} s, "
                  f"rtt {rtt_ms:.1f} ms")
    else:
        table = Table.grid(padding=(0, 2))
        for key, value in data.items():
            table.add_row(f"[bold]{key}[/]", safe(", ".join(f"{k} {v}" for k, v in value.items())
                          if isinstance(value, dict) else ", ".join(value) if isinstance(value, list) else value))
        out.print(table)


IdentityOpt = Annotated[Path | None, typer.Option("--identity", "-i", help="SSH private key (default: the "
                                                     "operator key hvctl authorised on every VM).")]


DirectOpt = Annotated[bool, typer.Option("--direct", help="Connect to port 22 at the VM's production-network "
                                                            "address (--bridge/--network --ip), not the forward.")]


def identity_for(identity: Path | None) -> Path:
    from hvctl.seed import operator_key

    return identity or operator_key(ctx().paths.keys)


@app.command()
def ssh(name: str, identity: IdentityOpt = None, user: Annotated[str, typer.Option()] = "root",
        direct: DirectOpt = False,
        print_command: Annotated[bool, typer.Option(
            "--print", help="Print the OpenSSH command that reaches the VM the same way (through its host when it "
                            "is on another one), with its pinned host key, instead of connecting.")] = False,
        as_json: JsonOpt = False) -> None:
    """Open an interactive shell in a VM, verifying the host key hvctl generated for it."""
    from hvctl.access import interactive_shell, openssh_command, pin_line, route_for, write_pin

    record = ctx().ledger.vms.get(name)
    route = route_for(ctx(), record, direct)
    if print_command or as_json:
        known_hosts = ctx().paths.root / "known_hosts"
        write_pin(known_hosts, record)
        argv = openssh_command(record, route, identity_for(identity), user, known_hosts)
        if as_json:
            emit_json({"vm": name, "argv": argv, "known_hosts": str(known_hosts), "pin": pin_line(record),
                       "jump": list(route.jump)})
        else:
            import shlex

            print(shlex.join(argv))  # plain print: no wrapping or markup in a line meant to be pasted
        return
    code = interactive_shell(record, identity_for(identity), user, route)
    raise typer.Exit(code)


@app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def exec_cmd(
    name: str,
    command: Annotated[list[str], typer.Argument(help="The command, after --.")],
    identity: IdentityOpt = None,
    user: Annotated[str, typer.Option()] = "root",
    direct: DirectOpt = False,
    via: Annotated[str | None, typer.Option(
        "--via", help="ssh or agent. Default: ssh when the VM has an SSH path with the operator key, else its "
                      "agent (no guest network needed).")] = None,
    agent: Annotated[bool, typer.Option("--agent", help="Same as --via agent.")] = False,
    timeout: Annotated[float, typer.Option(help="With the agent: kill the command after this many seconds (exit "
                                                "124).", min=1, max=3600)] = 60.0,
    input_file: Annotated[Path | None, typer.Option(
        "--input", help="With the agent: a file ('-': standard input) given to the command as its input.")] = None,
) -> None:
    """Run a command in a VM, its exit code becoming hvctl's: over SSH, streaming its output, or through the
    agent's host-only channel (output returned when the command ends)."""
    import shlex

    from hvctl.access import route_for, run_command
    from hvctl.ops.wait import exec_over_agent, has_ssh_path

    if agent:
        if via not in (None, "agent"):
            fail("--agent and --via ssh contradict each other", 2)
        via = "agent"
    if via not in (None, "ssh", "agent"):
        fail(f"--via takes ssh or agent, not {via!r}", 2)
    record = ctx().ledger.vms.get(name)
    if via is None:
        via = "ssh" if direct or identity is not None or has_ssh_path(ctx(), record) else "agent"
    if via == "ssh":
        if input_file is not None:
            fail("--input goes with the agent; over SSH the command reads hvctl's own standard input", 2)
        code = run_command(record, identity_for(identity), shlex.join(command), sys.stdout.buffer, sys.stderr.buffer,
                           user, route_for(ctx(), record, direct))
        raise typer.Exit(code)
    if user != "root" or direct or identity is not None:
        fail("--user, --direct and --identity are SSH's; the agent runs commands as root", 2)
    try:
        data = b"" if input_file is None else sys.stdin.buffer.read() if str(input_file) == "-" \
            else input_file.read_bytes()
    except OSError as exc:
        fail(f"cannot read {input_file}: {exc.strerror}", 2)
    result = exec_over_agent(ctx(), record, command, timeout, data)
    sys.stdout.write(result.stdout)
    sys.stdout.flush()
    sys.stderr.write(result.stderr)
    if result.truncated:
        sys.stderr.write(f"hvctl: the output was cut to its last {rpc_cap()} bytes per stream (the agent's limit)\n")
    if result.timed_out:
        sys.stderr.write(f"hvctl: {command[0]} did not finish within {timeout:g} s; the agent killed it\n")
        raise typer.Exit(124)
    code = result.exit_code
    raise typer.Exit(code if code >= 0 else 128 - code)


def rpc_cap() -> int:
    from guest import rpc

    return rpc.MAX_OUTPUT_BYTES


@app.command()
def cp(
    source: Annotated[str, typer.Argument(help="LOCAL or NAME:PATH")],
    dest: Annotated[str, typer.Argument(help="NAME:PATH or LOCAL")],
    identity: IdentityOpt = None,
    direct: DirectOpt = False,
    max_bytes: MaxBytesOpt = DEFAULT_MAX_DOWNLOAD_BYTES,
    as_json: JsonOpt = False,
) -> None:
    """Copy a file into or out of a VM over SFTP. A copy out is refused past --max-bytes and lands as 0600."""
    from hvctl.access import copy, route_for

    def remote(spec: str) -> tuple[str, str] | None:
        head, sep, tail = spec.partition(":")
        return (head, tail) if sep and "/" not in head else None

    src, dst = remote(source), remote(dest)
    if (src is None) == (dst is None):
        fail("exactly one of SOURCE and DEST must be NAME:PATH", 2)
    vm, path = src or dst  # type: ignore[misc]
    upload = dst is not None
    record = ctx().ledger.vms.get(vm)
    copied = copy(record, identity_for(identity), source if upload else path, path if upload else dest, upload,
                  route=route_for(ctx(), record, direct), max_bytes=max_bytes)
    if as_json:
        emit_json({"vm": vm, "direction": "in" if upload else "out", "bytes": copied})
    else:
        out.print(f"copied {copied} bytes {'into' if upload else 'out of'} {vm}")


def _read_public_key(tenant: str, public_key_file: Path) -> str:
    from hvctl.names import check_name

    check_name(tenant, "tenant")
    try:
        line = public_key_file.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {public_key_file}: {getattr(exc, 'strerror', None) or exc}", 2)
    parts = line.split()
    if len(parts) < 2 or not parts[0].startswith(("ssh-", "ecdsa-")) or "\n" in line:
        fail(f"{public_key_file} is not an OpenSSH public key", 2)
    return line


@key_app.command("add")
def key_add(tenant: str, public_key_file: Path) -> None:
    """Authorise an SSH public key for a tenant's VMs created from now on."""
    added = ctx().ledger.keys.add(tenant, _read_public_key(tenant, public_key_file))
    out.print(f"key {'added for' if added else 'was already authorised for'} tenant {tenant}")


@key_app.command("rm")
def key_rm(tenant: str, public_key_file: Path, as_json: JsonOpt = False) -> None:
    """Revoke a tenant's key: from the ledger, from each of the tenant's VMs' seeds (their next boot), and from the
    running ones' authorized_keys through their agents. Exits 1 if some running VM could not be updated now."""
    from hvctl.cli.common import RichReporter
    from hvctl.ops.keys import remove_tenant_key

    line = _read_public_key(tenant, public_key_file)
    with RichReporter(f"key rm {tenant}") as reporter:
        result = remove_tenant_key(ctx(), tenant, line, reporter.step)
    if as_json:
        emit_json(result.as_json())
    else:
        out.print(f"key removed for tenant {tenant}")
        for vm in result.vms:
            where = "now and at its next boot" if vm.live else "at its next boot" if vm.seed else "nowhere"
            out.print(f"  {vm.vm}: revoked {where}" + (f" [red]({safe(vm.problem)})[/]" if vm.problem else ""))
    if any(vm.problem for vm in result.vms):
        raise typer.Exit(1)


@key_app.command("list")
def key_list(tenant: Annotated[str | None, typer.Argument()] = None, as_json: JsonOpt = False) -> None:
    """List tenants' authorised SSH keys."""
    keys = ctx().ledger.keys.all(tenant)
    if as_json:
        emit_json([{"tenant": t, "key": k} for t, k in keys])
        return
    table = Table("TENANT", "KEY")
    for t, k in keys:
        table.add_row(t, k if len(k) < 90 else k[:40] + "…" + k[-40:])
    out.print(table)
