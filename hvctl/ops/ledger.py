"""`hvctl ledger export|import`: move a fleet's ledger between SQLite and PostgreSQL (and back), checked row for row.

Both open the ledger themselves rather than through ``ctx.ledger``, which registers the connected host on first
use: an import must find its target empty, and an export must not write to what it reads."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvctl.context import Context
from hvctl.errors import InvalidSpec, LedgerError
from hvctl.ledger import Ledger, transfer
from hvctl.paths import StateDir, replace_atomically


@dataclass(frozen=True)
class Transfer:
    """What an export or an import moved: where to (a file, or the ledger imported into), from which ledger, the
    schema version, and the rows per table."""

    to: str
    source: dict[str, str]
    schema: int
    rows: dict[str, int]

    def as_json(self) -> dict[str, Any]:
        return {"to": self.to, "source": self.source, "schema": self.schema, "rows": self.rows}


def _location(ctx: Context, must_exist: bool) -> Path | str:
    if ctx.ledger_url:
        return ctx.ledger_url
    path = StateDir(ctx.state_dir).ledger
    if must_exist and not path.exists():
        raise LedgerError(f"no ledger at {path}", hint="--state-dir or --ledger names the ledger to export")
    if not must_exist:
        ctx.paths.ensure()
    return path


def export_document(ctx: Context) -> dict[str, Any]:
    """The ledger as an export document (for stdout)."""
    ledger = Ledger(_location(ctx, must_exist=True))
    try:
        return transfer.export(ledger.store)
    finally:
        ledger.close()


def export_ledger(ctx: Context, dest: Path) -> Transfer:
    """Write the ledger to ``dest``, born 0600: it holds agent tokens."""
    document = export_document(ctx)
    try:
        replace_atomically(dest, json.dumps(document).encode(), 0o600)
    except OSError as exc:
        raise InvalidSpec(f"cannot write {dest}: {exc.strerror}") from None
    return Transfer(str(dest), document["source"], document["schema"],
                    {t: len(v["rows"]) for t, v in document["tables"].items()})


def import_ledger(ctx: Context, source: Path | None, text: str | None = None) -> Transfer:
    """Read an export (the file ``source``, or ``text`` from stdin) into the ledger hvctl points at, which must be
    empty; one transaction, checked row for row before it commits."""
    if text is None:
        assert source is not None
        try:
            text = source.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidSpec(f"cannot read {source}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        document = transfer.check_document(json.loads(text))
    except json.JSONDecodeError as exc:
        raise InvalidSpec(f"{source or 'stdin'} is not JSON: {exc.msg} (line {exc.lineno})") from None
    ledger = Ledger(_location(ctx, must_exist=False))
    try:
        counts = transfer.import_(ledger.store, document)
        target = ledger.store.location
    finally:
        ledger.close()
    return Transfer(target, document["source"], document["schema"], counts)
