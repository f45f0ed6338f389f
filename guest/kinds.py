"""The workload kinds and the models baked into images, listed once: the agent starts the kinds (``python -m
guest.workloads run KIND``), the workload CLI has a parser for each, and hvctl's ``run`` offers those it drives
itself; the image builder bakes the models with the workload CLI, and hvctl's ``run`` names them. Plain data, no
imports: the agent reads it at start-up, where every import costs seconds under TCG."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    name: str
    summary: str  # the workload CLI's help for it
    checkpointable: bool = False  # writes a checkpoint at the next step boundary when sent SIGUSR1
    hvctl_run: bool = False  # `hvctl run NAME KIND` starts it (others are started by another verb)
    distributed: bool = False  # one VM's part of a job that spans VMs


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("llm", "generate text with a causal LM", hvctl_run=True),
    Kind("perception", "classify text/image/audio with a trained perception model", hvctl_run=True),
    Kind("perception-train", "train the perception model on the synthetic task"),
    Kind("train", "ssl / rl / seed-rl training with checkpoints", checkpointable=True, hvctl_run=True),
    Kind("train-ddp", "this VM's part of a distributed ssl job: the elastic launcher (hvctl run --vms ... "
                      "--distributed)", distributed=True),
)}

CHECKPOINTABLE = frozenset(name for name, kind in KINDS.items() if kind.checkpointable)
DISTRIBUTED = frozenset(name for name, kind in KINDS.items() if kind.distributed)
HVCTL_RUN = tuple(name for name, kind in KINDS.items() if kind.hvctl_run)

# Where an image keeps its baked models, each in a directory of its name.
MODELS_DIR = "/opt/hvctl/models"
# Each model a recipe may bake (its ``models``): the workload CLI's arguments that build it into {out}, run on the
# build host with the workloads' own code (the same Python ABI, deterministic seeds).
BAKED_MODELS: dict[str, tuple[str, ...]] = {
    "tiny-llm": ("make-tiny-llm", "{out}"),
    "perception": ("run", "perception-train", "--out", "{out}", "--no-compare", "--device", "cpu"),
}
DEFAULT_LLM = "tiny-llm"  # the model `hvctl run NAME llm` and ssl training use when none is named
PERCEPTION_MODEL = "perception"
