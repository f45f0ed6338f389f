"""hvctl's plan of a data-parallel job across VMs (hvctl/ops/distributed.py): the checks and what each VM runs."""

from __future__ import annotations

import pytest

from guest.workloads.__main__ import _parser
from hvctl.errors import InvalidSpec
from hvctl.ops.distributed import Member, plan_job

A = Member("a", "acme", {"lab": "198.18.5.10"})
B = Member("b", "acme", {"lab": "198.18.5.11", "other": "198.18.6.11"})
C = Member("c", "acme", {"lab": "198.18.5.12"})
TRAIN = ["--objective", "ssl", "--steps", "8"]


def test_the_first_vm_hosts_the_rendezvous_and_every_argv_is_one_the_guest_accepts() -> None:
    plan = plan_job([A, B, C], TRAIN, batch_size=6, min_nodes=2, job="j1")
    assert (plan.job, plan.network, plan.rendezvous) == ("j1", "lab", "198.18.5.10")
    for launch, member in zip(plan.launches, (A, B, C), strict=True):
        args = _parser().parse_args(["run", "train-ddp", *launch.args])
        assert (args.workload, args.rendezvous, args.address) == ("train-ddp", "198.18.5.10", member.addresses["lab"])
        assert args.hosts_store == (member is A)
        assert (args.min_nodes, args.max_nodes, args.go_file) == (2, 3, "/run/hvctl-ddp/j1.go")
        assert launch.args[launch.args.index("--") + 1:] == [*TRAIN, "--batch-size", "6"]


@pytest.mark.parametrize(("members", "batch", "min_nodes", "error"), [
    ([A], 6, None, "at least two VMs"),
    ([A, A], 6, None, "named twice"),
    ([A, Member("b", "other", {"lab": "198.18.5.11"})], 6, None, "different tenants"),
    ([A, Member("b", "acme", {"other": "198.18.6.11"})], 6, None, "share no tenant network"),
    ([A, B, C], 6, 4, "--min-nodes must be between 1 and 3"),
    ([A, B, C], 6, 2, None),
    ([A, B, C], 4, 2, "a global batch of 4 does not split evenly over 3 VMs"),
    ([A, B, C], 6, 1, None),
])
def test_a_job_that_cannot_run_is_refused_with_one_line(members: list[Member], batch: int, min_nodes: int | None,
                                                         error: str | None) -> None:
    if error is None:
        assert len(plan_job(members, TRAIN, batch, min_nodes).launches) == len(members)
        return
    with pytest.raises(InvalidSpec, match=error) as caught:
        plan_job(members, TRAIN, batch, min_nodes)
    assert "\n" not in str(caught.value)
