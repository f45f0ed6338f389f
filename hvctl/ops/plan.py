"""hvctl plan: a dry run of placement and admission for a batch of requests, against the ledger's current state.

Tenant quotas are applied first, in request order; admitted requests are then ordered across tenants by weighted
Dominant Resource Fairness and placed by the scheduler. Nothing is written.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from guest.validation import describe
from hvctl import yamlfile
from hvctl.accounting import first_excess, host_footprint, tenant_charge
from hvctl.context import Context
from hvctl.errors import InvalidSpec
from hvctl.placement import host_limit, inventory, placement_request
from hvctl.scheduler import Scheduler
from hvctl.spec import VMSpec


class PlanItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    tenant: str = "default"
    flavor: str | None = None
    vcpus: int | None = None
    memory_mib: int | None = None
    disk_gib: int | None = None
    gpus: int | None = None
    count: int = Field(default=1, ge=1, le=10_000)


class PlanFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests: list[PlanItem]


def load_requests(ctx: Context, path: Path) -> list[VMSpec]:
    try:
        raw = yamlfile.load(yamlfile.read_text(path))
        items = PlanFile.model_validate(raw).requests
    except OSError as exc:
        raise InvalidSpec(f"cannot read {path}: {exc.strerror}") from None
    except ValidationError as exc:
        raise InvalidSpec(f"{path}: {describe(exc)}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InvalidSpec(f"{path}: {str(exc).splitlines()[0]}") from None
    specs = []
    for item in items:
        sizes = ctx.policy.sizes(item.flavor or None, vcpus=item.vcpus, memory_mib=item.memory_mib,
                                 disk_gib=item.disk_gib, gpus=item.gpus)
        ctx.policy.tenant(item.tenant)
        for i in range(item.count):
            name = item.name if item.count == 1 else f"{item.name}-{i + 1}"
            specs.append(VMSpec.parse(name=name, tenant=item.tenant, **sizes))
    return specs


def plan(ctx: Context, specs: list[VMSpec]) -> dict[str, Any]:
    """Progressive filling with quotas: repeatedly take the next request of the tenant with the lowest weighted
    dominant share (its largest fraction of any cluster resource, divided by its weight), refuse it if it would
    exceed the tenant's quota, else let the scheduler place it. Requests a tenant cannot get do not count."""
    policy, ledger = ctx.policy, ctx.ledger
    hosts = [h for h in ledger.list_hosts() if h.cpus is not None]
    limits = [host_limit(policy, h, len(ledger.host_inventory(h.name)[1])) for h in hosts]
    total = {k: sum(float(lim[k] or 0) for lim in limits) for k in ("vcpus", "memory_mib", "gpus")}
    usage = {t: ledger.tenant_usage(t) for t in policy.tenants}
    scheduler = Scheduler([inventory(ledger, policy, h) for h in hosts], policy.placement.mode)
    host_used = {h.name: ledger.host_usage(h.name) for h in hosts}
    queues: dict[str, deque[VMSpec]] = {}
    for spec in specs:
        queues.setdefault(spec.tenant, deque()).append(spec)

    def dominant_share(tenant: str) -> float:
        used = usage[tenant]
        shares = [getattr(used, k) / total[k] for k in total if total[k] > 0]
        return max(shares, default=0.0) / policy.tenants[tenant].weight

    decisions: dict[str, dict[str, Any]] = {}
    while queues:
        tenant = min(queues, key=lambda t: (dominant_share(t), t))
        spec = queues[tenant].popleft()
        if not queues[tenant]:
            del queues[tenant]
        refusal = first_excess(f"tenant {tenant}", tenant_charge(spec), usage[tenant],
                               policy.tenants[tenant].quota.model_dump())
        if refusal:
            decisions[spec.name] = {"host": None, "reason": refusal, "order": len(decisions) + 1}
            continue
        if not hosts:
            decisions[spec.name] = {"host": None, "reason": "no host is registered", "order": len(decisions) + 1}
            continue
        placed = scheduler.place_one(placement_request(spec, policy))
        decisions[spec.name] = {"host": placed.host, "reason": placed.reason, "order": len(decisions) + 1}
        if placed.host:
            usage[tenant] = usage[tenant] + tenant_charge(spec)
            host_used[placed.host] = host_used[placed.host] + host_footprint(spec)
    return {
        "requests": [{"name": s.name, "tenant": s.tenant, "vcpus": s.vcpus, "memory_mib": s.memory_mib,
                      **decisions[s.name]} for s in specs],
        "hosts": [{"name": h.name, "used": host_used[h.name].as_dict(), "limit": lim}
                  for h, lim in zip(hosts, limits, strict=True)],
        "tenants": [{"name": t, "weight": policy.tenants[t].weight, "dominant_share": round(dominant_share(t), 4),
                     "used": usage[t].as_dict(), "quota": policy.tenants[t].quota.model_dump()}
                    for t in sorted(policy.tenants)],
    }
