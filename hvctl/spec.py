"""Typed, immutable requests. Everything a user types passes through here before it can reach XML, a path or a shell."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from guest.validation import describe
from hvctl.errors import InvalidSpec
from hvctl.names import NAME_PATTERN

# A name becomes a libvirt domain name, a directory name and part of a disk path. The pattern admits nothing that
# XML, a shell or a path could interpret: no dots (so no ".."), no slashes, no quotes, no spaces.
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
# Image names may carry a dot for versions ("base-1.2") but never start with one.
ImageName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9.-]{0,62}$")]
GpuModel = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]

MAX_VCPUS = 256
MIN_MEMORY_MIB = 64
MAX_MEMORY_MIB = 4 * 1024 * 1024
MAX_DISK_GIB = 16 * 1024
MAX_GPUS = 16


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def parse(cls, **values: Any) -> Self:
        """Validate, turning pydantic's multi-line report into one InvalidSpec line per the CLI's contract."""
        try:
            return cls(**values)
        except ValidationError as exc:
            raise InvalidSpec("invalid request: " + describe(exc)) from None


class GPURequest(Frozen):
    count: int = Field(default=0, ge=0, le=MAX_GPUS)
    model: GpuModel | None = None


# Linux interface names: at most 15 bytes, no '/', whitespace or ':' (kept to a safe subset here).
BridgeName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")]


class NetworkAttach(Frozen):
    """A second NIC for production traffic, on a host bridge or a libvirt network the admin named. The user-mode
    NIC that carries hvctl's SSH forward stays; with ``gateway`` the guest's default route moves to this NIC."""

    bridge: BridgeName | None = None
    network: Name | None = None  # a libvirt network (NAT or isolated) defined by the admin, or by hvctl:
    # hvctl's tenant network this NIC is on (`hvctl network`): hvctl defines ``network`` on the VM's host, and the
    # ledger gives ``address``.
    tenant_network: Name | None = None
    address: IPv4Interface | None = None  # static, e.g. 198.18.77.10/24; None: the guest's DHCP client, if any
    gateway: IPv4Address | None = None

    @model_validator(mode="after")
    def _one_source(self) -> NetworkAttach:
        if (self.bridge is None) == (self.network is None):
            raise ValueError("name exactly one of bridge or network")
        if self.gateway is not None and (self.address is None or self.gateway not in self.address.network):
            raise ValueError(f"gateway {self.gateway} is not on the NIC's subnet")
        return self


class VMSpec(Frozen):
    name: Name
    tenant: Name = "default"
    vcpus: int = Field(default=1, ge=1, le=MAX_VCPUS)
    memory_mib: int = Field(default=256, ge=MIN_MEMORY_MIB, le=MAX_MEMORY_MIB)
    disk_gib: int = Field(default=1, ge=1, le=MAX_DISK_GIB)
    image: ImageName = "minimal"
    gpus: GPURequest = GPURequest()
    # None: the scheduler picks the host.
    host: Name | None = None
    # Where the SSH forward listens on the host. Loopback by default; production may bind a management address.
    ssh_bind: IPv4Address = IPv4Address("127.0.0.1")
    # Enforcement: a cap on host CPU time (in CPUs, e.g. 0.5), host CPUs to pin to, a block-I/O weight, and a host
    # NUMA node for the guest's memory.
    cpu_limit: float | None = Field(default=None, gt=0, le=MAX_VCPUS)
    pin_cpus: tuple[Annotated[int, Field(ge=0, le=4095)], ...] = ()
    io_weight: int | None = Field(default=None, ge=100, le=1000)
    numa_node: int | None = Field(default=None, ge=0, le=63)
    # VMs in the same anti-affinity group never share a host (replicas of one service, say).
    anti_affinity: Name | None = None
    # Give the guest a virtual IOMMU (Intel, q35), so that VFIO works inside it.
    viommu: bool = False
    network: NetworkAttach | None = None
    # hvctl's operator key is root on every VM that authorises it (hvctl checkpoint, restore and checkpoint migration
    # copy files over SSH with it). False: only the tenant's keys; the agent still works, over its host-only channel.
    operator_key: bool = True

    @model_validator(mode="before")
    @classmethod
    def _drop_retired_fields(cls, values: Any) -> Any:
        """Specs recorded by older hvctl (ledger rows, domain metadata) carry ``workload``, a field nothing ever read
        (workloads are run with `hvctl run`, not declared at create); it is dropped on reading, if unset."""
        if isinstance(values, dict) and "workload" in values and values["workload"] is None:
            return {k: v for k, v in values.items() if k != "workload"}
        return values

    @model_validator(mode="after")
    def _cpu_limit_within_vcpus(self) -> VMSpec:
        if self.cpu_limit is not None and self.cpu_limit > self.vcpus:
            raise ValueError(f"cpu_limit {self.cpu_limit} exceeds the VM's {self.vcpus} vCPU(s)")
        return self
