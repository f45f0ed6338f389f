"""What the ledger holds, as typed records, and the rows they are read from."""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hvctl.accounting import Usage
from hvctl.errors import HvctlError, LedgerError
from hvctl.ledger.core import Row

if TYPE_CHECKING:
    from hvctl.spec import VMSpec



class VMState(enum.StrEnum):
    """What the ledger says of a VM (libvirt says what runs; ``hvctl list`` shows both and any drift). A StrEnum: it
    is its value in JSON, in SQL and in comparisons with plain strings."""

    CREATING = "creating"  # reserved, being made; a failure rolls it back
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    DESTROYING = "destroying"  # being removed; a second destroy finishes it


VM_STATES = tuple(VMState)
# What a checkpoint-migration's new incarnation changes besides host and port (column names: never user input).
MOVABLE_COLUMNS = frozenset({"overlay", "console_log", "agent_socket", "seed", "agent_token", "host_pubkey",
                             "base_disk", "domain_uuid"})
DEFAULT_PORT_RANGE = (22200, 22999)


class QuotaExceeded(HvctlError):
    """Admission refused: a tenant quota or a host's capacity would be exceeded. The message has the numbers."""

    exit_code = 13


@dataclass(frozen=True)
class Admission:
    """Limits checked when a VM is admitted: per resource, None means unlimited."""

    tenant_limit: dict[str, float | None]
    host_limit: dict[str, float | None]


@dataclass(frozen=True)
class HostRecord:
    name: str
    uri: str
    accel: str | None
    accel_probed_at: float | None
    cpus: int | None
    memory_mib: int | None
    enabled: bool
    # The size of the storage its VMs' disks live on; None until measured (no disk limit then).
    disk_gib: int | None = None
    # False once a boot found that the host's libvirtd cannot set memory hard limits; None: not known.
    memory_limits: bool | None = None


@dataclass(frozen=True)
class VMPaths:
    """Where one incarnation's files are, as paths on the VM's host: this machine's state dir, or a host's pool."""

    base_disk: Path
    overlay: Path
    seed: Path
    console_log: Path
    agent_socket: Path


class DeviceTaken(HvctlError):
    """Another VM claimed the device first."""

    exit_code = 18


@dataclass(frozen=True)
class VMRecord:
    name: str
    tenant: str
    host: str
    # The VM's spec, or the JSON the ledger stores it as: parsed on first use of ``spec``, so that reading rows
    # (``hvctl list``) does not import pydantic, which alone costs more than the whole listing.
    spec_source: VMSpec | str
    state: VMState
    image: str
    base_disk: Path
    overlay: Path
    console_log: Path
    agent_socket: Path
    ssh_port: int
    created_at: float
    updated_at: float
    agent_token: str | None = None
    host_pubkey: str | None = None
    seed: Path | None = None
    # libvirt's UUID of the VM's domain (kept across migrations); None for VMs made before hvctl recorded it.
    domain_uuid: str | None = None

    @cached_property
    def spec(self) -> VMSpec:
        if isinstance(self.spec_source, str):
            from hvctl.spec import VMSpec  # pydantic loads only when a spec is read (hvctl's start-up: bench_cli)

            return VMSpec.model_validate_json(self.spec_source)
        return self.spec_source

    @cached_property
    def spec_fields(self) -> dict[str, Any]:
        """The spec as JSON-ready data, without validating it: the ledger wrote it from a valid VMSpec."""
        if isinstance(self.spec_source, str):
            return dict(json.loads(self.spec_source))
        return self.spec_source.model_dump(mode="json")

    def as_dict(self) -> dict[str, Any]:
        spec = self.spec_fields
        return {
            "name": self.name, "tenant": self.tenant, "host": self.host, "state": self.state,
            "image": self.image, "vcpus": spec["vcpus"], "memory_mib": spec["memory_mib"],
            "disk_gib": spec["disk_gib"], "overlay": str(self.overlay), "console_log": str(self.console_log),
            "agent_socket": str(self.agent_socket), "ssh_port": self.ssh_port, "created_at": self.created_at,
            "host_pubkey": self.host_pubkey, "spec": spec, "domain_uuid": self.domain_uuid,
        }


@dataclass(frozen=True)
class SnapshotRecord:
    """One snapshot of a VM as the ledger charges it: ``disk_gib`` against its tenant's disk quota and its host's
    disk (the VM's disk size, plus its memory rounded up to GiB when the snapshot holds the memory state)."""

    vm: str
    name: str
    tenant: str
    host: str
    memory: bool
    disk_gib: float
    state: str  # creating | ready | deleting
    created_at: float

    def as_dict(self) -> dict[str, Any]:
        return {"vm": self.vm, "name": self.name, "tenant": self.tenant, "host": self.host, "memory": self.memory,
                "disk_gib": self.disk_gib, "state": self.state, "created_at": self.created_at}


def snapshot_charge(spec: VMSpec, memory: bool) -> float:
    """What one snapshot of a VM of ``spec`` counts against disk: in the worst case it pins every block of the VM's
    disk (as Cinder counts a snapshot at its volume's size), and the saved memory state when it has one."""
    return float(spec.disk_gib + (-(-spec.memory_mib // 1024) if memory else 0))


@dataclass(frozen=True)
class Event:
    id: int
    ts: float
    vm: str | None
    host: str | None
    kind: str
    message: str
    data: dict[str, Any] | None = None


def event_from_row(r: Row) -> Event:
    return Event(r["id"], r["ts"], r["vm"], r["host"], r["kind"], r["message"],
                 json.loads(r["data"]) if r["data"] else None)


def vm_from_row(row: Row) -> VMRecord:
    return VMRecord(
        name=row["name"], tenant=row["tenant"], host=row["host"], spec_source=row["spec"],
        state=VMState(row["state"]), image=row["image"], base_disk=Path(row["base_disk"]), overlay=Path(row["overlay"]),
        console_log=Path(row["console_log"]), agent_socket=Path(row["agent_socket"]), ssh_port=row["ssh_port"],
        created_at=row["created_at"], updated_at=row["updated_at"], agent_token=row["agent_token"],
        host_pubkey=row["host_pubkey"], seed=Path(row["seed"]) if row["seed"] else None,
        domain_uuid=row["domain_uuid"],
    )


@dataclass(frozen=True)
class OperationRecord:
    """A VM's operation lock and durable intent: which command (``holder``) runs which ``kind`` of operation on
    ``vm``, the last ``step`` it reached and what it has made so far (``data``, free-form per kind), for a repair to
    finish or roll back if the command dies."""

    vm: str
    kind: str
    source: str | None
    target: str | None
    step: str
    data: dict[str, Any]
    holder: str
    started_at: float
    updated_at: float

    @property
    def target_host(self) -> str:
        """The target of an operation that must have one (a migration's): a row without one is refused."""
        if self.target is None:
            raise LedgerError(f"the {self.kind} of {self.vm} in the ledger names no target host")
        return self.target

    @property
    def progress(self) -> dict[str, Any] | None:
        """What a long operation (a migration) last reported of its progress, for a second shell's `hvctl show`."""
        value = self.data.get("progress")
        return dict(value) if isinstance(value, dict) else None


def operation_from_row(row: Row) -> OperationRecord:
    return OperationRecord(row["vm"], row["kind"], row["source"], row["target"], row["step"], json.loads(row["data"]),
                           row["holder"], row["started_at"], row["updated_at"])


@dataclass(frozen=True)
class ReservationRecord:
    """Resources held on ``host`` for an operation in flight (``kind``: a migration's target, say)."""

    id: int
    host: str
    tenant: str
    vm: str | None
    kind: str
    usage: Usage
    counts_against_tenant: bool
    created_at: float
    ssh_port: int | None = None  # a migration's: the port its VM gets on the target


def reservation_from_row(row: Row) -> ReservationRecord:
    return ReservationRecord(row["id"], row["host"], row["tenant"], row["vm"], row["kind"],
                             Usage(**json.loads(row["usage"])), bool(row["counts_against_tenant"]), row["created_at"],
                             row["ssh_port"])


@dataclass(frozen=True)
class GpuBinding:
    """One device's row in the vfio binder's journal: who holds it (``vm``: None once given back), the driver it
    came from, and the last step of its move between that driver and vfio-pci (``state``: claimed, moving, bound,
    released, original…), written before the step is tried."""

    host: str
    address: str
    vm: str | None
    original_driver: str | None
    step: str
    state: str
    updated_at: float


def gpu_binding_from_row(row: Row) -> GpuBinding:
    return GpuBinding(row["host"], row["address"], row["vm"], row["original_driver"], row["step"], row["state"],
                      row["updated_at"])


@dataclass(frozen=True)
class GpuHealth:
    """A device that must not be placed until its host reboots (it fell off the bus, or would not reset)."""

    state: str
    reason: str
    since: float


@dataclass(frozen=True)
class NumaCell:
    cpus: int
    memory_mib: int


@dataclass(frozen=True)
class InventoryGpu:
    """A GPU (or allowlisted accelerator) a host had when it was added: its PCI address, its model as the policy
    names it, and its vendor:device ids."""

    address: str
    model: str
    ids: str


@dataclass(frozen=True)
class Hardware:
    """What `hvctl host add` found on a host: its NUMA cells and its GPUs. Owners and health live elsewhere (the GPU
    journal, ``ledger.gpus``): this is what the host has, not what is free."""

    numa_cells: tuple[NumaCell, ...] = ()
    gpus: tuple[InventoryGpu, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"numa_cells": [asdict(c) for c in self.numa_cells], "gpus": [asdict(g) for g in self.gpus]}

    @classmethod
    def from_json(cls, numa: str | None, gpus: str | None) -> Hardware:
        # Rows written by older hvctl may lack a GPU's model or ids: read them as unknown rather than fail.
        return cls(tuple(NumaCell(int(c["cpus"]), int(c["memory_mib"])) for c in json.loads(numa or "[]")),
                   tuple(InventoryGpu(str(g["address"]), str(g.get("model", "unknown")), str(g.get("ids", "")))
                         for g in json.loads(gpus or "[]")))
