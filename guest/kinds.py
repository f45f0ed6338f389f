"""The workload kinds, listed once: the agent starts these (``python -m guest.workloads run KIND``), the workload CLI
has a parser for each, and hvctl's ``run`` offers those it drives itself. Plain data, no imports: the agent reads it
at start-up, where every import costs seconds under TCG."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    name: str
    summary: str  # the workload CLI's help for it
    checkpointable: bool = False  # writes a checkpoint at the next step boundary when sent SIGUSR1
    hvctl_run: bool = False  # `hvctl run NAME KIND` starts it (others are started by another verb)


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("llm", "generate text with a causal LM", hvctl_run=True),
    Kind("perception", "classify text/image/audio with a trained perception model", hvctl_run=True),
    Kind("perception-train", "train the perception model on the synthetic task"),
    Kind("train", "ssl / rl / seed-rl training with checkpoints", checkpointable=True, hvctl_run=True),
    Kind("train-ddp", "this VM's part of a distributed ssl job: the elastic launcher (hvctl run --vms ... "
                      "--distributed)"),
)}

CHECKPOINTABLE = frozenset(name for name, kind in KINDS.items() if kind.checkpointable)
HVCTL_RUN = tuple(name for name, kind in KINDS.items() if kind.hvctl_run)
