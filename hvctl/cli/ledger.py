"""hvctl ledger: move a fleet's ledger between backends."""

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from hvctl.cli.common import JsonOpt, app, ctx, emit_json, out

ledger_app = typer.Typer(no_args_is_help=True, help="The ledger itself: export it, import it into another backend.")
app.add_typer(ledger_app, name="ledger")

FileArg = Annotated[Path, typer.Argument(metavar="FILE", help="The export's file; - for stdout/stdin.")]


def _summary(verb: str, view: dict[str, Any]) -> str:
    rows = view["rows"]
    counted = ", ".join(f"{n} {t}" for t, n in rows.items() if n) or "no rows"
    return f"{verb} {sum(rows.values())} rows ({counted}), schema v{view['schema']}"


@ledger_app.command("export")
def ledger_export(file: FileArg, as_json: JsonOpt = False) -> None:
    """Write every row of the ledger (--ledger, else the state dir's) to FILE as JSON, born 0600: it holds agent
    tokens. `hvctl --ledger URL ledger import FILE` moves the fleet to another backend."""
    from hvctl.ops.ledger import export_ledger

    view = export_ledger(ctx(), None if str(file) == "-" else file)
    if str(file) == "-" or as_json:
        emit_json(view)
    else:
        out.print(_summary(f"exported {view['source']['location']} to {view['file']}:", view))


@ledger_app.command("import")
def ledger_import(file: FileArg, as_json: JsonOpt = False) -> None:
    """Read an export into the ledger hvctl points at (--ledger, else the state dir's), which must be empty: one
    transaction, each table read back and compared with the file before it commits."""
    from hvctl.ops.ledger import import_ledger

    view = import_ledger(ctx(), None, sys.stdin.read()) if str(file) == "-" else import_ledger(ctx(), file)
    if as_json:
        emit_json(view)
    else:
        out.print(_summary(f"imported into {view['ledger']} from {view['source']['location']}:", view))
