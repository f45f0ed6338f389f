"""The hvctl command line: parses arguments, renders tables and progress. The only package that prints or exits.

Commands live in one module per area; importing them registers them on the shared typer app.
"""

from __future__ import annotations

from hvctl.cli import access, fleet, images, migration, serving, snapshots, vms, workloads  # noqa: F401 - registers the commands
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
            app(args=argv, prog_name="hvctl", default_map=settings)
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
