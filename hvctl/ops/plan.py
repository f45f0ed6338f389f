"""hvctl plan: a dry run of placement and admission for a batch of requests, against the ledger's current state.

Tenant quotas are applied first, in request order; admitted requests are then ordered across tenants by weighted
Dominant Resource Fairness and placed by the scheduler. Nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from guest.validation import describe
from hvctl import yamlfile
from hvctl.accounting import Usage, first_excess, host_footprint, tenant_charge
from hvctl.context import Context
from hvctl.errors import InvalidSpec
from hvctl.placement import host_allowance, inventory, placement_request
from hvctl.policy import Quota
from hvctl.scheduler import Scheduler
from hvctl.scheduler.drf import progressive_filling
from hvctl.scheduler.model import PlacementRequest
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


@dataclass(frozen=True)
class Decision:
    host: str | None  # None: refused
    order: int  # the order in which the fairness took it
    reason: str | None  # the scheduler's reason for the host, or why it was refused


@dataclass(frozen=True)
class PlannedRequest:
    name: str
    tenant: str
    vcpus: int
    memory_mib: int
    decision: Decision


@dataclass(frozen=True)
class PlannedHost:
    name: str
    used: Usage
    limit: dict[str, float | None]  # placement.host_allowance


@dataclass(frozen=True)
class PlannedTenant:
    name: str
    weight: float
    dominant_share: float
    used: Usage
    quota: Quota


@dataclass(frozen=True)
class Plan:
    requests: tuple[PlannedRequest, ...]
    hosts: tuple[PlannedHost, ...]
    tenants: tuple[PlannedTenant, ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "requests": [{"name": r.name, "tenant": r.tenant, "vcpus": r.vcpus, "memory_mib": r.memory_mib,
                          "host": r.decision.host, "order": r.decision.order, "reason": r.decision.reason}
                         for r in self.requests],
            "hosts": [{"name": h.name, "used": h.used.as_dict(), "limit": h.limit} for h in self.hosts],
            "tenants": [{"name": t.name, "weight": t.weight, "dominant_share": t.dominant_share,
                         "used": t.used.as_dict(), "quota": t.quota.model_dump()} for t in self.tenants],
        }


def plan(ctx: Context, specs: list[VMSpec]) -> Plan:
    """The scheduler's weighted DRF (``scheduler.drf.progressive_filling``): repeatedly take the next request of the
    tenant with the lowest weighted dominant share (its largest fraction of any cluster resource, divided by its
    weight; ties to the tenant first by name), refuse it if it would exceed the tenant's quota, else let the scheduler
    place it. Requests a tenant cannot get do not count."""
    policy, ledger = ctx.policy, ctx.ledger
    hosts = [h for h in ledger.hosts.all() if h.cpus is not None]
    limits = [host_allowance(ledger, policy, h.name) for h in hosts]
    # The shares are of what tenants are charged (quota units) against the hosts' usable capacity; disk is not a
    # resource the fairness counts.
    capacity = tuple(sum(float(lim[k] or 0) for lim in limits) if k != "disk_gib" else 0.0
                     for k in ("vcpus", "memory_mib", "disk_gib", "gpus"))
    usage = {t: ledger.tenant_usage(t) for t in policy.tenants}
    scheduler = Scheduler([inventory(ledger, policy, h) for h in hosts], policy.placement.mode)
    host_used = {h.name: ledger.host_usage(h.name) for h in hosts}
    by_name = {spec.name: spec for spec in specs}
    decisions: dict[str, Decision] = {}

    def admit(request: PlacementRequest) -> bool:
        spec = by_name[request.id]
        refusal = first_excess(f"tenant {spec.tenant}", tenant_charge(spec), usage[spec.tenant],
                               policy.tenants[spec.tenant].quota.model_dump())
        placed = scheduler.place_one(request) if not refusal and hosts else None
        decisions[spec.name] = Decision(placed.host if placed else None, len(decisions) + 1,
                                        refusal or (placed.reason if placed else "no host is registered"))
        if placed is None or placed.host is None:
            return False
        usage[spec.tenant] = usage[spec.tenant] + tenant_charge(spec)
        host_used[placed.host] = host_used[placed.host] + host_footprint(spec)
        return True

    # Sorted by tenant (stably: each tenant's own requests stay in order), so that a tie goes to the first by name.
    ordered = sorted(specs, key=lambda s: s.tenant)
    outcome = progressive_filling(
        [placement_request(s, policy) for s in ordered], capacity, {t: policy.tenants[t].weight for t in usage},
        try_admit=admit, initial_usage={t: _charged(u) for t, u in usage.items()},
        amounts=[_charged(tenant_charge(s)) for s in ordered])
    return Plan(
        requests=tuple(PlannedRequest(s.name, s.tenant, s.vcpus, s.memory_mib, decisions[s.name]) for s in specs),
        hosts=tuple(PlannedHost(h.name, host_used[h.name], lim) for h, lim in zip(hosts, limits, strict=True)),
        tenants=tuple(PlannedTenant(t, policy.tenants[t].weight, round(outcome.weighted_shares.get(t, 0.0), 4),
                                    usage[t], policy.tenants[t].quota) for t in sorted(policy.tenants)),
    )


def _charged(usage: Usage) -> tuple[float, float, float, float]:
    """A tenant's charge in the scheduler's resource order, without disk (which the fairness does not count)."""
    return (usage.vcpus, usage.memory_mib, 0.0, usage.gpus)
