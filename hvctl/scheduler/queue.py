"""The placer's working form of a batch of requests, and what it decides for each of them.

Requests are encoded once per batch into parallel lists and arrays (amounts as Python floats, weigher
coefficients, admission thresholds) so that the hot path never reads a pydantic model, and decisions are
recorded as plain numbers, turned into ``Placement`` models when the batch is done.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from hvctl.scheduler.model import Placement, PlacementRequest
from hvctl.scheduler.state import (
    FEATURE_CONSTANT,
    FEATURE_DTYPE,
    GPUS,
    AmountArray,
    EncodedRequest,
    ScoreArray,
    admission_thresholds,
    demand_matrix,
)
from hvctl.scheduler.weighers import Weigher

# Everything the built-in filters look at: amounts, GPU model, NUMA fit and anti-affinity group.
Shape = tuple[tuple[float, ...], str | None, bool, str | None]


class Outcomes:
    """What was decided for each request of a batch, kept as plain lists while the batch runs and turned
    into Placement models at the end: building a model per request inside the hot loop costs several
    times more than in a loop of its own, as the numpy passes in between evict the interpreter's data."""

    def __init__(self, items: list[PlacementRequest]) -> None:
        self.items = items
        self.hosts = [-1] * len(items)  # column of the chosen host, -1 while none
        self.scores = [0.0] * len(items)
        self.reasons: list[str] = [""] * len(items)

    def placements(self, names: Sequence[str]) -> list[Placement]:
        return [
            Placement(request_id=request.id, host=names[host], score=score)
            if host >= 0
            else Placement(request_id=request.id, host=None, reason=reason)
            for request, host, score, reason in zip(self.items, self.hosts, self.scores, self.reasons, strict=True)
        ]


class RequestQueue:
    """Requests placed strictly in order: the whole batch, or one tenant's share of it under DRF.

    Held as parallel lists rather than one EncodedRequest per request: the fast path reads the amounts
    and the coefficient row directly, and builds an EncodedRequest only for a request that needs a filter
    beyond capacity, or a refusal explained. What is decided goes to ``outcomes``, at ``rows[position]``.
    """

    def __init__(
        self,
        items: list[PlacementRequest],
        amounts: list[tuple[float, ...]],
        coefficients: ScoreArray,
        shifts: list[float],
        thresholds: AmountArray,
        first_row: int,
        outcomes: Outcomes | None = None,
        rows: list[int] | None = None,
        shapes: list[Shape] | None = None,
    ) -> None:
        self.items = items
        # Each request's resources as Python floats, in RESOURCES order (see EncodedRequest.amounts).
        self.amounts = amounts
        # Weigher coefficients, one row per request, with the score shift on the constant feature.
        self.coefficients = coefficients
        self.shifts = shifts
        # What the compared rows of ClusterState.admission, from ``first_row`` on, must reach on a host
        # that passes the enabled and capacity filters (see admission_thresholds).
        self.all_thresholds, self.first_row = thresholds, first_row
        self.thresholds = thresholds[:, first_row:]
        # Everything the built-in filters look at, and whether the request needs more than the fused ones.
        self.shapes: list[Shape] = shapes or [
            (a, r.gpu_model, r.numa_fit, r.anti_affinity_group) for a, r in zip(amounts, items, strict=True)
        ]
        self.special = [a[GPUS] > 0 or numa or group is not None for a, _, numa, group in self.shapes]
        self.outcomes = outcomes if outcomes is not None else Outcomes(items)
        self.rows = rows if rows is not None else list(range(len(items)))
        self.position = 0  # next request to place

    @classmethod
    def encode(
        cls, requests: Sequence[PlacementRequest], weigher: Weigher, dtype: npt.DTypeLike, first_row: int
    ) -> RequestQueue:
        """Encode requests, computing every weigher coefficient for the whole queue at once; ``dtype`` is
        that of ClusterState.admission, and ``first_row`` the first of its rows the placer compares."""
        demand = demand_matrix(requests)
        # None becomes NaN, which the weighers read as "no expected duration given".
        durations = np.array([r.expected_duration_s for r in requests], dtype=np.float64).reshape(-1)
        coefficients = weigher.coefficients(demand, durations)
        shifts = 1.0 + weigher.bounds(demand, durations)
        coefficients[:, FEATURE_CONSTANT] += shifts
        return cls(
            list(requests),
            list(map(tuple, demand.tolist())),
            coefficients.astype(FEATURE_DTYPE),
            [float(shift) for shift in shifts.tolist()],
            admission_thresholds(demand, dtype),
            first_row,
        )

    def subset(self, rows: list[int]) -> RequestQueue:
        """A queue of the given rows of this one, in that order, recording into the same outcomes."""
        index = np.array(rows, dtype=np.intp)
        return RequestQueue(
            [self.items[r] for r in rows],
            [self.amounts[r] for r in rows],
            self.coefficients[index],
            [self.shifts[r] for r in rows],
            self.all_thresholds[index],
            self.first_row,
            self.outcomes,
            [self.rows[r] for r in rows],
            [self.shapes[r] for r in rows],
        )

    def encoded(self, row: int) -> EncodedRequest:
        amounts = self.amounts[row]
        return EncodedRequest(
            self.items[row],
            amounts,
            tuple(a if a > 0 else -math.inf for a in amounts),
            self.coefficients[row],
            self.shifts[row],
        )

    @property
    def requests(self) -> list[EncodedRequest]:
        return [self.encoded(row) for row in range(len(self.items))]

    def placed(self, row: int, host: int, score: float) -> bool:
        outcome = self.rows[row]
        self.outcomes.hosts[outcome] = host
        self.outcomes.scores[outcome] = score
        return True

    def refused(self, row: int, reason: str) -> bool:
        self.outcomes.reasons[self.rows[row]] = reason
        return False
