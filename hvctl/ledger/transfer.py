"""Moving a whole ledger between backends (`hvctl ledger export|import`): every table's rows as a JSON document,
and back into an empty ledger in one transaction, checked row for row before it commits."""

from __future__ import annotations

import time
from typing import Any

from hvctl.errors import InvalidSpec, LedgerError
from hvctl.ledger.core import Connection, Store
from hvctl.ledger.schema import MIGRATIONS

FORMAT = "hvctl-ledger"
VERSION = 1
# Every table, parents before the tables whose rows refer to them (imports insert in this order).
TABLES = ("hosts", "vms", "tenant_keys", "reservations", "gpu_bindings", "operations", "snapshots", "gpu_health",
          "networks", "underlays", "network_addresses", "image_uploads", "events")
# Tables whose id the database hands out: after an import the next id must follow the imported ones.
IDENTITIES = ("reservations", "events")


def _read(db: Connection, table: str) -> tuple[list[str], list[list[Any]]]:
    cursor = db.execute(f"SELECT * FROM {table}")  # noqa: S608 - a name from TABLES
    columns = [str(d[0]) for d in cursor.description]
    return columns, _in_order([list(row) for row in cursor.fetchall()])


def _in_order(rows: list[list[Any]]) -> list[list[Any]]:
    """Rows in one order whatever the backend returned them in (NULLs last in each column)."""
    return sorted(rows, key=lambda r: [(v is None, str(v)) for v in r])


def export(store: Store) -> dict[str, Any]:
    """The ledger as a document: the schema version and every table's columns and rows (as one snapshot: read in
    a write transaction, so no writer changes it half-way)."""
    with store.transaction() as db:
        tables = {}
        for table in TABLES:
            columns, rows = _read(db, table)
            tables[table] = {"columns": columns, "rows": rows}
    return {"format": FORMAT, "version": VERSION, "schema": store.schema_version, "exported_at": time.time(),
            "source": {"backend": store.backend, "location": store.location}, "tables": tables}


def check_document(document: Any) -> dict[str, Any]:
    """``document`` if it is an export this hvctl can import, else one clear refusal."""
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise InvalidSpec("not an hvctl ledger export (no \"format\": \"hvctl-ledger\")")
    if document.get("version") != VERSION:
        raise InvalidSpec(f"ledger export format v{document.get('version')}; this hvctl reads v{VERSION}")
    if document.get("schema") != len(MIGRATIONS):
        raise InvalidSpec(f"the export is of ledger schema v{document.get('schema')}, this hvctl's is "
                          f"v{len(MIGRATIONS)}", hint="export and import with the same hvctl version")
    tables = document.get("tables")
    if not isinstance(tables, dict) or set(tables) != set(TABLES):
        missing = sorted(set(TABLES) - set(tables or {}))
        raise InvalidSpec(f"the export's tables are not the ledger's (missing: {', '.join(missing) or 'none'})")
    return document


def import_(store: Store, document: dict[str, Any]) -> dict[str, int]:
    """Write every row of ``document`` into ``store``, which must be empty, in one transaction that re-reads each
    table and compares it with the document before it commits. Returns the rows per table."""
    check_document(document)
    counts: dict[str, int] = {}
    with store.transaction() as db:
        held = {t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in TABLES}  # noqa: S608
        if any(held.values()):
            raise LedgerError(f"ledger {store.location} is not empty ("
                              + ", ".join(f"{t}: {n}" for t, n in held.items() if n) + "): an import goes only into "
                              "an empty ledger", hint="point --ledger at a new database or file")
        for table in TABLES:
            columns, rows = document["tables"][table]["columns"], document["tables"][table]["rows"]
            marks = ", ".join("?" for _ in columns)
            for row in rows:
                db.execute(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", row)  # noqa: S608
            counts[table] = len(rows)
        for table in TABLES:
            columns, rows = _read(db, table)
            expected = document["tables"][table]
            if columns != expected["columns"] or rows != _in_order(expected["rows"]):
                raise LedgerError(f"table {table} does not read back as exported; nothing was imported")
        store.after_import(db, IDENTITIES)
    return counts
