"""The checks a checkpoint migration of a distributed job's member makes before anything is reserved
(hvctl/ops/ckpt_member.py find_member). The record and the ledger are stand-ins that hold only what the checks read:
the VM's name and tenant, and the ledger's list of VMs (here: none that could be a peer). The move itself runs in
tests/functional/test_vm_distributed.py, on real VMs."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest

from guest import rpc
from hvctl.errors import InvalidSpec
from hvctl.ops.ckpt_member import find_member

RECORD: Any = SimpleNamespace(name="d2", spec=SimpleNamespace(tenant="acme", network=None))
NO_PEERS: Any = SimpleNamespace(ledger=SimpleNamespace(vms=SimpleNamespace(all=lambda: [])))


def workload(kind: str, args: list[str], wid: str = "w1") -> rpc.WorkloadStatus:
    return rpc.WorkloadStatus(id=wid, kind=kind, args=args, state="running", exit_code=None, started_at=time.time(),
                              ended_at=None, result=None, error=None)


def member(*extra: str) -> rpc.WorkloadStatus:
    return workload("train-ddp", ["--job", "ddp-1", "--min-nodes", "2", *extra, "--", "--objective", "ssl"])


def test_the_member_that_hosts_the_rendezvous_is_refused() -> None:
    with pytest.raises(InvalidSpec, match="d2 hosts the rendezvous of distributed job ddp-1"):
        find_member(NO_PEERS, RECORD, member("--hosts-store"), [member("--hosts-store")])


def test_a_member_beside_its_own_training_is_refused() -> None:
    with pytest.raises(InvalidSpec, match=r"beside its own training \(w2\)"):
        find_member(NO_PEERS, RECORD, member(), [member(), workload("train", ["--objective", "ssl"], wid="w2")])


def test_a_job_that_would_fall_below_its_minimum_is_refused() -> None:
    with pytest.raises(InvalidSpec, match="job ddp-1 runs on 1 VM.s. with a minimum of 2: it cannot go on without d2"):
        find_member(NO_PEERS, RECORD, member(), [member()])
