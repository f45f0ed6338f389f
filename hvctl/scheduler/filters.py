"""Host filters: each one decides, for every host at once, whether a request may go there.

A filter has two faces. ``mask`` is the hot path: one boolean per host, computed with array operations.
``refusal`` explains, for one host, why the mask is False there, naming the resource, the request, what
is in use and the limit, e.g. ``host h1: memory 6144 MiB requested by web-1, 10240 of 12288 MiB in use``.
The explanations are only built when a request cannot be placed, so they may be slow.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from hvctl.scheduler.state import (
    DISK,
    GPUS,
    MEMORY,
    RESOURCE_LABELS,
    RESOURCE_UNITS,
    VCPUS,
    BoolArray,
    ClusterState,
    EncodedRequest,
)


def _amount(value: float, resource: int) -> str:
    return f"{int(value)}{RESOURCE_UNITS[resource]}"


class HostFilter(ABC):
    """One placement constraint."""

    name: str = "filter"

    def applies(self, encoded: EncodedRequest) -> bool:
        """Whether the filter has anything to say about this request; skipped filters cost nothing."""
        return True

    @abstractmethod
    def mask(self, state: ClusterState, encoded: EncodedRequest) -> BoolArray:
        """True for every host that passes. Callers must not modify the returned array."""

    @abstractmethod
    def refusal(self, state: ClusterState, encoded: EncodedRequest, host: int) -> str | None:
        """Why ``host`` fails this filter, or None when it passes."""


class HostEnabledFilter(HostFilter):
    """Disabled hosts (drained, in maintenance) take no new VMs."""

    name = "host enabled"

    def mask(self, state: ClusterState, encoded: EncodedRequest) -> BoolArray:
        return state.enabled

    def refusal(self, state: ClusterState, encoded: EncodedRequest, host: int) -> str | None:
        if state.enabled[host]:
            return None
        return f"host {state.names[host]}: disabled, request {encoded.request.id} cannot be placed there"


class CapacityFilter(HostFilter):
    """vCPUs, memory and disk must fit in what is left of the host's effective capacity.

    GPUs are checked by ``GpuFilter`` because they also have a model to match.
    """

    name = "capacity"
    _resources = (VCPUS, MEMORY, DISK)

    def mask(self, state: ClusterState, encoded: EncodedRequest) -> BoolArray:
        # One comparison per resource with in-place ANDs beats a single comparison reduced with np.all,
        # whose generic reduction costs more than the work itself at a few thousand hosts; resources
        # every host has room for are skipped. Python floats on the right: a numpy float64 scalar would
        # drag a float32 array up to float64.
        free, required, least_free = state.free, encoded.required, state.least_free
        result: BoolArray | None = None
        for resource in self._resources:
            if required[resource] > least_free[resource]:
                fits = free[resource] >= required[resource]
                if result is None:
                    result = fits
                else:
                    result &= fits
        return result if result is not None else np.ones(state.host_count, dtype=np.bool_)

    def refusal(self, state: ClusterState, encoded: EncodedRequest, host: int) -> str | None:
        problems = [
            _shortage(state, encoded, host, resource)
            for resource in self._resources
            if encoded.amounts[resource] > 0 and state.free[resource, host] < encoded.amounts[resource]
        ]
        if not problems:
            return None
        return f"host {state.names[host]}: " + "; ".join(problems)


def _shortage(state: ClusterState, encoded: EncodedRequest, host: int, resource: int) -> str:
    return (
        f"{RESOURCE_LABELS[resource]} {_amount(encoded.amounts[resource], resource)} requested by "
        f"{encoded.request.id}, {state.in_use(resource, host)} of "
        f"{_amount(state.capacity[resource, host], resource)} in use"
    )


class GpuFilter(HostFilter):
    """Enough free GPUs, and of the requested model when the request names one. Never overcommitted."""

    name = "gpu"

    def applies(self, encoded: EncodedRequest) -> bool:
        return encoded.amounts[GPUS] > 0

    def mask(self, state: ClusterState, encoded: EncodedRequest) -> BoolArray:
        gpus = encoded.amounts[GPUS]
        enough: BoolArray = state.free[GPUS] >= gpus
        model = encoded.request.gpu_model
        if model is None:
            return enough
        row = state.gpu_model_row.get(model)
        if row is None:
            return np.zeros_like(enough)
        of_model: BoolArray = state.gpu_model_free[row] >= gpus
        return enough & of_model

    def refusal(self, state: ClusterState, encoded: EncodedRequest, host: int) -> str | None:
        gpus = encoded.amounts[GPUS]
        request_id = encoded.request.id
        if gpus <= 0:
            return None
        if state.free[GPUS, host] < gpus:
            return f"host {state.names[host]}: {_shortage(state, encoded, host, GPUS)}"
        model = encoded.request.gpu_model
        if model is None:
            return None
        row = state.gpu_model_row.get(model)
        free_of_model = 0 if row is None else int(state.gpu_model_free[row, host])
        if free_of_model >= gpus:
            return None
        listed = ", ".join(
            f"{name}={int(state.gpu_model_free[r, host])}"
            for name, r in state.gpu_model_row.items()
            if state.gpu_model_listed[r, host]
        )
        return (
            f"host {state.names[host]}: {int(gpus)} gpus of model {model} requested by {request_id}, "
            f"{free_of_model} of model {model} free (free by model: {listed or 'none'})"
        )


class NumaFitFilter(HostFilter):
    """For requests that demand it, all vCPUs and memory must come from one NUMA cell."""

    name = "numa fit"

    def applies(self, encoded: EncodedRequest) -> bool:
        return encoded.request.numa_fit

    def mask(self, state: ClusterState, encoded: EncodedRequest) -> BoolArray:
        vcpus, memory = encoded.amounts[VCPUS], encoded.amounts[MEMORY]
        # Every cell of every host at once, then whether any cell of each host fits.
        cell_fits = np.greater_equal(state.numa_vcpus, vcpus)
        cell_fits &= state.numa_memory >= memory
        # Without cells the reduction is all False, its identity, as no cell can fit anything.
        fits: BoolArray = np.logical_or.reduce(cell_fits, axis=0)
        return fits

    def refusal(self, state: ClusterState, encoded: EncodedRequest, host: int) -> str | None:
        vcpus, memory = encoded.amounts[VCPUS], encoded.amounts[MEMORY]
        cells = range(int(state.numa_cell_count[host]))
        if any(state.numa_vcpus[c, host] >= vcpus and state.numa_memory[c, host] >= memory for c in cells):
            return None
        free_cells = ", ".join(
            f"{int(state.numa_vcpus[c, host])} vcpus/{int(state.numa_memory[c, host])} MiB" for c in cells
        )
        return (
            f"host {state.names[host]}: NUMA fit of {int(vcpus)} vcpus and {int(memory)} MiB requested by "
            f"{encoded.request.id}, no single cell has that free (free per cell: {free_cells or 'no cells'})"
        )


class AntiAffinityFilter(HostFilter):
    """A host may hold at most one VM of each anti-affinity group."""

    name = "anti-affinity"

    def applies(self, encoded: EncodedRequest) -> bool:
        return encoded.request.anti_affinity_group is not None

    def mask(self, state: ClusterState, encoded: EncodedRequest) -> BoolArray:
        group = encoded.request.anti_affinity_group
        members = state.group_hosts.get(group) if group is not None else None
        if members is None:
            return np.ones(state.host_count, dtype=np.bool_)
        return ~members

    def refusal(self, state: ClusterState, encoded: EncodedRequest, host: int) -> str | None:
        group = encoded.request.anti_affinity_group
        members = state.group_hosts.get(group) if group is not None else None
        if members is None or not members[host]:
            return None
        return (
            f"host {state.names[host]}: anti-affinity group {group} already has a VM there, "
            f"request {encoded.request.id} must not share it"
        )


def default_filters() -> tuple[HostFilter, ...]:
    return (HostEnabledFilter(), CapacityFilter(), GpuFilter(), NumaFitFilter(), AntiAffinityFilter())


def combined_mask(
    state: ClusterState, encoded: EncodedRequest, filters: Sequence[HostFilter]
) -> BoolArray | None:
    """AND of the masks of every filter that applies; None when none applies (every host passes)."""
    passing: BoolArray | None = None
    for host_filter in filters:
        if host_filter.applies(encoded):
            mask = host_filter.mask(state, encoded)
            # Not in place: a filter may hand back an array owned by the state.
            passing = mask if passing is None else passing & mask
    return passing


def describe_refusal(state: ClusterState, encoded: EncodedRequest, filters: Sequence[HostFilter]) -> str:
    """Explain why no host accepts the request, in terms an operator can act on."""
    request_id = encoded.request.id
    enabled = state.enabled
    if not enabled.any():
        return f"no enabled host for request {request_id} ({state.host_count} hosts, none enabled)"

    # A request that exceeds every host's whole effective capacity will never fit, however empty the
    # cluster gets, and saying so is more useful than listing each host's current usage.
    for resource, (limit, largest) in zip((VCPUS, MEMORY, DISK, GPUS), state.largest_limits(), strict=True):
        wanted = encoded.amounts[resource]
        if wanted > limit:
            return (
                f"request {request_id} is larger than any enabled host: {RESOURCE_LABELS[resource]} "
                f"{_amount(wanted, resource)} requested, the largest limit is "
                f"{_amount(limit, resource)} (host {state.names[largest]})"
            )

    applicable = [f for f in filters if f.applies(encoded)]
    refused = np.array([~f.mask(state, encoded) for f in applicable]).reshape(len(applicable), -1)
    counts = ", ".join(
        f"{f.name} refused {n}"
        for f, n in zip(applicable, (np.count_nonzero(row) for row in refused), strict=True)
        if n
    )
    # The host failing the fewest filters is the closest to accepting, so its reasons are the ones
    # most worth reading. (Counting in bytes where they suffice: widening the sum costs more than it.)
    failed = refused.sum(axis=0, dtype=np.uint8 if len(applicable) < 256 else np.int64)
    closest = int(np.argmin(failed))
    reasons = [r for f in applicable if (r := f.refusal(state, encoded, closest)) is not None]
    summary = f"no host accepts request {request_id} ({counts} of {state.host_count} hosts)"
    return f"{summary}; closest: {'; '.join(reasons)}"
