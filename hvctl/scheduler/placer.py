"""Place VMs on hosts: filter, weigh, pick the best host, charge it, repeat.

Each request costs a fixed handful of numpy operations over all hosts: the filter masks, one
matrix-vector product for the scores of every host (the weighers are linear in per-host features, see
``weighers``), a branch-free mask and one argmax. There is no Python loop over hosts, so a round is
O(requests x hosts) in vectorised work plus O(requests) in Python, and placing a request rewrites one
column of the state.

With the default filters a request takes the fast path (``_place_fast``): the enabled and capacity
filters and the GPU count are one comparison of a few rows (see ``ClusterState.admission``) and one AND
of those rows, every array operation writes into a preallocated buffer, and nothing is read from a
pydantic model or built as one until the batch is done (see ``queue``). Any other filter set takes the
general path (``_place_next``), which asks each filter for its mask. Both make the same decisions, down
to the bits of the scores; the tests hold them to it.

Scoring several queued requests with one matrix-matrix product was tried and dropped: on small shared
machines multi-threaded BLAS made it slower and erratic, and correcting the rows for hosts placed on in
the meantime cost as much as computing them afresh.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping, Sequence
from functools import partial

import numpy as np

from hvctl.scheduler.drf import DrfOutcome, progressive_filling
from hvctl.scheduler.filters import (
    CapacityFilter,
    HostEnabledFilter,
    HostFilter,
    combined_mask,
    default_filters,
    describe_refusal,
)
from hvctl.scheduler.model import HostInventory, Placement, PlacementRequest, Resources
from hvctl.scheduler.queue import RequestQueue, Shape
from hvctl.scheduler.state import (
    ADMISSION_COMPARED,
    ADMISSION_ENABLED,
    ADMISSION_FREE,
    FEATURE_COUNT,
    FEATURE_DTYPE,
    GPUS,
    SCORED_ROWS_WITHOUT_GPUS,
    BoolArray,
    ClusterState,
    EncodedRequest,
    ScoreArray,
)
from hvctl.scheduler.weighers import CombinedWeigher, NodeScoreWeigher, PolicyMode, WeigherWeights

_SHAPE_ONLY_FILTERS = {type(f) for f in default_filters()}
# Filters the fast path evaluates itself rather than through their ``mask``.
_FUSED_FILTERS = {HostEnabledFilter, CapacityFilter}


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
        self.state = state = ClusterState(hosts)
        self.filters = tuple(filters) if filters is not None else default_filters()
        self.weigher = CombinedWeigher(policy_mode, weights, node_score)
        # The fairness bookkeeping of the last DRF-ordered round, for callers that report on it.
        self.last_drf: DrfOutcome | None = None
        # Requests no host could take, by shape, with the id and reason of the first one. Hosts only
        # fill up (this scheduler never frees anything), so a later request of the same shape is refused
        # too, and saying so at once keeps a saturated cluster from costing a full scan per request.
        # That holds only for filters that look at nothing but the shape, so custom filters turn it off.
        self._refused_shapes: dict[Shape, tuple[str, str]] = {}
        self._remember_refusals = all(type(f) in _SHAPE_ONLY_FILTERS for f in self.filters)

        # The fast path fuses the enabled and capacity filters, so it needs exactly the default ones.
        self._fast = [type(f) for f in self.filters] == [type(f) for f in default_filters()]
        self._other_filters = tuple(f for f in self.filters if type(f) not in _FUSED_FILTERS)
        self._host_count = state.host_count
        # Views of the state's arrays, which are updated in place and never replaced, and buffers the
        # fast path writes into, so that placing a request allocates no host-sized array.
        self._features = state.features
        self._features_without_gpus = state.features[:SCORED_ROWS_WITHOUT_GPUS]
        self._scores: ScoreArray = np.empty(self._host_count, dtype=FEATURE_DTYPE)
        # Comparisons of the admission rows go to ``admitted``, whose rows are padded to whole 64-bit words
        # (with False) so that they can be ANDed eight hosts at a time into ``_mask_words``. The enabled
        # row is only compared when some host is disabled. GpuFilter, which the fast path leaves to its
        # own mask for the GPU model, checks the GPU count too.
        words = -(-self._host_count // 8)
        admitted = np.zeros((ADMISSION_COMPARED, 8 * words), dtype=np.bool_)
        admitted_words = admitted.view(np.uint64)
        self._mask_words = np.zeros(words, dtype=np.uint64)
        self._mask: BoolArray = self._mask_words.view(np.bool_)[: self._host_count]
        self._first_row = ADMISSION_FREE if state.enabled.all() else ADMISSION_ENABLED
        rows = slice(self._first_row, ADMISSION_COMPARED)
        self._compared = state.admission[rows]
        self._admitted = admitted[rows, : self._host_count]
        self._admitted_words = admitted_words[rows]

    def place_one(self, request: PlacementRequest) -> Placement:
        queue = self._queue([request])
        if self._fast:
            self._place_fast(queue)
        else:
            self._place_next(queue)
        return queue.outcomes.placements(self.state.names)[0]

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
        place_next = self._place_fast if self._fast else self._place_next
        batch = self._queue(requests)
        if tenant_weights is None:
            for _ in requests:
                place_next(batch)
            return batch.outcomes.placements(self.state.names)

        if len({r.id for r in requests}) != len(requests):
            raise ValueError("request ids must be unique when ordering by DRF")
        rows_of: dict[str, list[int]] = {}
        for row, request in enumerate(requests):
            rows_of.setdefault(request.tenant, []).append(row)
        # Encoded once for the batch, then split: the coefficients are computed row by row, so a tenant's
        # rows are the same as if its requests had been encoded alone.
        # progressive_filling serves each tenant first in, first out, just as its queue is built.
        self.last_drf = progressive_filling(
            requests,
            self.state.total_capacity(),
            tenant_weights,
            initial_usage=tenant_usage,
            amounts=batch.amounts,
            admit_next={tenant: partial(place_next, batch.subset(rows)) for tenant, rows in rows_of.items()},
        )
        return batch.outcomes.placements(self.state.names)

    def inventory(self) -> list[HostInventory]:
        """The hosts as they stand after every placement made so far."""
        return self.state.to_inventory()

    def _queue(self, requests: Sequence[PlacementRequest]) -> RequestQueue:
        """Encode requests, computing every weigher coefficient for the whole queue at once."""
        return RequestQueue.encode(requests, self.weigher, self.state.admission.dtype, self._first_row)

    def _place_next(self, queue: RequestQueue) -> bool:
        """Place the queue's next request through every filter's own mask (any filters)."""
        state = self.state
        row = queue.position
        queue.position += 1
        encoded = queue.encoded(row)
        request_id = encoded.request.id
        if state.host_count == 0:
            return queue.refused(row, f"no hosts to place {request_id} on")
        shape = queue.shapes[row]
        refused_before = self._refused_shapes.get(shape)
        if refused_before is not None:
            return queue.refused(row, _refused_again(refused_before))

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
        if passing is not None and not passing[best]:
            return self._refused_best(queue, row, encoded, scores, passing)
        state.commit(best, encoded)
        return queue.placed(row, best, float(scores[best]) - encoded.score_shift)

    def _place_fast(self, queue: RequestQueue) -> bool:
        """``_place_next`` for the default filters: the same decisions with far less overhead."""
        row = queue.position
        queue.position = row + 1
        if not self._host_count:
            return queue.refused(row, f"no hosts to place {queue.items[row].id} on")
        shape = queue.shapes[row]
        refused_before = self._refused_shapes.get(shape)
        if refused_before is not None:
            return queue.refused(row, _refused_again(refused_before))
        amounts = shape[0]
        gpus = amounts[GPUS]

        # HostEnabledFilter and CapacityFilter: one comparison of the enabled row and the free vCPUs,
        # memory and disk with what the request needs, and an AND down the rows, eight hosts to a word.
        np.greater_equal(self._compared, queue.thresholds[row], out=self._admitted)
        np.bitwise_and.reduce(self._admitted_words, axis=0, out=self._mask_words)
        mask = self._mask
        if queue.special[row]:
            encoded = queue.encoded(row)
            for host_filter in self._other_filters:
                if host_filter.applies(encoded):
                    np.logical_and(mask, host_filter.mask(self.state, encoded), out=mask)

        # The same products as ``_place_next``, written into the preallocated buffer.
        scores = self._scores
        if gpus:
            np.dot(queue.coefficients[row], self._features, out=scores)
        else:
            np.dot(queue.coefficients[row, :SCORED_ROWS_WITHOUT_GPUS], self._features_without_gpus, out=scores)
        np.multiply(scores, mask, out=scores)
        best = int(scores.argmax())
        if not mask[best]:
            return self._refused_best(queue, row, queue.encoded(row), scores, mask)
        self.state.charge(best, amounts, queue.items[row])
        return queue.placed(row, best, scores.item(best) - queue.shifts[row])

    def _refused_best(
        self, queue: RequestQueue, row: int, encoded: EncodedRequest, scores: ScoreArray, passing: BoolArray
    ) -> bool:
        """The best-scoring host is refused: take the best host that passes, or explain the refusal."""
        state = self.state
        if passing.any():
            # Only reachable if a custom filter lets through a host outside the weighers' bounds.
            scores = np.where(passing, scores, -np.inf)
            best = int(scores.argmax())
            state.commit(best, encoded)
            return queue.placed(row, best, float(scores[best]) - encoded.score_shift)
        reason = describe_refusal(state, encoded, self.filters)
        if self._remember_refusals:
            self._refused_shapes[queue.shapes[row]] = (encoded.request.id, reason)
        return queue.refused(row, reason)


def _refused_again(refused_before: tuple[str, str]) -> str:
    first_id, reason = refused_before
    return f"same shape as {first_id}, which was refused: {reason}"


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
