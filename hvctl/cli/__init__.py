"""The hvctl command line: parses arguments, renders tables and progress. The only package that prints or exits.

Commands live in one module per area; importing them registers them on the shared typer app. Each command imports
the ops it runs inside its own body: every invocation loads this whole package, and `hvctl --help`, completion and
`hvctl list` should not pay for libvirt's, the designer's or the scheduler's imports that another command needs
(benchmarks/bench_cli.py measures the start-up). A function-local import in this package has that reason.
"""

from __future__ import annotations

import copy
import os
import sys

import typer

from hvctl.cli import (  # noqa: F401 - registers the commands
    access,
    fleet,
    images,
    ledger,
    migration,
    networks,
    serving,
    snapshots,
    vms,
    workloads,
)
from hvctl.cli.common import State, app, fail
from hvctl.errors import GuestTimeout, HvctlError

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> None:
    try:
        try:
            from hvctl import config

            settings, State.config_sources = config.load()
            # Standalone mode: typer reports usage errors (unknown option, missing argument) itself, exit code 2.
            # The config file's settings are the global options' defaults: a flag or its variable beats them.
            args = sys.argv[1:] if argv is None else argv
            _only_the_command(args)(args=args, prog_name="hvctl", default_map=settings)
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
    except Exception as exc:
        from vfio import VfioError  # imported only when something failed: it costs start-up time

        if State.debug or not isinstance(exc, VfioError):
            raise
        fail(exc.message, 2, exc.hint)  # the vfio package knows nothing of hvctl: its refusals are bad input here
    except KeyboardInterrupt:
        fail("interrupted", 130)


# The global options that take a value: the word after one is its value, not the command.
_VALUE_OPTIONS = frozenset({"--connect", "-c", "--state-dir", "--policy", "--wait", "--ledger"})


def _only_the_command(args: list[str]) -> typer.Typer:
    """The app with only the command (or group) that ``args`` name. typer makes click objects for every command of
    the tree before it runs one, which was a fifth of `hvctl list`'s time; one invocation needs one. Without a
    command word, or with one that is not a command, and for shell completion, the whole tree (its help, its
    "No such command" with suggestions)."""
    if any(key.endswith("_COMPLETE") for key in os.environ):
        return app
    words = iter(args)
    for word in words:
        if word == "--":
            return app
        if word.startswith("-"):
            if word in _VALUE_OPTIONS:
                next(words, None)
            continue
        commands = [c for c in app.registered_commands
                    if (c.name or typer.main.get_command_name(c.callback.__name__ if c.callback else "")) == word]
        groups = [g for g in app.registered_groups if g.name == word]
        if not commands and not groups:
            return app
        pruned = copy.copy(app)
        pruned.registered_commands, pruned.registered_groups = commands, groups
        return pruned
    return app
