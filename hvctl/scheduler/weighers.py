"""Host weighers: rank the hosts that passed the filters; the highest total score wins.

Notation, for request j and host i: U is the set of resources the request asks for (q_r > 0), C_ir the
host's effective capacity of resource r, E_ir what is in use there (allocated + reserved + placed earlier
in this round), f_ir = (C_ir - E_ir) / C_ir the free fraction, and T the request's expected duration in
seconds (``reference_duration_s`` = 3600 when the request gives none, and never below
``min_duration_s`` = 60 so that a tiny duration cannot blow the score up).

* Node score (the project's S_i = (C_i - E_i) / T_i, normalised per resource and averaged over U, with T
  measured in units of the reference duration so that a request of default length scores in [0, 1])::

      S_i = (1 / |U|) * sum_{r in U} f_ir  /  (T / reference_duration_s)

  For one request T is the same for every host, so T does not reorder hosts on its own; it sets how
  much headroom counts against the pack or spread preference. Short-lived VMs lean towards hosts with
  room to spare, because they will be gone before any fragmentation they cause matters; long-lived VMs
  leave the decision to the policy.
* Pack (prefer the fullest host that fits): utilisation after placing the request,
  ``P_i = (1 / |U|) * sum_{r in U} (E_ir + q_r) / C_ir``.
* Spread (prefer the emptiest host): free fraction after placing, ``1 - P_i``.
* GPU conservation: ``G_i = -1`` when the request asks for no GPU and host i has GPUs, else 0, which
  keeps GPU hosts free for the requests that can only run there.

Total score: ``w_node * S_i + w_policy * (P_i or 1 - P_i) + w_gpu * G_i`` with the weights in
``WeigherWeights`` (defaults 1, 2, 0.5: with the default duration packing wins over headroom).

Every term is linear in per-host features (the f_ir, 1 / C_ir, a has-GPUs flag and a constant 1, kept up
to date in ``ClusterState.features``), so each weigher is reduced to one coefficient vector per request,
computed for a whole batch at once, and scoring all hosts is a single matrix-vector product. Each weigher
also bounds its term on hosts that pass the filters (node score: 1 / (T / reference_duration_s), the
others: 1), which lets the placer shift scores above zero and mask refused hosts by multiplication.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import numpy as np

from hvctl.scheduler.state import (
    FEATURE_CONSTANT,
    FEATURE_COUNT,
    FEATURE_FREE_FRACTION,
    FEATURE_HAS_GPUS,
    FEATURE_INVERSE_CAPACITY,
    GPUS,
    ClusterState,
    FloatArray,
)

PolicyMode = Literal["pack", "spread"]


def host_scores(coefficients: FloatArray, state: ClusterState) -> FloatArray:
    """Score of every host for one request, given that request's row of ``Weigher.coefficients``."""
    result: FloatArray = coefficients @ state.features.astype(np.float64)
    return result


def _used_share(demand: FloatArray) -> FloatArray:
    """1 / |U| for each resource a request uses and 0 elsewhere, shape (n_requests, RESOURCE_COUNT)."""
    uses = demand > 0
    counts = np.maximum(uses.sum(axis=1, keepdims=True), 1)
    share: FloatArray = uses / counts
    return share


class Weigher(ABC):
    name: str = "weigher"

    @abstractmethod
    def coefficients(self, demand: FloatArray, duration_s: FloatArray) -> FloatArray:
        """Coefficients over ``ClusterState.features`` for a batch, shape (n, FEATURE_COUNT).

        ``demand`` is (n, RESOURCE_COUNT); ``duration_s`` is (n,) with NaN where a request gave no
        expected duration.
        """

    def bounds(self, demand: FloatArray, duration_s: FloatArray) -> FloatArray:
        """For each request, a bound on the magnitude of its score on any host that passes the default
        filters, shape (n,). The placer relies on it to make masking branch-free.

        Every built-in term lies in [-1, 1] there, except the node score, which overrides this.
        """
        return np.ones(demand.shape[0])


@dataclass(frozen=True)
class NodeScoreWeigher(Weigher):
    """S_i: mean free fraction over the resources requested, divided by the duration in reference units."""

    reference_duration_s: float = 3600.0
    min_duration_s: float = 60.0
    name: str = "node score"

    def _duration_units(self, duration_s: FloatArray) -> FloatArray:
        duration = np.where(np.isnan(duration_s), self.reference_duration_s, duration_s)
        units: FloatArray = np.maximum(duration, self.min_duration_s) / self.reference_duration_s
        return units

    def coefficients(self, demand: FloatArray, duration_s: FloatArray) -> FloatArray:
        coefficients = np.zeros((demand.shape[0], FEATURE_COUNT))
        coefficients[:, FEATURE_FREE_FRACTION] = (
            _used_share(demand) / self._duration_units(duration_s)[:, None]
        )
        return coefficients

    def bounds(self, demand: FloatArray, duration_s: FloatArray) -> FloatArray:
        # A mean of free fractions lies in [0, 1] on a host with room for the request.
        return 1.0 / self._duration_units(duration_s)


@dataclass(frozen=True)
class PackWeigher(Weigher):
    """P_i: mean utilisation over the requested resources once the request is placed."""

    name: str = "pack"

    def coefficients(self, demand: FloatArray, duration_s: FloatArray) -> FloatArray:
        share = _used_share(demand)
        coefficients = np.zeros((demand.shape[0], FEATURE_COUNT))
        # (E + q) / C = 1 - f + q * (1 / C); the 1, averaged over U, lands on the constant feature.
        coefficients[:, FEATURE_FREE_FRACTION] = -share
        coefficients[:, FEATURE_INVERSE_CAPACITY] = share * demand
        coefficients[:, FEATURE_CONSTANT] = share.sum(axis=1)
        return coefficients


@dataclass(frozen=True)
class SpreadWeigher(Weigher):
    """1 - P_i: mean free fraction over the requested resources once the request is placed."""

    name: str = "spread"

    def coefficients(self, demand: FloatArray, duration_s: FloatArray) -> FloatArray:
        share = _used_share(demand)
        coefficients = np.zeros((demand.shape[0], FEATURE_COUNT))
        coefficients[:, FEATURE_FREE_FRACTION] = share
        coefficients[:, FEATURE_INVERSE_CAPACITY] = -share * demand
        return coefficients


@dataclass(frozen=True)
class GpuConservationWeigher(Weigher):
    """G_i: -1 on GPU hosts for requests that need no GPU."""

    name: str = "gpu conservation"

    def coefficients(self, demand: FloatArray, duration_s: FloatArray) -> FloatArray:
        coefficients = np.zeros((demand.shape[0], FEATURE_COUNT))
        coefficients[:, FEATURE_HAS_GPUS] = -(demand[:, GPUS] == 0).astype(np.float64)
        return coefficients


@dataclass(frozen=True)
class WeigherWeights:
    node_score: float = 1.0
    policy: float = 2.0
    gpu_conservation: float = 0.5


class CombinedWeigher(Weigher):
    """The weighted sum of the node score, the pack or spread policy and GPU conservation."""

    name = "combined"

    def __init__(
        self,
        policy_mode: PolicyMode = "pack",
        weights: WeigherWeights | None = None,
        node_score: NodeScoreWeigher | None = None,
    ) -> None:
        if policy_mode not in ("pack", "spread"):
            raise ValueError(f"policy_mode must be 'pack' or 'spread', not {policy_mode!r}")
        weights = weights or WeigherWeights()
        policy: Weigher = PackWeigher() if policy_mode == "pack" else SpreadWeigher()
        self.parts: tuple[tuple[float, Weigher], ...] = (
            (weights.node_score, node_score or NodeScoreWeigher()),
            (weights.policy, policy),
            (weights.gpu_conservation, GpuConservationWeigher()),
        )

    def coefficients(self, demand: FloatArray, duration_s: FloatArray) -> FloatArray:
        combined = np.zeros((demand.shape[0], FEATURE_COUNT))
        for weight, weigher in self.parts:
            if weight != 0:
                combined += weight * weigher.coefficients(demand, duration_s)
        return combined

    def bounds(self, demand: FloatArray, duration_s: FloatArray) -> FloatArray:
        total = np.zeros(demand.shape[0])
        for weight, weigher in self.parts:
            total += abs(weight) * weigher.bounds(demand, duration_s)
        return total
