"""What every hvctl command shares: the typer apps, consoles, the context, progress and error rendering."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from hvctl import __version__
from hvctl.context import DEFAULT_URI, Context
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
MaxBytesOpt = Annotated[int, typer.Option("--max-bytes", min=1, help="Refuse a copy out of the guest past this size.")]


class State:
    debug = False
    ctx: Context | None = None


def ctx() -> Context:
    assert State.ctx is not None
    return State.ctx


@app.callback()
def main_options(
    connect: Annotated[str | None, typer.Option("--connect", "-c", envvar="HVCTL_CONNECT",
                                                help="libvirt URI of the host to act on: host `local` on first use "
                                                     f"(default {DEFAULT_URI}), else a registered host's URI.")]
    = None,
    state_dir: Annotated[Path, typer.Option("--state-dir", envvar="HVCTL_STATE_DIR",
                                            help="Where the ledger, images and VM disks live.")] = DEFAULT_STATE_DIR,
    policy: Annotated[Path | None, typer.Option("--policy", envvar="HVCTL_POLICY",
                                                help="Policy file (default: STATE_DIR/policy.yaml, else the "
                                                     "shipped policies/default.yaml).")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    wait: Annotated[float, typer.Option("--wait", envvar="HVCTL_WAIT", min=0, metavar="SECONDS",
                                        help="Wait up to SECONDS for another command's operation on the same VM "
                                             "to end, instead of refusing at once.")] = 0.0,
    version: Annotated[bool, typer.Option("--version", help="Print hvctl's version and exit.", is_eager=True,
                                          callback=lambda value: _print_version(value))] = False,
) -> None:
    State.debug = debug
    State.ctx = Context(state_dir=state_dir, uri=connect, policy_path=policy, lock_wait_s=wait)


def _print_version(value: bool) -> None:
    if value:
        out.print(f"hvctl {__version__}")
        raise typer.Exit(0)


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



# ANSI escape sequences (CSI, OSC, and two-byte ESC forms), then any other C0/C1 control character but tab and newline.
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[0-~])")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def plain(text: str) -> str:
    """Text a guest wrote, made safe for the admin's terminal: no escape sequences, no control characters (a bare
    carriage return could overwrite what hvctl printed), CRLF as LF."""
    return _CONTROL.sub("", _ANSI.sub("", text.replace("\r\n", "\n")))


def safe(text: object) -> str:
    """``plain`` and escaped for rich markup: for guest text inside a string that rich renders (``[/]`` would
    otherwise raise a MarkupError)."""
    return escape(plain(str(text)))


def fail(message: str, code: int, hint: str | None = None, detail: str = "") -> NoReturn:
    # Messages can quote what a guest said (an agent's refusal, a workload's error): never rendered as markup.
    err.print(f"[red]hvctl: error:[/] {safe(message)}" + (f" [dim](hint: {safe(hint)})[/]" if hint else ""),
              soft_wrap=True)
    if detail:
        err.print(plain(detail), markup=False, soft_wrap=True)
    raise SystemExit(code)
