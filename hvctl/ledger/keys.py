"""The ledger's tenant keys: the SSH public keys each tenant's future VMs authorise."""

from __future__ import annotations

import time

from hvctl.ledger.core import Repository


class TenantKeys(Repository):
    def add(self, tenant: str, pubkey: str) -> bool:
        """Authorise a public key for a tenant's future VMs. Returns False if it was already there."""
        with self._store.transaction() as db:
            cur = db.execute("INSERT INTO tenant_keys (tenant, pubkey, added_at) VALUES (?, ?, ?) "
                             "ON CONFLICT DO NOTHING", (tenant, pubkey, time.time()))
            if cur.rowcount:
                self._store.event(db, None, None, "tenant.key-added", f"key added for tenant {tenant}")
            return bool(cur.rowcount)

    def remove(self, tenant: str, pubkey: str) -> bool:
        """Forget a tenant's key. Returns False if it was not there."""
        with self._store.transaction() as db:
            cur = db.execute("DELETE FROM tenant_keys WHERE tenant = ? AND pubkey = ?", (tenant, pubkey))
            if cur.rowcount:
                self._store.event(db, None, None, "tenant.key-removed", f"key removed for tenant {tenant}")
            return bool(cur.rowcount)

    def all(self, tenant: str | None = None) -> list[tuple[str, str]]:
        query = "SELECT tenant, pubkey FROM tenant_keys" + (" WHERE tenant = ?" if tenant else "")
        return [(r[0], r[1]) for r in self._db.execute(query + " ORDER BY tenant, added_at", (tenant,) if tenant
                                                      else ())]
