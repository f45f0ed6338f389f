"""What every hvctl command shares: the typer apps, consoles, the context, progress and error rendering."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from hvctl import __version__
from hvctl.context import DEFAULT_URI, Context
from hvctl.paths import DEFAULT_STATE_DIR

if TYPE_CHECKING:
    from rich.console import Console
    from rich.status import Status
    from rich.table import Table as RichTable

app = typer.Typer(
    name="hvctl", no_args_is_help=True, add_completion=True, pretty_exceptions_enable=False,
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
network_app = typer.Typer(no_args_is_help=True, help="Tenant networks: isolated segments joining a tenant's VMs.")
app.add_typer(network_app, name="network")

class _LazyTable:
    """rich's Table, imported on first use: most commands print no table, and the import costs start-up time."""

    def __call__(self, *headers: Any, **options: Any) -> RichTable:
        from rich.table import Table as Real

        return Real(*headers, **options)

    def grid(self, *headers: Any, **options: Any) -> RichTable:
        from rich.table import Table as Real

        return Real.grid(*headers, **options)


Table = _LazyTable()

class _LazyConsole:
    """A rich Console made on first use: `--json` output and `--version` never import rich's console."""

    def __init__(self, stderr: bool) -> None:
        self.stderr = stderr
        self._console: Console | None = None

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=self.stderr, highlight=False)
        return self._console

    def print(self, *objects: Any, **options: Any) -> None:
        self.console.print(*objects, **options)

    def status(self, status: str) -> Status:
        return self.console.status(status)


out = _LazyConsole(stderr=False)
err = _LazyConsole(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]
MaxBytesOpt = Annotated[int, typer.Option("--max-bytes", min=1, help="Refuse a copy out of the guest past this size.")]


class State:
    debug = False
    quiet = False
    ctx: Context | None = None
    # Setting → the config file it came from (hvctl.config), and where each global option's value came from.
    config_sources: dict[str, str] = {}
    option_sources: dict[str, str] = {}


def ctx() -> Context:
    assert State.ctx is not None
    return State.ctx


@app.callback()
def main_options(
    context: typer.Context,
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
    ledger: Annotated[str | None, typer.Option("--ledger", envvar="HVCTL_LEDGER", metavar="URL",
                                               help="The ledger: a postgresql:// URL that several controllers share, "
                                                    "or a SQLite file (default: STATE_DIR/ledger.sqlite3).")]
    = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or step lines on stderr; errors and "
                                                              "results only.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print hvctl's version and exit.", is_eager=True,
                                          callback=lambda value: _print_version(value))] = False,
) -> None:
    """Global options: each of --connect, --state-dir, --policy, --wait and --ledger is also a setting of the config
    file (/etc/hvctl/config.toml, then ~/.config/hvctl/config.toml; HVCTL_CONFIG names another), which a flag or its
    environment variable overrides."""
    State.debug = debug
    State.quiet = quiet
    for name in ("connect", "state_dir", "policy", "wait", "ledger"):
        source = context.get_parameter_source(name)
        State.option_sources[name] = {"COMMANDLINE": "flag", "ENVIRONMENT": "environment",
                                      "DEFAULT_MAP": f"config file {State.config_sources.get(name, '')}"}.get(
            source.name if source is not None else "", "default")
    State.ctx = Context(state_dir=state_dir, uri=connect, policy_path=policy, lock_wait_s=wait, ledger_url=ledger)


def _print_version(value: bool) -> None:
    if value:
        out.print(f"hvctl {__version__}")
        raise typer.Exit(0)


class RichReporter:
    """Shows each step with a spinner on stderr, so stdout stays clean for --json."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.quiet = State.quiet
        self.status = err.status(title)
        self.started = time.monotonic()
        self.last: tuple[str, float] | None = None

    def __call__(self, message: str) -> None:
        """A reporter is an operation's ``say`` (hvctl.ops.Say)."""
        self.step(message)

    def step(self, message: str) -> None:
        now = time.monotonic()
        if self.quiet:
            return
        if self.last is not None:
            err.print(f"  [green]✓[/] {self.last[0]} [dim]({now - self.last[1]:.2f} s)[/]")
        self.last = (message, now)
        self.status.update(f"{self.title}: {message}")

    def __enter__(self) -> RichReporter:
        if not self.quiet:
            self.status.start()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self.quiet:
            return
        self.status.stop()
        if self.last is not None:
            mark = "[green]✓[/]" if exc is None else "[red]✗[/]"
            err.print(f"  {mark} {self.last[0]} [dim]({time.monotonic() - self.last[1]:.2f} s)[/]")


def emit_json(data: Any) -> None:
    """Indented for a terminal; one line for a pipe (as gh does), which the json module writes with its C encoder:
    indenting takes its pure-Python one, a tenth of `hvctl list --json`'s time at 100 VMs."""
    indent = 2 if sys.stdout.isatty() else None
    sys.stdout.write(json.dumps(data, indent=indent, default=str) + "\n")


OUTPUTS = ("table", "json", "yaml", "name")
OutputOpt = Annotated[str | None, typer.Option("--output", "-o", metavar="table|json|yaml|name",
                                               help="Output format (--json is -o json).")]


def output_format(output: str | None, as_json: bool, allowed: tuple[str, ...] = OUTPUTS) -> str:
    """The format asked for with -o, or --json; a contradiction or an unknown one is a usage error."""
    if output is not None and output not in allowed:
        fail(f"-o takes {'|'.join(allowed)}, not {output!r}", 2)
    if as_json and output not in (None, "json"):
        fail(f"--json and -o {output} contradict each other", 2)
    return "json" if as_json else output or "table"


def emit(data: Any, fmt: str) -> None:
    """``data`` as JSON or YAML on stdout (the same document either way)."""
    if fmt == "yaml":
        import yaml

        sys.stdout.write(yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False))
    else:
        emit_json(data)



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
    from rich.markup import escape

    return escape(plain(str(text)))


def fail(message: str, code: int, hint: str | None = None, detail: str = "") -> NoReturn:
    # Messages can quote what a guest said (an agent's refusal, a workload's error): never rendered as markup.
    err.print(f"[red]hvctl: error:[/] {safe(message)}" + (f" [dim](hint: {safe(hint)})[/]" if hint else ""),
              soft_wrap=True)
    if detail:
        err.print(plain(detail), markup=False, soft_wrap=True)
    raise SystemExit(code)
