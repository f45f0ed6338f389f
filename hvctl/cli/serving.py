"""hvctl serve NAME start|status|reload|unload|stop|forward, and hvctl generate."""

import shlex
import time
from datetime import datetime
from typing import TYPE_CHECKING, Annotated

import typer

from hvctl.cli.access import IdentityOpt, identity_for
from hvctl.cli.common import JsonOpt, Table, app, ctx, emit_json, err, out, safe

if TYPE_CHECKING:
    from rich.status import Status

    from guest import rpc

serve_app = typer.Typer(no_args_is_help=True, help="The resident model server inside a VM: an OpenAI-compatible API "
                                                   "with continuous batching, reached by tenants over SSH.")
app.add_typer(serve_app, name="serve")

ModelOpt = Annotated[str, typer.Option("--model", help="A model directory in the guest (absolute), or the name of "
                                                       "a model in the image, such as tiny-llm.")]
WaitOpt = Annotated[float, typer.Option("--wait", min=1, help="Seconds to wait for the model to be ready.")]


class Vm:
    name = ""


@serve_app.callback()
def serve(name: Annotated[str, typer.Argument(help="The VM.")]) -> None:
    """Start, reload and stop the model server in VM NAME: `hvctl serve NAME start --model DIR`."""
    Vm.name = name


def _progress(what: str) -> "Status":
    line = err.status(what)
    line.start()
    return line


def _print_status(now: "rpc.ServeStatus") -> None:
    if now.state == "stopped":
        out.print(f"{Vm.name}: no model server running")
        return
    head = f"{Vm.name}: model server {now.state}"
    if now.pid:
        head += f", pid {now.pid}, port {now.port} in the guest, at most {now.max_seqs} sequences"
    out.print(head + f"; guest memory {now.memory_available_mib} MiB available of {now.memory_total_mib} MiB")
    if now.error:
        out.print(f"  exited: {safe(now.error)}")
    if now.models:
        table = Table(box=None)
        for column in ("MODEL", "STATE", "VERSION", "MEMORY", "CONTEXT", "IN FLIGHT", "LOADED", "DIRECTORY"):
            table.add_column(column)
        for m in now.models:
            state = m.state + (f" (reloading from {m.pending})" if m.pending else "")
            loaded = datetime.fromtimestamp(m.loaded_at).strftime("%H:%M:%S") if m.loaded_at else "-"
            table.add_row(m.name, safe(state), str(m.version), f"{m.footprint_mib} MiB", str(m.context or "-"),
                          str(m.in_flight), loaded, safe(m.dir))
        out.print(table)
        for m in now.models:
            if m.error:
                out.print(f"  {m.name}: {safe(m.error)}")


@serve_app.command("start")
def serve_start(
    model: ModelOpt,
    name: Annotated[str | None, typer.Option("--name", help="The model's name in the API (default: the "
                                                            "directory's name).")] = None,
    backend: Annotated[str, typer.Option(help="cb: transformers' continuous batching.")] = "cb",
    max_seqs: Annotated[int, typer.Option(min=1, max=1024, help="Sequences served at once; more are refused "
                                                                "with 429.")] = 16,
    max_tokens: Annotated[int | None, typer.Option(min=2, help="Tokens per sequence, prompt and completion "
                                                               "(default: the model's context).")] = None,
    port: Annotated[int, typer.Option(min=1, max=65535, help="The API's port on the guest's loopback.")] = 8000,
    local_port: Annotated[int | None, typer.Option(help="The local port in the printed ssh -L line (default: "
                                                        "--port).")] = None,
    identity: IdentityOpt = None,
    wait: WaitOpt = 1800,
    as_json: JsonOpt = False,
) -> None:
    """Start the model server with a model, or load another model into the one running."""
    from hvctl.ops import serve as ops

    wanted = ops.served(model, name)  # a bad model is refused before anything else is asked
    c = ctx()
    record = c.ledger.vms.get(Vm.name)
    started = time.monotonic()
    line = _progress(f"{Vm.name}: asking the agent to serve {wanted.name}")
    try:
        now = ops.start(c, record, [wanted], port=port, max_seqs=max_seqs, max_tokens=max_tokens, backend=backend,
                        wait_s=wait, say=lambda s: line.update(f"{Vm.name}: {s}"))
    finally:
        line.stop()
    assert now.port is not None
    forward = ops.forward_command(c, record, now.port, local_port or now.port, identity_for(identity))
    if as_json:
        emit_json(now.model_dump(mode="json") | {"ssh_forward": forward,
                                                 "url": f"http://127.0.0.1:{local_port or now.port}/v1"})
        return
    entry = next(m for m in now.models if m.name == wanted.name)
    out.print(f"{Vm.name}: serving {wanted.name} ({entry.footprint_mib} MiB, context {entry.context}) on port "
              f"{now.port} in the guest, ready in {time.monotonic() - started:.1f} s")
    out.print("A tenant reaches the OpenAI-compatible API at "
              f"http://127.0.0.1:{local_port or now.port}/v1 after running (with their own key for -i):")
    print(shlex.join(forward))  # plain print: a line meant to be pasted


@serve_app.command("status")
def serve_status(as_json: JsonOpt = False) -> None:
    """The server, its models, their memory and what is in flight."""
    from hvctl.ops import serve as ops

    c = ctx()
    now = ops.status(c, c.ledger.vms.get(Vm.name))
    if as_json:
        emit_json(now.model_dump(mode="json"))
    else:
        _print_status(now)


@serve_app.command("reload")
def serve_reload(
    model: ModelOpt,
    name: Annotated[str | None, typer.Option("--name", help="The served model to swap (default: the only one).")]
    = None,
    wait: WaitOpt = 1800,
    as_json: JsonOpt = False,
) -> None:
    """Load new weights beside a served model's and switch to them atomically: requests in flight finish on the
    old weights, new ones get the new, none fails."""
    from hvctl.errors import InvalidSpec
    from hvctl.ops import serve as ops

    c = ctx()
    record = c.ledger.vms.get(Vm.name)
    if name is None:
        names = [m.name for m in ops.status(c, record).models]
        if len(names) != 1:
            raise InvalidSpec(f"{Vm.name} serves {len(names)} models ({', '.join(names) or 'none'}); say which "
                              f"with --name")
        name = names[0]
    wanted = ops.served(model, name)
    started = time.monotonic()
    line = _progress(f"{Vm.name}: loading {wanted.dir} beside {name}")
    try:
        now = ops.reload(c, record, wanted, wait_s=wait, say=lambda s: line.update(f"{Vm.name}: {s}"))
    finally:
        line.stop()
    if as_json:
        emit_json(now.model_dump(mode="json"))
        return
    entry = next(m for m in now.models if m.name == name)
    out.print(f"{Vm.name}: {name} now serves {safe(entry.dir)} (version {entry.version}), switched after "
              f"{time.monotonic() - started:.1f} s")


@serve_app.command("unload")
def serve_unload(name: Annotated[str, typer.Option("--name", help="The model to unload.")],
                 as_json: JsonOpt = False) -> None:
    """Stop serving one model; the others go on."""
    from hvctl.ops import serve as ops

    c = ctx()
    now = ops.unload(c, c.ledger.vms.get(Vm.name), name)
    if as_json:
        emit_json(now.model_dump(mode="json"))
    else:
        out.print(f"{Vm.name}: {name} unloaded")


@serve_app.command("stop")
def serve_stop(as_json: JsonOpt = False) -> None:
    """Stop the model server (requests in flight are cut off)."""
    from hvctl.ops import serve as ops

    c = ctx()
    now = ops.stop(c, c.ledger.vms.get(Vm.name))
    if as_json:
        emit_json(now.model_dump(mode="json"))
    else:
        out.print(f"{Vm.name}: model server stopped")


@serve_app.command("forward")
def serve_forward(
    local_port: Annotated[int | None, typer.Option(help="The local port (default: the guest's).")] = None,
    identity: IdentityOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the ssh -L command that brings the server's API to a tenant's machine."""
    from hvctl.ops import serve as ops
    from hvctl.ops.serve import ServeFailed

    c = ctx()
    record = c.ledger.vms.get(Vm.name)
    now = ops.status(c, record)
    if now.port is None:
        raise ServeFailed(f"{Vm.name} runs no model server", hint=f"`hvctl serve {Vm.name} start --model DIR`")
    forward = ops.forward_command(c, record, now.port, local_port or now.port, identity_for(identity))
    if as_json:
        emit_json({"vm": Vm.name, "argv": forward, "url": f"http://127.0.0.1:{local_port or now.port}/v1"})
    else:
        print(shlex.join(forward))


@app.command()
def generate(
    name: str,
    prompt: Annotated[str, typer.Option(help="The prompt.")],
    model: Annotated[str | None, typer.Option(help="The served model (default: the only one).")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, max=4096, help="Tokens to generate.")] = 16,
    timeout: Annotated[float, typer.Option(min=1, help="Seconds to wait for the answer.")] = 300,
    as_json: JsonOpt = False,
) -> None:
    """Complete a prompt with the VM's model server, through the agent channel (no network, no torch here)."""
    from hvctl.errors import InvalidSpec
    from hvctl.ops import serve as ops

    c = ctx()
    record = c.ledger.vms.get(name)
    if model is None:
        now = ops.status(c, record)
        ready = [m.name for m in now.models if m.state == "ready"]
        if now.state != "running" or len(ready) != 1:
            raise InvalidSpec(f"{name} serves {len(ready)} ready models ({', '.join(ready) or 'none'}); say which "
                              "with --model" if now.state == "running" else f"{name} runs no model server",
                              hint=None if now.state == "running" else f"`hvctl serve {name} start --model DIR`")
        model = ready[0]
    answer = ops.generate(c, record, model, prompt, max_tokens, timeout)
    if as_json:
        emit_json(answer.model_dump(mode="json"))
    else:
        out.print(safe(answer.text), soft_wrap=True)
        err.print(f"[dim]{model}: {len(answer.token_ids)} tokens ({answer.finish_reason}) in {answer.duration_s:.2f} "
                  f"s[/]")
