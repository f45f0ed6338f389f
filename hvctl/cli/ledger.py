"""hvctl ledger: move a fleet's ledger between backends."""

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from hvctl.cli.common import JsonOpt, app, ctx, emit_json, out

if TYPE_CHECKING:
    from hvctl.ops.ledger import Transfer

ledger_app = typer.Typer(no_args_is_help=True, help="The ledger itself: export it, import it into another backend.")
app.add_typer(ledger_app, name="ledger")

FileArg = Annotated[Path, typer.Argument(metavar="FILE", help="The export's file; - for stdout/stdin.")]


def _summary(verb: str, moved: "Transfer") -> str:
    counted = ", ".join(f"{n} {t}" for t, n in moved.rows.items() if n) or "no rows"
    return f"{verb} {sum(moved.rows.values())} rows ({counted}), schema v{moved.schema}"


@ledger_app.command("export")
def ledger_export(file: FileArg, as_json: JsonOpt = False) -> None:
    """Write every row of the ledger (--ledger, else the state dir's) to FILE as JSON, born 0600: it holds agent
    tokens. `hvctl --ledger URL ledger import FILE` moves the fleet to another backend."""
    from hvctl.ops.ledger import export_document, export_ledger

    if str(file) == "-":
        emit_json(export_document(ctx()))
        return
    moved = export_ledger(ctx(), file)
    if as_json:
        emit_json(moved.as_json())
    else:
        out.print(_summary(f"exported {moved.source['location']} to {moved.to}:", moved))


@ledger_app.command("import")
def ledger_import(file: FileArg, as_json: JsonOpt = False) -> None:
    """Read an export into the ledger hvctl points at (--ledger, else the state dir's), which must be empty: one
    transaction, each table read back and compared with the file before it commits."""
    from hvctl.ops.ledger import import_ledger

    moved = import_ledger(ctx(), None, sys.stdin.read()) if str(file) == "-" else import_ledger(ctx(), file)
    if as_json:
        emit_json(moved.as_json())
    else:
        out.print(_summary(f"imported into {moved.to} from {moved.source['location']}:", moved))
