"""Place VMs on hosts: filter, weigh, pick the best host, charge it, repeat.

Each request costs a fixed handful of numpy operations over all hosts: the filter masks, one
matrix-vector product for the scores of every host (the weighers are linear in per-host features, see
``weighers``), a branch-free mask and one argmax. There is no Python loop over hosts, so a round is
O(requests x hosts) in vectorised work plus O(requests) in Python, and placing a request rewrites one
column of the state.

Scoring several queued requests with one matrix-matrix product was tried and dropped: on small shared
machines multi-threaded BLAS made it slower and erratic, and correcting the rows for hosts placed on in
the meantime cost as much as computing them afresh.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from hvctl.scheduler.drf import DrfOutcome, progressive_filling
from hvctl.scheduler.filters import HostFilter, combined_mask, default_filters, describe_refusal
from hvctl.scheduler.model import HostInventory, Placement, PlacementRequest, Resources
from hvctl.scheduler.state import (
    FEATURE_CONSTANT,
    FEATURE_COUNT,
    FEATURE_DTYPE,
    GPUS,
    SCORED_ROWS_WITHOUT_GPUS,
    ClusterState,
    EncodedRequest,
    ScoreArray,
    demand_matrix,
)
from hvctl.scheduler.weighers import CombinedWeigher, NodeScoreWeigher, PolicyMode, WeigherWeights

# Everything the built-in filters look at: amounts, GPU model, NUMA fit and anti-affinity group.
_Shape = tuple[tuple[float, ...], str | None, bool, str | None]
_SHAPE_ONLY_FILTERS = {type(f) for f in default_filters()}


@dataclass
class _Queue:
    """Requests placed strictly in order: the whole batch, or one tenant's share of it under DRF."""

    requests: list[EncodedRequest]
    position: int = 0  # next request to place


class Scheduler:
    """Holds the cluster state across calls, so successive placements see each other."""

    def __init__(
        self,
        hosts: Sequence[HostInventory],
        policy_mode: PolicyMode = "pack",
        *,
        weights: WeigherWeights | None = None,
        filters: Sequence[HostFilter] | None = None,
        node_score: NodeScoreWeigher | None = None,
    ) -> None:
        self.state = ClusterState(hosts)
        self.filters = tuple(filters) if filters is not None else default_filters()
        self.weigher = CombinedWeigher(policy_mode, weights, node_score)
        # The fairness bookkeeping of the last DRF-ordered round, for callers that report on it.
        self.last_drf: DrfOutcome | None = None
        # Requests no host could take, by shape, with the id and reason of the first one. Hosts only
        # fill up (this scheduler never frees anything), so a later request of the same shape is refused
        # too, and saying so at once keeps a saturated cluster from costing a full scan per request.
        # That holds only for filters that look at nothing but the shape, so custom filters turn it off.
        self._refused_shapes: dict[_Shape, tuple[str, str]] = {}
        self._remember_refusals = all(type(f) in _SHAPE_ONLY_FILTERS for f in self.filters)

    def place_one(self, request: PlacementRequest) -> Placement:
        return self._place_next(self._queue([request]))

    def place(
        self,
        requests: Sequence[PlacementRequest],
        tenant_weights: Mapping[str, float] | None = None,
        tenant_usage: Mapping[str, Resources] | None = None,
    ) -> list[Placement]:
        """Place a batch; the result lists one Placement per request, in the order given.

        Without ``tenant_weights`` requests are tried first come, first served. With them (an empty
        mapping means equal weights) they are tried in weighted DRF order across tenants, where a
        request counts as admitted only if it really lands on a host, so fragmentation cannot make the
        fairness bookkeeping drift from what was placed. ``tenant_usage`` is what tenants already hold.
        """
        # A batch allocates many small objects while the heap already holds every host and request
        # model, so the cyclic collector would rescan all of those again and again, for nothing: what
        # the batch allocates is freed by reference counting. It is paused for the batch only.
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._place_batch(requests, tenant_weights, tenant_usage)
        finally:
            if collecting:
                gc.enable()

    def _place_batch(
        self,
        requests: Sequence[PlacementRequest],
        tenant_weights: Mapping[str, float] | None,
        tenant_usage: Mapping[str, Resources] | None,
    ) -> list[Placement]:
        if tenant_weights is None:
            queue = self._queue(requests)
            return [self._place_next(queue) for _ in requests]

        row_of = {request.id: row for row, request in enumerate(requests)}
        if len(row_of) != len(requests):
            raise ValueError("request ids must be unique when ordering by DRF")
        by_tenant: dict[str, list[PlacementRequest]] = {}
        for request in requests:
            by_tenant.setdefault(request.tenant, []).append(request)
        queues = {tenant: self._queue(queued) for tenant, queued in by_tenant.items()}
        results: list[Placement | None] = [None] * len(requests)

        def try_admit(request: PlacementRequest) -> bool:
            queue = queues[request.tenant]
            # progressive_filling serves each tenant first in, first out, exactly as the queue is built.
            if queue.requests[queue.position].request is not request:
                raise RuntimeError(f"DRF offered {request.id} out of its tenant's order")
            placement = self._place_next(queue)
            results[row_of[request.id]] = placement
            return placement.host is not None

        self.last_drf = progressive_filling(
            requests,
            self.state.total_capacity(),
            tenant_weights,
            try_admit=try_admit,
            initial_usage=tenant_usage,
        )
        return [p for p in results if p is not None]

    def inventory(self) -> list[HostInventory]:
        """The hosts as they stand after every placement made so far."""
        return self.state.to_inventory()

    def _queue(self, requests: Sequence[PlacementRequest]) -> _Queue:
        """Encode requests, computing every weigher coefficient for the whole queue at once."""
        demand = demand_matrix(requests)
        durations = np.array(
            [np.nan if r.expected_duration_s is None else r.expected_duration_s for r in requests],
            dtype=np.float64,
        ).reshape(-1)
        coefficients = self.weigher.coefficients(demand, durations)
        shifts = 1.0 + self.weigher.bounds(demand, durations)
        coefficients[:, FEATURE_CONSTANT] += shifts
        coefficients = coefficients.astype(FEATURE_DTYPE)
        amounts = demand.tolist()
        return _Queue(
            [
                EncodedRequest(
                    request,
                    tuple(amounts[row]),
                    tuple(a if a > 0 else -math.inf for a in amounts[row]),
                    coefficients[row],
                    float(shifts[row]),
                )
                for row, request in enumerate(requests)
            ]
        )

    def _place_next(self, queue: _Queue) -> Placement:
        state = self.state
        encoded = queue.requests[queue.position]
        queue.position += 1
        request = encoded.request
        request_id = request.id
        if state.host_count == 0:
            return Placement(request_id=request_id, host=None, reason=f"no hosts to place {request_id} on")
        shape = (encoded.amounts, request.gpu_model, request.numa_fit, request.anti_affinity_group)
        refused_before = self._refused_shapes.get(shape)
        if refused_before is not None:
            first_id, reason = refused_before
            return Placement(
                request_id=request_id,
                host=None,
                reason=f"same shape as {first_id}, which was refused: {reason}",
            )

        # GPU rows sit at the end of the features, so requests without GPUs multiply fewer rows.
        rows = FEATURE_COUNT if encoded.amounts[GPUS] else SCORED_ROWS_WITHOUT_GPUS
        scores: ScoreArray = encoded.coefficients[:rows] @ state.features[:rows]
        passing = combined_mask(state, encoded, self.filters)
        if passing is not None:
            # Masking by multiplication: np.where and masked copies branch on every element, and with
            # an unpredictable mask that made them the slowest step. The score shift puts every host
            # that passes above zero, so refused hosts, now exactly zero, cannot win.
            np.multiply(scores, passing, out=scores)
        best = int(scores.argmax())
        if passing is not None and not passing[best] and passing.any():
            # Only reachable if a custom filter lets through a host outside the weighers' bounds.
            scores = np.where(passing, scores, -np.inf)
            best = int(scores.argmax())
        if passing is not None and not passing[best]:
            reason = describe_refusal(state, encoded, self.filters)
            if self._remember_refusals:
                self._refused_shapes[shape] = (request_id, reason)
            return Placement(request_id=request_id, host=None, reason=reason)
        state.commit(best, encoded)
        score = float(scores[best]) - encoded.score_shift
        return Placement(request_id=request_id, host=state.names[best], score=score)


def place(
    hosts: Sequence[HostInventory],
    requests: Sequence[PlacementRequest],
    policy_mode: PolicyMode = "pack",
    *,
    tenant_weights: Mapping[str, float] | None = None,
    tenant_usage: Mapping[str, Resources] | None = None,
    weights: WeigherWeights | None = None,
) -> list[Placement]:
    """Place a batch of requests on ``hosts`` (see ``Scheduler.place``)."""
    scheduler = Scheduler(hosts, policy_mode, weights=weights)
    return scheduler.place(requests, tenant_weights, tenant_usage)


def place_one(
    hosts: Sequence[HostInventory],
    request: PlacementRequest,
    policy_mode: PolicyMode = "pack",
    *,
    weights: WeigherWeights | None = None,
) -> Placement:
    """Place a single request on ``hosts``."""
    return Scheduler(hosts, policy_mode, weights=weights).place_one(request)
