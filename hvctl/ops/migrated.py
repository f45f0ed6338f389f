"""What a migration measured: returned by `hvctl migrate` (live, offline, post-copy or checkpoint), printed by the
CLI, and recorded as the data of the ledger's ``migration.completed`` event (which `show` and the metrics read)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Resumed:
    """A training workload a checkpoint migration moved: its first step on the target, checked against the
    source's own."""

    source_id: str
    target_id: str
    checkpoint_step: int
    resumed_step: int
    loss: float
    source_loss: float  # of a distributed job's member: the loss ``peer`` reported for that step
    peer: str | None = None  # a distributed job's member: the VM whose step it was checked against

    def as_json(self) -> dict[str, Any]:
        return {"source_id": self.source_id, "target_id": self.target_id, "checkpoint_step": self.checkpoint_step,
                "resumed_step": self.resumed_step, "loss": self.loss, "source_loss": self.source_loss} \
            | ({"peer": self.peer} if self.peer is not None else {})


@dataclass(frozen=True)
class Migrated:
    mode: str
    total_s: float
    downtime_ms: int | None  # libvirt's measure; None for a checkpoint migration (a new incarnation boots)
    bytes: int | None  # memory (and disk) libvirt sent, or the checkpoints' size
    # live, offline and post-copy:
    memory_iterations: int | None = None
    switched_to_postcopy: bool = False
    # checkpoint:
    workloads: tuple[Resumed, ...] = ()
    drained: tuple[str, ...] = ()  # inference workloads stopped on the source, not moved
    source_host: str | None = None

    def as_json(self) -> dict[str, Any]:
        if self.mode == "checkpoint":
            return {"mode": self.mode, "total_s": self.total_s, "downtime_ms": self.downtime_ms, "bytes": self.bytes,
                    "workloads": [w.as_json() for w in self.workloads], "drained": list(self.drained),
                    "source_host": self.source_host}
        return {"total_s": self.total_s, "downtime_ms": self.downtime_ms, "bytes": self.bytes,
                "memory_iterations": self.memory_iterations, "mode": self.mode,
                "switched_to_postcopy": self.switched_to_postcopy}
