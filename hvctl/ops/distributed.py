"""Planning a data-parallel training job across VMs (issue 15): which VM hosts the rendezvous, what each VM's agent
runs. Not wired into the CLI yet: ``hvctl run --vms a,b,c train --distributed`` will plan with :func:`plan_job`, start
each member's ``train-ddp`` through its agent, wait for every ``{"ready"}`` line and then create the go files.

Pure: the caller reads the members' tenants and tenant-network addresses from the ledger.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from ..errors import InvalidSpec

GO_DIR = "/run/hvctl-ddp"  # in the guest: where the go files of its jobs are created


@dataclass(frozen=True)
class Member:
    vm: str
    tenant: str
    addresses: dict[str, str]  # tenant network name -> this VM's address on it


@dataclass(frozen=True)
class Launch:
    vm: str
    argv: list[str]  # the agent's workload arguments: ``run train-ddp ...``
    go_file: str


@dataclass(frozen=True)
class JobPlan:
    job: str
    network: str
    rendezvous: str
    launches: list[Launch]


def plan_job(members: list[Member], train_args: list[str], batch_size: int, min_nodes: int | None = None,
             max_restarts: int = 3, job: str | None = None) -> JobPlan:
    """Check that ``members`` can train together and say what each runs. Raises InvalidSpec with one line."""
    names = [m.vm for m in members]
    if len(members) < 2:
        raise InvalidSpec("distributed training needs at least two VMs (--vms a,b)")
    if len(set(names)) != len(names):
        raise InvalidSpec(f"a VM is named twice in --vms: {','.join(names)}")
    tenants = sorted({m.tenant for m in members})
    if len(tenants) > 1:
        raise InvalidSpec(f"the VMs belong to different tenants ({', '.join(tenants)}); a job stays in one tenant")
    shared = set(members[0].addresses).intersection(*(m.addresses for m in members[1:]))
    if not shared:
        raise InvalidSpec("the VMs share no tenant network; attach them to one (hvctl net attach) first")
    network = sorted(shared)[0]
    floor = len(members) if min_nodes is None else min_nodes
    if not 1 <= floor <= len(members):
        raise InvalidSpec(f"--min-nodes must be between 1 and {len(members)}, not {floor}")
    uneven = [w for w in range(floor, len(members) + 1) if batch_size % w]
    if uneven:
        raise InvalidSpec(f"a global batch of {batch_size} does not split evenly over {uneven[0]} VMs; the job may "
                          f"run on {floor} to {len(members)} of them")
    job = job or f"ddp-{secrets.token_hex(4)}"
    rendezvous = members[0].addresses[network]
    go_file = f"{GO_DIR}/{job}.go"
    launches = []
    for i, member in enumerate(members):
        argv = ["run", "train-ddp", "--job", job, "--rendezvous", rendezvous,
                "--address", member.addresses[network], "--min-nodes", str(floor),
                "--max-nodes", str(len(members)), "--max-restarts", str(max_restarts), "--go-file", go_file,
                *(["--hosts-store"] if i == 0 else []), "--", *train_args, "--batch-size", str(batch_size)]
        launches.append(Launch(member.vm, argv, go_file))
    return JobPlan(job, network, rendezvous, launches)
