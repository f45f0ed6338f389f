"""Value types shared by the placement scheduler.

Every model is frozen so that a host inventory or a request handed to the scheduler cannot be changed
behind its back; the scheduler keeps its own mutable copy of the numbers in numpy arrays instead.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, model_validator

# Overcommitted capacity is floored to whole units, and this tolerance keeps a product such as
# 0.29 * 100 (28.999999999999996 in binary floating point) from losing a unit to rounding.
FLOOR_TOLERANCE = 1e-9


class Resources(BaseModel):
    """An amount of each schedulable resource: a host's size, what is in use, or what a VM asks for."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    vcpus: NonNegativeInt = 0
    memory_mib: NonNegativeInt = 0
    disk_gib: NonNegativeInt = 0
    gpus: NonNegativeInt = 0

    def as_tuple(self) -> tuple[int, int, int, int]:
        """Return the amounts in the scheduler's fixed resource order (vcpus, memory, disk, gpus)."""
        return (self.vcpus, self.memory_mib, self.disk_gib, self.gpus)

    def __add__(self, other: Resources) -> Resources:
        return Resources(
            vcpus=self.vcpus + other.vcpus,
            memory_mib=self.memory_mib + other.memory_mib,
            disk_gib=self.disk_gib + other.disk_gib,
            gpus=self.gpus + other.gpus,
        )


class NumaCell(BaseModel):
    """What is still free inside one NUMA cell of a host."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    free_vcpus: NonNegativeInt
    free_memory_mib: NonNegativeInt


class HostInventory(BaseModel):
    """A hypervisor host as the scheduler sees it at the start of a placement round."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    capacity: Resources
    # VMs that are running on the host.
    allocated: Resources = Field(default_factory=Resources)
    # Resources promised to operations still in flight (a VM being created or migrated in), which must
    # count as used or two rounds could hand out the same space.
    reserved: Resources = Field(default_factory=Resources)
    cpu_overcommit: float = Field(default=1.0, gt=0)
    mem_overcommit: float = Field(default=1.0, gt=0)
    # Kept back for the host OS and the hypervisor itself; never offered to guests.
    host_reserve: Resources = Field(default_factory=Resources)
    # Free GPUs per model name, for requests that need a particular model.
    gpu_models: dict[str, NonNegativeInt] = Field(default_factory=dict)
    numa_cells: tuple[NumaCell, ...] = ()
    enabled: bool = True
    # Anti-affinity groups that already have a member VM on this host.
    anti_affinity_groups: frozenset[str] = frozenset()

    def effective_capacity(self) -> Resources:
        """Capacity guests may use: (capacity - host_reserve) x overcommit for CPU and memory.

        Disk and GPUs are never overcommitted, so for them it is capacity - host_reserve. Results are
        floored to whole units and never negative.
        """

        def usable(total: int, kept_back: int, overcommit: float) -> int:
            return max(0, math.floor((total - kept_back) * overcommit + FLOOR_TOLERANCE))

        return Resources(
            vcpus=usable(self.capacity.vcpus, self.host_reserve.vcpus, self.cpu_overcommit),
            memory_mib=usable(self.capacity.memory_mib, self.host_reserve.memory_mib, self.mem_overcommit),
            disk_gib=usable(self.capacity.disk_gib, self.host_reserve.disk_gib, 1.0),
            gpus=usable(self.capacity.gpus, self.host_reserve.gpus, 1.0),
        )

    def in_use(self) -> Resources:
        """Everything that counts against effective capacity: running VMs plus in-flight reservations."""
        return self.allocated + self.reserved


class PlacementRequest(BaseModel):
    """One VM waiting for a host."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1)
    tenant: str = Field(default="default", min_length=1)
    resources: Resources
    # When set, every GPU must be of this model; when None, any model will do.
    gpu_model: str | None = None
    # How long the VM is expected to live; the node score uses it and falls back to a default.
    expected_duration_s: float | None = Field(default=None, gt=0)
    # No two VMs of the same group may share a host.
    anti_affinity_group: str | None = None
    # Require that all the VM's vCPUs and memory fit inside a single NUMA cell.
    numa_fit: bool = False

    @model_validator(mode="after")
    def _gpu_model_needs_gpus(self) -> PlacementRequest:
        # A model without a count is almost certainly a typo in the request, and would silently
        # schedule a GPU-less VM.
        if self.gpu_model is not None and self.resources.gpus == 0:
            raise ValueError(f"request {self.id}: gpu_model {self.gpu_model!r} given but gpus is 0")
        return self


class Placement(BaseModel):
    """The scheduler's answer for one request: a host and its score, or None and the reason."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    request_id: str
    host: str | None
    reason: str | None = None
    score: float | None = None

    @property
    def placed(self) -> bool:
        return self.host is not None
