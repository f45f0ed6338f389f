"""What the ledger holds, as typed records, and the rows they are read from."""

from __future__ import annotations

import enum
import json
import sqlite3
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hvctl.errors import HvctlError

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
            from hvctl.spec import VMSpec

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

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "ts": self.ts, "vm": self.vm, "host": self.host, "kind": self.kind,
                "message": self.message, "source": "ledger"} | ({"data": self.data} if self.data else {})


def event_from_row(r: sqlite3.Row) -> Event:
    return Event(r["id"], r["ts"], r["vm"], r["host"], r["kind"], r["message"],
                 json.loads(r["data"]) if r["data"] else None)


def vm_from_row(row: sqlite3.Row) -> VMRecord:
    return VMRecord(
        name=row["name"], tenant=row["tenant"], host=row["host"], spec_source=row["spec"],
        state=VMState(row["state"]), image=row["image"], base_disk=Path(row["base_disk"]), overlay=Path(row["overlay"]),
        console_log=Path(row["console_log"]), agent_socket=Path(row["agent_socket"]), ssh_port=row["ssh_port"],
        created_at=row["created_at"], updated_at=row["updated_at"], agent_token=row["agent_token"],
        host_pubkey=row["host_pubkey"], seed=Path(row["seed"]) if row["seed"] else None,
        domain_uuid=row["domain_uuid"],
    )


def operation_from_row(row: sqlite3.Row) -> dict[str, Any]:
    return dict(row) | {"data": json.loads(row["data"])}
