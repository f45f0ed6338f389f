"""Weighted Dominant Resource Fairness (Ghodsi et al. 2011), alone and driving the placer."""

from __future__ import annotations

import pytest

from hvctl.scheduler import HostInventory, PlacementRequest, Resources, Scheduler
from hvctl.scheduler.drf import DrfLedger, progressive_filling

GIB = 1024


def tasks(tenant: str, count: int, vcpus: int, memory_gib: int) -> list[PlacementRequest]:
    return [
        PlacementRequest(
            id=f"{tenant}{i}", tenant=tenant, resources=Resources(vcpus=vcpus, memory_mib=memory_gib * GIB)
        )
        for i in range(1, count + 1)
    ]


def interleave(*queues: list[PlacementRequest]) -> list[PlacementRequest]:
    return [r for group in zip(*queues, strict=True) for r in group]


def test_paper_example() -> None:
    # Section 4 of the paper: 9 CPUs and 18 GB; A's tasks need <1 CPU, 4 GB>, B's <3 CPUs, 1 GB>.
    cluster = Resources(vcpus=9, memory_mib=18 * GIB)
    requests = interleave(tasks("A", 10, 1, 4), tasks("B", 10, 3, 1))
    outcome = progressive_filling(requests, cluster)
    admitted_a = [r for r in outcome.admitted if r.startswith("A")]
    admitted_b = [r for r in outcome.admitted if r.startswith("B")]
    assert (len(admitted_a), len(admitted_b)) == (3, 2)
    assert outcome.usage["A"] == Resources(vcpus=3, memory_mib=12 * GIB)
    assert outcome.usage["B"] == Resources(vcpus=6, memory_mib=2 * GIB)
    assert outcome.dominant_shares["A"] == pytest.approx(2 / 3, abs=1e-12)
    assert outcome.dominant_shares["B"] == pytest.approx(2 / 3, abs=1e-12)
    # Progressive filling always serves the tenant that is furthest behind.
    assert outcome.admitted == ("A1", "B1", "A2", "B2", "A3")
    assert len(outcome.refused) == 15


def test_weighted_drf_gives_a_weight_two_tenant_twice_the_dominant_share() -> None:
    cluster = Resources(vcpus=30, memory_mib=30 * GIB)
    requests = interleave(tasks("X", 40, 1, 1), tasks("Y", 40, 1, 1))
    outcome = progressive_filling(requests, cluster, {"X": 2.0, "Y": 1.0})
    assert outcome.usage["X"].vcpus == 20
    assert outcome.usage["Y"].vcpus == 10
    assert outcome.dominant_shares["X"] == pytest.approx(2 * outcome.dominant_shares["Y"])
    assert outcome.weighted_shares["X"] == pytest.approx(outcome.weighted_shares["Y"])


def test_existing_usage_counts_against_a_tenant() -> None:
    cluster = Resources(vcpus=12, memory_mib=12 * GIB)
    requests = interleave(tasks("X", 12, 1, 1), tasks("Y", 12, 1, 1))
    outcome = progressive_filling(
        requests, cluster, {}, initial_usage={"X": Resources(vcpus=4, memory_mib=4 * GIB)}
    )
    # X already holds 4 of 12, so Y catches up first and the rest is split: both end holding 6.
    assert sum(r.startswith("X") for r in outcome.admitted) == 2
    assert outcome.usage["X"].vcpus == 6
    assert outcome.usage["Y"].vcpus == 6


def test_a_blocked_request_does_not_block_the_rest_of_its_tenant() -> None:
    cluster = Resources(vcpus=4, memory_mib=4 * GIB)
    requests = [
        *tasks("big", 1, 8, 1),
        PlacementRequest(id="small", tenant="big", resources=Resources(vcpus=1, memory_mib=GIB)),
    ]
    outcome = progressive_filling(requests, cluster)
    assert outcome.admitted == ("small",)
    assert outcome.refused == ("big1",)


def test_ledger_ignores_resources_the_cluster_does_not_have() -> None:
    ledger = DrfLedger(Resources(vcpus=10, memory_mib=10 * GIB), {"t": 2.0})
    ledger.charge("t", Resources(vcpus=5, memory_mib=GIB, gpus=1))
    assert ledger.dominant_share("t") == pytest.approx(0.5)
    assert ledger.weighted_share("t") == pytest.approx(0.25)
    with pytest.raises(ValueError, match="positive"):
        DrfLedger(Resources(vcpus=1), {"t": 0.0})


def test_placer_orders_a_contended_batch_by_weighted_drf() -> None:
    hosts = [
        HostInventory(name=f"h{i}", capacity=Resources(vcpus=4, memory_mib=4 * GIB, disk_gib=100))
        for i in range(10)
    ]
    # Each tenant alone could fill the cluster; y's requests come first, so FIFO would favour it.
    requests = tasks("y", 40, 1, 1) + tasks("x", 40, 1, 1)
    scheduler = Scheduler(hosts)
    placements = scheduler.place(requests, tenant_weights={"x": 2.0, "y": 1.0})
    placed = {
        t: sum(1 for p in placements if p.host is not None and p.request_id.startswith(t)) for t in "xy"
    }
    assert placed["x"] + placed["y"] == 40
    # Tasks come in whole 1/40ths of the cluster, so x ends within a task or two of exactly twice y.
    assert abs(placed["x"] - 2 * placed["y"]) <= 2
    assert scheduler.last_drf is not None
    shares = scheduler.last_drf.weighted_shares
    assert abs(shares["x"] - shares["y"]) <= 1 / 40 + 1e-12

    fifo = Scheduler(hosts).place(requests)
    assert sum(1 for p in fifo if p.host is not None and p.request_id.startswith("y")) == 40


def test_admitting_through_per_tenant_queues_matches_try_admit() -> None:
    # The placer hands progressive_filling one "admit the next request" function per tenant instead of
    # try_admit; both must see the same requests in the same order and reach the same outcome.
    cluster = Resources(vcpus=20, memory_mib=20 * GIB)
    requests = interleave(tasks("A", 12, 1, 3), tasks("B", 12, 3, 1), tasks("C", 12, 2, 2))
    seen: list[str] = []

    def try_admit(request: PlacementRequest) -> bool:
        seen.append(request.id)
        return request.id[-1] in "13579"

    expected = progressive_filling(requests, cluster, {"B": 2.0}, try_admit=try_admit)
    offered, seen = seen, []
    queues = {t: iter([r for r in requests if r.tenant == t]) for t in "ABC"}
    admit_next = {t: (lambda q=q: try_admit(next(q))) for t, q in queues.items()}
    assert progressive_filling(requests, cluster, {"B": 2.0}, admit_next=admit_next) == expected
    assert seen == offered
