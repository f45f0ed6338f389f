"""The scheduler's working copy of the cluster, held as numpy arrays.

Resource arrays have one row per resource (in ``RESOURCES`` order) and one column per host, so that a
filter or weigher touches every host with a single array operation and placing a VM only rewrites one
column.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from hvctl.scheduler.model import FLOOR_TOLERANCE, HostInventory, NumaCell, PlacementRequest, Resources

FloatArray = npt.NDArray[np.float64]
# Free amounts are whole numbers held in floating point: float32 when every amount is below 2**24 (where
# float32 represents every integer exactly) and float64 otherwise. Comparing float32 halves the memory
# the capacity filter reads, its largest cost.
AmountArray = npt.NDArray[np.float32] | npt.NDArray[np.float64]
_FLOAT32_EXACT_BELOW = 2.0**24
BoolArray = npt.NDArray[np.bool_]
ScoreArray = npt.NDArray[np.float32]

RESOURCES = ("vcpus", "memory_mib", "disk_gib", "gpus")
RESOURCE_LABELS = ("vcpus", "memory", "disk", "gpus")
RESOURCE_UNITS = ("", " MiB", " GiB", "")
VCPUS, MEMORY, DISK, GPUS = range(len(RESOURCES))
RESOURCE_COUNT = len(RESOURCES)

# Rows of ``ClusterState.features``, the per-host quantities that every weigher is a linear function of,
# indexed by resource where there is one row per resource. The GPU rows come last so that a request
# without GPUs, the common case, is scored from a contiguous prefix of the rows.
FEATURE_FREE_FRACTION = [0, 1, 2, 8]
FEATURE_INVERSE_CAPACITY = [3, 4, 5, 9]
FEATURE_HAS_GPUS = 6
# A row of ones, for each weigher's constant term.
FEATURE_CONSTANT = 7
SCORED_ROWS_WITHOUT_GPUS = 8
FEATURE_COUNT = 10
# Scores are compared, never accumulated, so single precision is plenty and halves the memory traffic
# of the largest array the hot path reads.
FEATURE_DTYPE = np.float32


@dataclass(frozen=True, slots=True)
class EncodedRequest:
    """A request translated once into the vectors the hot path needs."""

    request: PlacementRequest
    # Amount asked for of each resource, as Python floats: they are compared with float32 arrays, and a
    # numpy float64 scalar would force every comparison up to float64, while a Python float adapts.
    amounts: tuple[float, ...]
    # Same as ``amounts`` but -inf where nothing is asked for, so that a capacity check passes hosts that
    # are over-allocated on a resource the request does not use.
    required: tuple[float, ...]
    # Weigher coefficients over the feature rows; the score of every host is ``coefficients @ features``.
    coefficients: ScoreArray
    # Added to every host's score through the constant feature so that each host passing the filters
    # scores above zero (see ``Weigher.bounds``); subtracted again before a score is reported.
    score_shift: float


def demand_matrix(requests: Sequence[PlacementRequest]) -> FloatArray:
    """Stack the requests' resources into an (n_requests, RESOURCE_COUNT) array."""
    return np.array([r.resources.as_tuple() for r in requests], dtype=np.float64).reshape(-1, RESOURCE_COUNT)


def _resource_rows(values: Sequence[Resources]) -> FloatArray:
    return np.array([v.as_tuple() for v in values], dtype=np.float64).reshape(-1, RESOURCE_COUNT).T.copy()


def effective_capacity_rows(hosts: Sequence[HostInventory]) -> FloatArray:
    """``HostInventory.effective_capacity`` for many hosts at once, shape (RESOURCE_COUNT, n_hosts).

    The same IEEE operations in the same order as the scalar method, so the results are identical; the
    vectorised form matters because building the state is part of every placement round.
    """
    capacity = _resource_rows([h.capacity for h in hosts])
    kept_back = _resource_rows([h.host_reserve for h in hosts])
    overcommit = np.ones_like(capacity)
    overcommit[VCPUS] = [h.cpu_overcommit for h in hosts]
    overcommit[MEMORY] = [h.mem_overcommit for h in hosts]
    usable: FloatArray = np.maximum(0.0, np.floor((capacity - kept_back) * overcommit + FLOOR_TOLERANCE))
    return usable


class ClusterState:
    """Mutable, vectorised view of a list of hosts; ``commit`` records a placement."""

    def __init__(self, hosts: Sequence[HostInventory]) -> None:
        names = [h.name for h in hosts]
        if len(set(names)) != len(names):
            raise ValueError("host names must be unique")
        self.hosts = list(hosts)
        self.names = names
        self.index_of = {name: i for i, name in enumerate(names)}
        host_count = len(hosts)

        self.capacity = effective_capacity_rows(hosts)
        in_use = _resource_rows([h.allocated for h in hosts]) + _resource_rows([h.reserved for h in hosts])
        free = self.capacity - in_use
        exact_in_float32 = max(np.abs(self.capacity).max(initial=0), np.abs(in_use).max(initial=0)) < (
            _FLOAT32_EXACT_BELOW
        )
        self.free: AmountArray = free.astype(np.float32) if exact_in_float32 else free
        # Kept to report what this state placed, without charging a second array on every commit.
        self.initial_free = self.free.copy()
        # A lower bound on every host's free amount of each resource (free only shrinks, so keeping it
        # is one comparison per commit). A request within it fits every host on that resource, and the
        # capacity filter can skip comparing it, which for disk is nearly always.
        self.least_free = [float(v) for v in free.min(axis=1, initial=np.inf)]
        # Hosts without any of a resource get 0 rather than inf: they can never pass a filter for it,
        # and 0 keeps the weigher arithmetic finite.
        self.inverse_capacity = np.divide(
            1.0, self.capacity, out=np.zeros_like(self.capacity), where=self.capacity > 0
        )
        self.enabled: BoolArray = np.array([h.enabled for h in hosts], dtype=np.bool_)

        models = sorted({m for h in hosts for m in h.gpu_models})
        self.gpu_model_row = {m: i for i, m in enumerate(models)}
        self.gpu_model_free = np.zeros((len(models), host_count), dtype=np.float64)
        self.gpu_model_listed = np.zeros((len(models), host_count), dtype=np.bool_)
        for column, host in enumerate(hosts):
            for model, free_gpus in host.gpu_models.items():
                self.gpu_model_free[self.gpu_model_row[model], column] = free_gpus
                self.gpu_model_listed[self.gpu_model_row[model], column] = True

        # Hosts with fewer cells are padded with empty cells, which can never fit anything.
        cell_count = max((len(h.numa_cells) for h in hosts), default=0)
        self.numa_cell_count = np.array([len(h.numa_cells) for h in hosts], dtype=np.int64)
        padding = (0, 0)
        cells = np.array(
            [
                [(c.free_vcpus, c.free_memory_mib) for c in h.numa_cells]
                + [padding] * (cell_count - len(h.numa_cells))
                for h in hosts
            ],
            dtype=np.float64,
        ).reshape(host_count, cell_count, 2)
        self.numa_vcpus: FloatArray = cells[:, :, 0].T.copy()
        self.numa_memory: FloatArray = cells[:, :, 1].T.copy()

        self.group_hosts: dict[str, BoolArray] = {}
        for column, host in enumerate(hosts):
            for group in host.anti_affinity_groups:
                self.group_hosts.setdefault(group, np.zeros(host_count, dtype=np.bool_))[column] = True

        self.features = np.zeros((FEATURE_COUNT, host_count), dtype=FEATURE_DTYPE)
        self.features[FEATURE_FREE_FRACTION] = free * self.inverse_capacity
        self.features[FEATURE_INVERSE_CAPACITY] = self.inverse_capacity
        self.features[FEATURE_HAS_GPUS] = self.capacity[GPUS] > 0
        self.features[FEATURE_CONSTANT] = 1.0

    @property
    def host_count(self) -> int:
        return len(self.names)

    def in_use(self, resource: int, host: int) -> int:
        """Running, reserved and newly placed amount of ``resource`` on ``host``."""
        return int(self.capacity[resource, host] - self.free[resource, host])

    def total_capacity(self) -> Resources:
        """Sum of effective capacity over enabled hosts: the pool that fair shares are measured against."""
        totals = self.capacity[:, self.enabled].sum(axis=1)
        return Resources(**{name: int(total) for name, total in zip(RESOURCES, totals, strict=True)})

    def commit(self, host: int, encoded: EncodedRequest) -> None:
        """Charge a placed request to ``host`` in every array the filters and weighers read."""
        amounts = encoded.amounts
        request = encoded.request
        free, features, inverse_capacity = self.free, self.features, self.inverse_capacity
        # Element by element: for four numbers this is several times faster than column slicing, and
        # Python floats throughout (``item``): numpy scalars of mixed precision are several times slower.
        for resource, amount in enumerate(amounts):
            if amount:
                left = free.item(resource, host) - amount
                free[resource, host] = left
                if left < self.least_free[resource]:
                    self.least_free[resource] = left
                features[FEATURE_FREE_FRACTION[resource], host] = left * inverse_capacity.item(resource, host)

        gpus = amounts[GPUS]
        if gpus > 0 and self.gpu_model_free.shape[0] > 0:
            self._take_gpus(host, gpus, request.gpu_model)
        if request.numa_fit and self.numa_vcpus.shape[0] > 0:
            self._take_numa_cell(host, amounts[VCPUS], amounts[MEMORY])
        if request.anti_affinity_group is not None:
            members = self.group_hosts.setdefault(
                request.anti_affinity_group, np.zeros(self.host_count, dtype=np.bool_)
            )
            members[host] = True

    def _take_gpus(self, host: int, gpus: float, model: str | None) -> None:
        if model is not None:
            self.gpu_model_free[self.gpu_model_row[model], host] -= gpus
            return
        # Any model will do: draw from the models with the most free GPUs first, which keeps a VM's
        # GPUs on one model whenever that is possible.
        remaining = gpus
        for row in np.argsort(-self.gpu_model_free[:, host], kind="stable"):
            taken = min(remaining, self.gpu_model_free[row, host])
            self.gpu_model_free[row, host] -= taken
            remaining -= taken
            if remaining <= 0:
                break

    def _take_numa_cell(self, host: int, vcpus: float, memory: float) -> None:
        # Best fit: the fitting cell with the fewest vCPUs left over, so large cells stay whole for
        # large pinned VMs.
        fits = (self.numa_vcpus[:, host] >= vcpus) & (self.numa_memory[:, host] >= memory)
        leftover = np.where(fits, self.numa_vcpus[:, host] - vcpus, np.inf)
        cell = int(np.argmin(leftover))
        if fits[cell]:
            self.numa_vcpus[cell, host] -= vcpus
            self.numa_memory[cell, host] -= memory

    def to_inventory(self) -> list[HostInventory]:
        """The hosts as they stand after the placements committed so far."""
        updated = []
        for column, host in enumerate(self.hosts):
            placed_here = self.initial_free[:, column] - self.free[:, column]
            placed = Resources(**{name: int(v) for name, v in zip(RESOURCES, placed_here, strict=True)})
            gpu_models = {
                model: int(self.gpu_model_free[row, column])
                for model, row in self.gpu_model_row.items()
                if self.gpu_model_listed[row, column]
            }
            cells = tuple(
                NumaCell(
                    free_vcpus=int(self.numa_vcpus[cell, column]),
                    free_memory_mib=int(self.numa_memory[cell, column]),
                )
                for cell in range(int(self.numa_cell_count[column]))
            )
            groups = frozenset(g for g, members in self.group_hosts.items() if members[column])
            updated.append(
                host.model_copy(
                    update={
                        "allocated": host.allocated + placed,
                        "gpu_models": gpu_models,
                        "numa_cells": cells,
                        "anti_affinity_groups": groups,
                    }
                )
            )
        return updated
