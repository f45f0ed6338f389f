"""`hvctl ledger export|import`: move a fleet's ledger between SQLite and PostgreSQL (and back), checked row for row.

Both open the ledger themselves rather than through ``ctx.ledger``, which registers the connected host on first
use: an import must find its target empty, and an export must not write to what it reads."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hvctl.context import Context
from hvctl.errors import InvalidSpec, LedgerError
from hvctl.ledger import Ledger, transfer
from hvctl.paths import StateDir


def _location(ctx: Context, must_exist: bool) -> Path | str:
    if ctx.ledger_url:
        return ctx.ledger_url
    path = StateDir(ctx.state_dir).ledger
    if must_exist and not path.exists():
        raise LedgerError(f"no ledger at {path}", hint="--state-dir or --ledger names the ledger to export")
    if not must_exist:
        ctx.paths.ensure()
    return path


def export_ledger(ctx: Context, dest: Path | None) -> dict[str, Any]:
    """Write the ledger to ``dest`` (None: return the document for stdout). The file is born 0600: it holds agent
    tokens. Returns a summary (or the document)."""
    ledger = Ledger(_location(ctx, must_exist=True))
    try:
        document = transfer.export(ledger.store)
    finally:
        ledger.close()
    if dest is None:
        return document
    text = json.dumps(document)
    partial = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        partial.replace(dest)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise InvalidSpec(f"cannot write {dest}: {exc.strerror}") from None
    return {"file": str(dest), "schema": document["schema"], "source": document["source"],
            "rows": {t: len(v["rows"]) for t, v in document["tables"].items()}}


def import_ledger(ctx: Context, source: Path | None, text: str | None = None) -> dict[str, Any]:
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
    return {"ledger": target, "schema": document["schema"], "source": document["source"], "rows": counts}
