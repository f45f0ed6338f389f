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
_RESOURCE_INDICES = tuple(range(RESOURCE_COUNT))
# Rows of ``ClusterState.admission``: whether the host is enabled, then the free amount of each resource.
ADMISSION_ENABLED = 0
ADMISSION_FREE = 1
ADMISSION_ROWS = ADMISSION_FREE + RESOURCE_COUNT
# The rows the placer's fast path compares: enabled, then what CapacityFilter checks (the GPUs are left to
# GpuFilter, which checks them with their model).
ADMISSION_COMPARED = ADMISSION_FREE + GPUS
_EMPTY_CELL = NumaCell(free_vcpus=0, free_memory_mib=0)

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
    return _resource_rows([r.resources for r in requests]).T.copy()


def _resource_rows(values: Sequence[Resources]) -> FloatArray:
    # One flat list of plain ints converts to an array several times faster than a list of tuples, and
    # reading the fields directly skips a method call per model; batches have thousands of them.
    flat = [x for v in values for x in (v.vcpus, v.memory_mib, v.disk_gib, v.gpus)]
    return np.array(flat, dtype=np.float64).reshape(-1, RESOURCE_COUNT).T.copy()


def admission_thresholds(demand: FloatArray, dtype: npt.DTypeLike) -> AmountArray:
    """Per request, what each of the first ADMISSION_COMPARED rows of ``ClusterState.admission`` must
    reach on a host that passes the enabled and capacity filters, shape (n_requests, ADMISSION_COMPARED, 1).

    0 for the enabled row, then the amount asked for of vCPUs, memory and disk, or -inf where nothing is
    asked for (an over-allocated host still passes on a resource the request does not use). Cast to the
    dtype of the free amounts exactly as a Python float compared with that array is.
    """
    thresholds = np.zeros((demand.shape[0], ADMISSION_COMPARED, 1), dtype=np.float64)
    thresholds[:, ADMISSION_FREE:, 0] = np.where(demand[:, :GPUS] > 0, demand[:, :GPUS], -np.inf)
    result: AmountArray = thresholds.astype(dtype)
    return result


def effective_capacity_rows(hosts: Sequence[HostInventory]) -> FloatArray:
    """``HostInventory.effective_capacity`` for many hosts at once, shape (RESOURCE_COUNT, n_hosts).

    The same IEEE operations in the same order as the scalar method, so the results are identical; the
    vectorised form matters because building the state is part of every placement round.
    """
    return _effective_capacity(_host_rows(hosts))


# Rows of ``_host_rows``: four resources each of capacity, host reserve, allocated and reserved, then the
# CPU and memory overcommit and whether the host is enabled.
_CAPACITY, _HOST_RESERVE, _ALLOCATED, _RESERVED = (slice(i, i + RESOURCE_COUNT) for i in range(0, 16, 4))
_CPU_OVERCOMMIT, _MEM_OVERCOMMIT, _ENABLED, _HOST_ROWS = 16, 17, 18, 19


def _host_rows(hosts: Sequence[HostInventory]) -> FloatArray:
    """Every number ClusterState needs from the host models, read in one pass, shape (_HOST_ROWS, n)."""
    flat = [
        x
        for h in hosts
        for c, k, a, r in ((h.capacity, h.host_reserve, h.allocated, h.reserved),)
        for x in (
            c.vcpus, c.memory_mib, c.disk_gib, c.gpus,
            k.vcpus, k.memory_mib, k.disk_gib, k.gpus,
            a.vcpus, a.memory_mib, a.disk_gib, a.gpus,
            r.vcpus, r.memory_mib, r.disk_gib, r.gpus,
            h.cpu_overcommit, h.mem_overcommit, h.enabled,
        )
    ]  # fmt: skip
    return np.array(flat, dtype=np.float64).reshape(-1, _HOST_ROWS).T.copy()


def _effective_capacity(rows: FloatArray) -> FloatArray:
    capacity, kept_back = rows[_CAPACITY], rows[_HOST_RESERVE]
    overcommit = np.ones_like(capacity)
    overcommit[VCPUS] = rows[_CPU_OVERCOMMIT]
    overcommit[MEMORY] = rows[_MEM_OVERCOMMIT]
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

        rows = _host_rows(hosts)
        self.capacity = _effective_capacity(rows)
        in_use = rows[_ALLOCATED] + rows[_RESERVED]
        free = self.capacity - in_use
        exact_in_float32 = max(np.abs(self.capacity).max(initial=0), np.abs(in_use).max(initial=0)) < (
            _FLOAT32_EXACT_BELOW
        )
        # The free amounts share one array with a row before them that is 0 on enabled hosts and -1 on
        # disabled ones, so that the placer's fast path applies the enabled and capacity filters with a
        # single comparison (see ``admission_thresholds``).
        admission_shape = (ADMISSION_ROWS, host_count)
        self.admission: AmountArray = (
            np.empty(admission_shape, dtype=np.float32) if exact_in_float32 else np.empty(admission_shape)
        )
        self.free: AmountArray = self.admission[ADMISSION_FREE:]
        self.free[...] = free
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
        # Per resource, per host, as Python floats: ``charge`` reads one number at a time.
        self._inverse_capacity_lists: list[list[float]] = self.inverse_capacity.tolist()
        self.enabled: BoolArray = rows[_ENABLED] != 0
        self.admission[ADMISSION_ENABLED] = np.where(self.enabled, 0.0, -1.0)

        self._index_gpu_models(hosts)
        self._index_numa_cells(hosts)
        self.group_hosts: dict[str, BoolArray] = {}
        for column, host in enumerate(hosts):
            for group in host.anti_affinity_groups:
                self.group_hosts.setdefault(group, np.zeros(host_count, dtype=np.bool_))[column] = True

        self._largest_limits: list[tuple[float, int]] | None = None

        self.features = np.zeros((FEATURE_COUNT, host_count), dtype=FEATURE_DTYPE)
        self.features[FEATURE_FREE_FRACTION] = free * self.inverse_capacity
        self.features[FEATURE_INVERSE_CAPACITY] = self.inverse_capacity
        self.features[FEATURE_HAS_GPUS] = self.capacity[GPUS] > 0
        self.features[FEATURE_CONSTANT] = 1.0

    def _index_gpu_models(self, hosts: Sequence[HostInventory]) -> None:
        """Per GPU model (a row each), per host: how many are free, and whether the host lists the model."""
        models = sorted({m for h in hosts for m in h.gpu_models})
        self.gpu_model_row = {m: i for i, m in enumerate(models)}
        self.gpu_model_free = np.zeros((len(models), len(hosts)), dtype=np.float64)
        self.gpu_model_listed = np.zeros((len(models), len(hosts)), dtype=np.bool_)
        for column, host in enumerate(hosts):
            for model, free_gpus in host.gpu_models.items():
                self.gpu_model_free[self.gpu_model_row[model], column] = free_gpus
                self.gpu_model_listed[self.gpu_model_row[model], column] = True

    def _index_numa_cells(self, hosts: Sequence[HostInventory]) -> None:
        """Free vCPUs and memory per NUMA cell (a row each), per host. Hosts with fewer cells are padded with empty
        cells, which can never fit anything."""
        host_cells = [h.numa_cells for h in hosts]
        cell_counts = [len(c) for c in host_cells]
        cell_count = max(cell_counts, default=0)
        self.numa_cell_count = np.array(cell_counts, dtype=np.int64)
        if cell_counts.count(cell_count) != len(hosts):
            padding = (_EMPTY_CELL,) * cell_count
            host_cells = [c + padding[len(c) :] for c in host_cells]
        cells = np.array(
            [x for h in host_cells for c in h for x in (c.free_vcpus, c.free_memory_mib)], dtype=np.float64
        ).reshape(len(hosts), cell_count, 2)
        self.numa_vcpus: FloatArray = cells[:, :, 0].T.copy()
        self.numa_memory: FloatArray = cells[:, :, 1].T.copy()

    @property
    def host_count(self) -> int:
        return len(self.names)

    def largest_limits(self) -> list[tuple[float, int]]:
        """Per resource, the largest effective capacity of an enabled host and that host (the first of
        equals), or (-1, 0) without enabled hosts. Capacity and enablement never change, so it is kept."""
        if self._largest_limits is None:
            limits = np.where(self.enabled, self.capacity, -1.0)
            best = limits.argmax(axis=1)
            self._largest_limits = [(float(limits[r, h]), int(h)) for r, h in enumerate(best)]
        return self._largest_limits

    def in_use(self, resource: int, host: int) -> int:
        """Running, reserved and newly placed amount of ``resource`` on ``host``."""
        return int(self.capacity[resource, host] - self.free[resource, host])

    def total_capacity(self) -> Resources:
        """Sum of effective capacity over enabled hosts: the pool that fair shares are measured against."""
        totals = self.capacity[:, self.enabled].sum(axis=1)
        return Resources(**{name: int(total) for name, total in zip(RESOURCES, totals, strict=True)})

    def commit(self, host: int, encoded: EncodedRequest) -> None:
        """Charge a placed request to ``host`` in every array the filters and weighers read."""
        self.charge(host, encoded.amounts, encoded.request)

    def charge(self, host: int, amounts: tuple[float, ...], request: PlacementRequest) -> None:
        """``commit`` from the request and its amounts, for callers that have not built an EncodedRequest."""
        free, features, least_free = self.free, self.features, self.least_free
        # Element by element: for four numbers this is several times faster than column slicing, and
        # Python floats throughout (``item``): numpy scalars of mixed precision are several times slower.
        for resource, amount, inverse_capacity, row in zip(
            _RESOURCE_INDICES, amounts, self._inverse_capacity_lists, FEATURE_FREE_FRACTION, strict=True
        ):
            if amount:
                left = free.item(resource, host) - amount
                free[resource, host] = left
                if left < least_free[resource]:
                    least_free[resource] = left
                features[row, host] = left * inverse_capacity[host]

        gpus = amounts[GPUS]
        if gpus > 0 and self.gpu_model_free.shape[0] > 0:
            self._take_gpus(host, gpus, request.gpu_model)
        if request.numa_fit and self.numa_vcpus.shape[0] > 0:
            self._take_numa_cell(host, amounts[VCPUS], amounts[MEMORY])
        group = request.anti_affinity_group
        if group is not None:
            members = self.group_hosts.get(group)
            if members is None:
                members = self.group_hosts[group] = np.zeros(self.host_count, dtype=np.bool_)
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
