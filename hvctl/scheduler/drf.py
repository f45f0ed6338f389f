"""Weighted Dominant Resource Fairness (Ghodsi et al., NSDI 2011) over queued requests.

A tenant's dominant share is the largest fraction of any one resource it holds: max_r usage_r / C_r
over the resources the cluster has (C_r > 0). Weighted DRF divides it by the tenant's weight, so a
tenant of weight 2 is entitled to twice the dominant share of a tenant of weight 1.

Progressive filling: repeatedly take the tenant with the lowest weighted dominant share that still has
requests queued and try to admit its next request (first in, first out within a tenant). If the request
is admitted the tenant is charged and its share grows; if not, the request is refused and the tenant
goes on to its next one. Within one round capacity only shrinks, so a request refused now could not be
admitted later in the round, and refusing it at once loses nothing.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from hvctl.scheduler.model import PlacementRequest, Resources

_Amounts = tuple[float, float, float, float]


@dataclass(frozen=True)
class DrfOutcome:
    admitted: tuple[str, ...]  # request ids, in the order they were admitted
    refused: tuple[str, ...]
    usage: Mapping[str, Resources]
    dominant_shares: Mapping[str, float]
    weighted_shares: Mapping[str, float]


class DrfLedger:
    """What each tenant holds, and its dominant share of a fixed cluster capacity."""

    def __init__(
        self,
        capacity: Resources | Sequence[float],
        weights: Mapping[str, float] | None = None,
        initial_usage: Mapping[str, Resources | Sequence[float]] | None = None,
    ) -> None:
        """``capacity`` and each tenant's ``initial_usage``: Resources, or amounts in the fixed resource order
        (vcpus, memory, disk, gpus), which may be fractional (a host's vCPUs under a 1.5 overcommit)."""
        for tenant, weight in (weights or {}).items():
            if weight <= 0:
                raise ValueError(f"tenant {tenant}: weight must be positive, not {weight}")
        self.weights = dict(weights or {})
        # Plain floats rather than numpy: four numbers per tenant are cheaper to handle one by one.
        self.capacity_amounts = tuple(float(c) for c in _amounts(capacity))
        # A resource the cluster has none of cannot define anyone's share, so its inverse is 0.
        self._inverse_capacity = tuple(1.0 / c if c > 0 else 0.0 for c in self.capacity_amounts)
        self._usage: dict[str, list[float]] = {}
        self._dominant: dict[str, float] = {}
        self._total = [0.0, 0.0, 0.0, 0.0]
        for tenant, used in (initial_usage or {}).items():
            self.charge_amounts(tenant, _amounts(used))

    def weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)

    def dominant_share(self, tenant: str) -> float:
        return self._dominant.get(tenant, 0.0)

    def weighted_share(self, tenant: str) -> float:
        return self._dominant.get(tenant, 0.0) / self.weights.get(tenant, 1.0)

    def charge(self, tenant: str, resources: Resources) -> None:
        self.charge_amounts(tenant, resources.as_tuple())

    def charge_amounts(self, tenant: str, amounts: Sequence[float]) -> None:
        """``charge`` for amounts already in the fixed resource order (vcpus, memory, disk, gpus)."""
        used = self._usage.setdefault(tenant, [0.0, 0.0, 0.0, 0.0])
        dominant = self._dominant.get(tenant, 0.0)
        total, inverse_capacity = self._total, self._inverse_capacity
        # Usage only grows, so the dominant share is the old one or a share of a resource just charged.
        for i, amount in enumerate(amounts):
            if amount:
                used[i] += amount
                total[i] += amount
                share = used[i] * inverse_capacity[i]
                if share > dominant:
                    dominant = share
        self._dominant[tenant] = dominant

    def total_usage(self) -> _Amounts:
        return (self._total[0], self._total[1], self._total[2], self._total[3])

    def usage(self, tenant: str) -> Resources:
        used = self._usage.get(tenant, [0.0, 0.0, 0.0, 0.0])
        return Resources(
            vcpus=int(used[0]), memory_mib=int(used[1]), disk_gib=int(used[2]), gpus=int(used[3])
        )

    def tenants(self) -> list[str]:
        return list(self._usage)


def progressive_filling(
    requests: Sequence[PlacementRequest],
    capacity: Resources | Sequence[float],
    weights: Mapping[str, float] | None = None,
    *,
    try_admit: Callable[[PlacementRequest], bool] | None = None,
    initial_usage: Mapping[str, Resources | Sequence[float]] | None = None,
    amounts: Sequence[Sequence[float]] | None = None,
    admit_next: Mapping[str, Callable[[], bool]] | None = None,
) -> DrfOutcome:
    """Admit ``requests`` in weighted-DRF order.

    ``try_admit`` decides whether a request can really be admitted (the placer passes one that places it
    on a host); by default a request is admitted when it fits in the cluster's remaining aggregate
    capacity. Ties between tenants go to the tenant whose first request came first.

    For callers that keep each tenant's requests in a queue of their own, ``admit_next`` replaces
    ``try_admit``: for every tenant, a function that tries to admit that tenant's next request, which is
    always the one this function would pass to ``try_admit``. ``amounts``, when given, holds each
    request's ``resources.as_tuple()`` already. Both save work per request in large batches.
    """
    ledger = DrfLedger(capacity, weights, initial_usage)
    if amounts is None:
        amounts = [r.resources.as_tuple() for r in requests]
    queues: dict[str, list[PlacementRequest]] = {}
    for request in requests:
        queues.setdefault(request.tenant, []).append(request)
    tenants = list(queues)
    if admit_next is None:
        admit = try_admit if try_admit is not None else _aggregate_fit(ledger)
        admit_next = {t: _in_order(admit, queues[t]) for t in tenants}
    # Everything the loop reads, by the tenant's arrival rank: its ids, amounts and admission function.
    rows_of: dict[str, list[int]] = {t: [] for t in tenants}
    for row, request in enumerate(requests):
        rows_of[request.tenant].append(row)
    queued = [[(requests[row].id, amounts[row]) for row in rows_of[t]] for t in tenants]
    admits = [admit_next[t] for t in tenants]
    tenant_weights = [ledger.weight(t) for t in tenants]
    dominant = ledger._dominant

    # Heap entries are (weighted share, arrival rank, position of the tenant's next request); ranks are
    # unique, so the position never decides. The shares are ``weighted_share``, inlined.
    heap = [(ledger.weighted_share(t), rank, 0) for rank, t in enumerate(tenants)]
    heapq.heapify(heap)
    charge, heappop, heappush = ledger.charge_amounts, heapq.heappop, heapq.heappush
    admitted: list[str] = []
    refused: list[str] = []
    while heap:
        _, rank, position = heappop(heap)
        queue = queued[rank]
        request_id, asked = queue[position]
        tenant = tenants[rank]
        if admits[rank]():
            charge(tenant, asked)
            admitted.append(request_id)
        else:
            refused.append(request_id)
        if position + 1 < len(queue):
            heappush(heap, (dominant.get(tenant, 0.0) / tenant_weights[rank], rank, position + 1))

    everyone = list(dict.fromkeys([*ledger.tenants(), *tenants]))
    return DrfOutcome(
        admitted=tuple(admitted),
        refused=tuple(refused),
        usage={t: ledger.usage(t) for t in everyone},
        dominant_shares={t: ledger.dominant_share(t) for t in everyone},
        weighted_shares={t: ledger.weighted_share(t) for t in everyone},
    )


def _amounts(resources: Resources | Sequence[float]) -> Sequence[float]:
    return resources.as_tuple() if isinstance(resources, Resources) else resources


def _in_order(admit: Callable[[PlacementRequest], bool], queue: list[PlacementRequest]) -> Callable[[], bool]:
    """``admit`` applied to the requests of ``queue`` one after the other, a call at a time."""
    following = iter(queue)
    return lambda: admit(next(following))


def _aggregate_fit(ledger: DrfLedger) -> Callable[[PlacementRequest], bool]:
    def fits(request: PlacementRequest) -> bool:
        used = ledger.total_usage()
        capacity = ledger.capacity_amounts
        return all(used[i] + amount <= capacity[i] for i, amount in enumerate(request.resources.as_tuple()))

    return fits
