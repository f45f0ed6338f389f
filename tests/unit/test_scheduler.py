"""Placement scheduler: filters, weighers, effective capacity and the placer (no libvirt needed)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

from hvctl.scheduler import (
    HostInventory,
    NumaCell,
    PlacementRequest,
    Resources,
    Scheduler,
    WeigherWeights,
    place,
    place_one,
)
from hvctl.scheduler.filters import (
    AntiAffinityFilter,
    CapacityFilter,
    GpuFilter,
    HostEnabledFilter,
    HostFilter,
    NumaFitFilter,
)
from hvctl.scheduler.state import ClusterState, EncodedRequest, effective_capacity_rows
from hvctl.scheduler.weighers import CombinedWeigher, NodeScoreWeigher, host_scores


def host(
    name: str, vcpus: int = 16, memory_mib: int = 32768, disk_gib: int = 500, gpus: int = 0, **fields: Any
) -> HostInventory:
    return HostInventory(
        name=name,
        capacity=Resources(vcpus=vcpus, memory_mib=memory_mib, disk_gib=disk_gib, gpus=gpus),
        **fields,
    )


def request(
    request_id: str = "r1",
    vcpus: int = 1,
    memory_mib: int = 1024,
    disk_gib: int = 10,
    gpus: int = 0,
    **fields: Any,
) -> PlacementRequest:
    return PlacementRequest(
        id=request_id,
        resources=Resources(vcpus=vcpus, memory_mib=memory_mib, disk_gib=disk_gib, gpus=gpus),
        **fields,
    )


def encode(scheduler: Scheduler, req: PlacementRequest) -> EncodedRequest:
    return scheduler._queue([req]).requests[0]


def refusal(
    filter_: HostFilter, hosts: list[HostInventory], req: PlacementRequest, index: int = 0
) -> str | None:
    scheduler = Scheduler(hosts)
    encoded = encode(scheduler, req)
    mask = filter_.mask(scheduler.state, encoded)
    reason = filter_.refusal(scheduler.state, encoded, index)
    # The vectorised mask and the per-host explanation must agree.
    assert bool(mask[index]) == (reason is None)
    return reason


# Filters and their refusal messages.


def test_capacity_filter_names_resource_request_usage_and_limit() -> None:
    h1 = host("h1", memory_mib=12288, allocated=Resources(memory_mib=10240))
    reason = refusal(CapacityFilter(), [h1], request("web-1", memory_mib=6144))
    assert reason == "host h1: memory 6144 MiB requested by web-1, 10240 of 12288 MiB in use"


def test_capacity_filter_counts_reservations_and_lists_every_short_resource() -> None:
    h1 = host(
        "h1", vcpus=8, disk_gib=100, allocated=Resources(vcpus=4), reserved=Resources(vcpus=3, disk_gib=95)
    )
    reason = refusal(CapacityFilter(), [h1], request("db", vcpus=2, disk_gib=10))
    assert reason == (
        "host h1: vcpus 2 requested by db, 7 of 8 in use; disk 10 GiB requested by db, 95 of 100 GiB in use"
    )


def test_capacity_filter_passes_a_request_that_exactly_fills_the_host() -> None:
    h1 = host("h1", vcpus=8, memory_mib=8192, disk_gib=100, allocated=Resources(vcpus=6, memory_mib=4096))
    assert refusal(CapacityFilter(), [h1], request(vcpus=2, memory_mib=4096, disk_gib=100)) is None


def test_gpu_count_is_never_overcommitted() -> None:
    g1 = host("g1", gpus=4, cpu_overcommit=4.0, mem_overcommit=2.0, allocated=Resources(gpus=3))
    reason = refusal(GpuFilter(), [g1], request("train", gpus=2))
    assert reason == "host g1: gpus 2 requested by train, 3 of 4 in use"


def test_gpu_model_filter_refuses_the_wrong_model_and_picks_the_right_host() -> None:
    a100 = host("a", gpus=4, gpu_models={"a100": 4})
    h100 = host("h", gpus=4, gpu_models={"h100": 4})
    wants_h100 = request("infer", gpus=2, gpu_model="h100")
    reason = refusal(GpuFilter(), [a100, h100], wants_h100, index=0)
    assert (
        reason
        == "host a: 2 gpus of model h100 requested by infer, 0 of model h100 free (free by model: a100=4)"
    )
    assert refusal(GpuFilter(), [a100, h100], wants_h100, index=1) is None
    assert place_one([a100, h100], wants_h100).host == "h"


def test_gpu_model_unknown_everywhere_is_refused() -> None:
    placement = place_one(
        [host("a", gpus=4, gpu_models={"a100": 4})], request("x", gpus=1, gpu_model="mi300")
    )
    assert placement.host is None
    assert placement.reason is not None and "gpus of model mi300 requested by x" in placement.reason


def test_gpus_of_the_requested_model_are_used_up() -> None:
    scheduler = Scheduler([host("a", gpus=4, gpu_models={"a100": 4})])
    first = scheduler.place_one(request("one", gpus=3, gpu_model="a100"))
    second = scheduler.place_one(request("two", gpus=2, gpu_model="a100"))
    assert first.host == "a" and second.host is None
    assert scheduler.inventory()[0].gpu_models == {"a100": 1}


def test_numa_fit_requires_one_cell_large_enough() -> None:
    split = host("split", vcpus=16, numa_cells=(NumaCell(free_vcpus=8, free_memory_mib=16384),) * 2)
    whole = host("whole", vcpus=32, numa_cells=(NumaCell(free_vcpus=16, free_memory_mib=16384),) * 2)
    pinned = request("pinned", vcpus=12, memory_mib=8192, numa_fit=True)
    reason = refusal(NumaFitFilter(), [split, whole], pinned, index=0)
    assert reason == (
        "host split: NUMA fit of 12 vcpus and 8192 MiB requested by pinned, no single cell has that free "
        "(free per cell: 8 vcpus/16384 MiB, 8 vcpus/16384 MiB)"
    )
    assert place_one([split, whole], pinned).host == "whole"
    # Without the NUMA requirement the smaller host is fine (and pack prefers it).
    assert place_one([split, whole], request("floating", vcpus=12, memory_mib=8192)).host == "split"


def test_numa_cell_is_charged_when_a_pinned_vm_is_placed() -> None:
    scheduler = Scheduler(
        [host("h", vcpus=16, numa_cells=(NumaCell(free_vcpus=8, free_memory_mib=16384),) * 2)]
    )
    assert scheduler.place_one(request("p1", vcpus=6, numa_fit=True)).host == "h"
    assert scheduler.place_one(request("p2", vcpus=6, numa_fit=True)).host == "h"
    third = scheduler.place_one(request("p3", vcpus=3, numa_fit=True))
    assert third.host is None
    assert [c.free_vcpus for c in scheduler.inventory()[0].numa_cells] == [2, 2]


def test_anti_affinity_keeps_group_members_apart() -> None:
    hosts = [host("h1", anti_affinity_groups=frozenset({"db"})), host("h2"), host("h3")]
    reason = refusal(AntiAffinityFilter(), hosts, request("db-2", anti_affinity_group="db"), index=0)
    assert reason == "host h1: anti-affinity group db already has a VM there, request db-2 must not share it"
    placements = place(hosts, [request(f"db-{i}", anti_affinity_group="db") for i in (2, 3, 4)])
    assert [p.host for p in placements[:2]] == ["h2", "h3"]
    assert placements[2].host is None
    assert placements[2].reason is not None and "anti-affinity refused 3 of 3 hosts" in placements[2].reason


def test_disabled_host_is_never_chosen() -> None:
    hosts = [host("off", vcpus=64, enabled=False), host("on", vcpus=8)]
    reason = refusal(HostEnabledFilter(), hosts, request("r9"), index=0)
    assert reason == "host off: disabled, request r9 cannot be placed there"
    assert place_one(hosts, request("big", vcpus=32)).host is None
    assert place_one(hosts, request("small", vcpus=2)).host == "on"


def test_no_enabled_host_and_no_host_at_all_are_explained() -> None:
    assert place_one([host("off", enabled=False)], request("r1")).reason == (
        "no enabled host for request r1 (1 hosts, none enabled)"
    )
    assert place_one([], request("r1")).reason == "no hosts to place r1 on"


def test_request_larger_than_any_host_gets_a_clear_reason() -> None:
    hosts = [host("h1", memory_mib=16384), host("h2", memory_mib=32768, mem_overcommit=1.5)]
    placement = place_one(hosts, request("huge", memory_mib=65536))
    assert placement.host is None
    assert placement.reason == (
        "request huge is larger than any enabled host: memory 65536 MiB requested, "
        "the largest limit is 49152 MiB (host h2)"
    )


def test_refusal_on_a_full_cluster_names_the_closest_host() -> None:
    hosts = [
        host("h1", vcpus=8, allocated=Resources(vcpus=7)),
        host("h2", vcpus=8, allocated=Resources(vcpus=8)),
    ]
    placement = place_one(hosts, request("r1", vcpus=2))
    assert placement.reason == (
        "no host accepts request r1 (capacity refused 2 of 2 hosts); "
        "closest: host h1: vcpus 2 requested by r1, 7 of 8 in use"
    )


def test_later_requests_of_a_refused_shape_are_refused_without_a_scan() -> None:
    scheduler = Scheduler([host("h1", vcpus=4)])
    placements = scheduler.place([request("a", vcpus=8), request("b", vcpus=8), request("c", vcpus=2)])
    assert [p.host for p in placements] == [None, None, "h1"]
    assert placements[1].reason is not None and placements[1].reason.startswith(
        "same shape as a, which was refused"
    )


# Effective capacity: host reserve and overcommit.


def test_effective_capacity_applies_reserve_then_overcommit_but_not_to_disk_or_gpus() -> None:
    h = host(
        "h",
        vcpus=32,
        memory_mib=65536,
        disk_gib=1000,
        gpus=2,
        host_reserve=Resources(vcpus=2, memory_mib=4096, disk_gib=100),
        cpu_overcommit=4.0,
        mem_overcommit=1.5,
    )
    assert h.effective_capacity() == Resources(vcpus=120, memory_mib=92160, disk_gib=900, gpus=2)
    state = ClusterState([h])
    assert state.capacity[:, 0].tolist() == [120, 92160, 900, 2]


def test_overcommit_floors_without_losing_a_unit_to_binary_rounding() -> None:
    # 100 * 0.29 is 28.999999999999996 in binary floating point.
    assert host("h", vcpus=100, cpu_overcommit=0.29).effective_capacity().vcpus == 29
    assert host("h", vcpus=10, cpu_overcommit=1.25).effective_capacity().vcpus == 12


def test_vectorised_effective_capacity_matches_the_scalar_method() -> None:
    rng = random.Random(7)
    hosts = [
        host(
            f"h{i}",
            vcpus=rng.randint(1, 256),
            memory_mib=rng.randint(1024, 2**20),
            disk_gib=rng.randint(0, 9000),
            gpus=rng.randint(0, 8),
            host_reserve=Resources(
                vcpus=rng.randint(0, 4), memory_mib=rng.randint(0, 8192), gpus=rng.randint(0, 1)
            ),
            cpu_overcommit=rng.choice([0.29, 0.5, 1.0, 1.1, 1.3, 2.0, 3.7]),
            mem_overcommit=rng.choice([0.9, 1.0, 1.1, 1.25, 1.5]),
        )
        for i in range(300)
    ]
    rows = effective_capacity_rows(hosts)
    assert rows.T.astype(int).tolist() == [list(h.effective_capacity().as_tuple()) for h in hosts]


def test_overcommitted_capacity_is_placeable_and_reserve_is_not() -> None:
    h = host("h", vcpus=8, host_reserve=Resources(vcpus=2), cpu_overcommit=2.0)
    assert place_one([h], request(vcpus=12)).host == "h"
    assert place_one([h], request(vcpus=13)).host is None


# Weighers.


def test_node_score_matches_a_hand_computation() -> None:
    h = host(
        "h",
        vcpus=16,
        memory_mib=32768,
        disk_gib=400,
        allocated=Resources(vcpus=4, memory_mib=8192, disk_gib=100),
    )
    state = ClusterState([h])
    demand = np.array([[2.0, 4096.0, 50.0, 0.0]])
    # Free fractions: 12/16, 24576/32768 and 300/400, all 0.75; the GPU is not requested, so not averaged.
    for duration_s, expected in ((7200.0, 0.75 / 2), (np.nan, 0.75), (10.0, 0.75 * 60)):
        coefficients = NodeScoreWeigher().coefficients(demand, np.array([duration_s]))[0]
        assert host_scores(coefficients, state)[0] == pytest.approx(expected)


def test_combined_score_reported_by_the_placer_matches_a_hand_computation() -> None:
    h = host(
        "h",
        vcpus=16,
        memory_mib=32768,
        disk_gib=400,
        allocated=Resources(vcpus=4, memory_mib=8192, disk_gib=100),
    )
    req = request("r", vcpus=2, memory_mib=4096, disk_gib=50, expected_duration_s=7200)
    # S = 0.75 / 2; pack P = mean((4+2)/16, (8192+4096)/32768, (100+50)/400) = 0.375; no GPU host, G = 0.
    expected = 1.0 * 0.375 + 2.0 * 0.375 + 0.5 * 0.0
    assert place_one([h], req).score == pytest.approx(expected, abs=1e-5)
    # Spread: 1 - P.
    assert place_one([h], req, "spread").score == pytest.approx(0.375 + 2.0 * 0.625, abs=1e-5)
    weights = WeigherWeights(node_score=0.0, policy=1.0, gpu_conservation=0.0)
    assert place_one([h], req, weights=weights).score == pytest.approx(0.375, abs=1e-5)


def test_pack_and_spread_choose_different_hosts() -> None:
    busy = host("busy", allocated=Resources(vcpus=8, memory_mib=16384, disk_gib=250))
    empty = host("empty")
    req = request(vcpus=2, memory_mib=4096, disk_gib=20)
    assert place_one([busy, empty], req, "pack").host == "busy"
    assert place_one([busy, empty], req, "spread").host == "empty"
    assert place_one([empty, busy], req, "pack").host == "busy"


def test_gpu_hosts_are_kept_for_gpu_requests() -> None:
    gpu_host = host("gpu", gpus=4)
    plain = host("plain")
    assert place_one([gpu_host, plain], request("cpu-only")).host == "plain"
    assert place_one([gpu_host, plain], request("needs-gpu", gpus=1)).host == "gpu"


def test_invalid_policy_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="policy_mode"):
        CombinedWeigher("fill")  # type: ignore[arg-type]


# The placer against a plain-Python reference.


def reference_score(h: HostInventory, used: list[float], req: PlacementRequest) -> float | None:
    """The weighers' documented formula, written out per host in plain Python."""
    capacity = h.effective_capacity().as_tuple()
    demand = req.resources.as_tuple()
    free = [c - u for c, u in zip(capacity, used, strict=True)]
    if not h.enabled or any(q > f for q, f in zip(demand, free, strict=True) if q > 0):
        return None
    requested = [r for r in range(4) if demand[r] > 0]
    duration_units = max(req.expected_duration_s or 3600.0, 60.0) / 3600.0
    node = sum(free[r] / capacity[r] for r in requested) / len(requested) / duration_units
    pack = sum((used[r] + demand[r]) / capacity[r] for r in requested) / len(requested)
    gpu = -1.0 if demand[3] == 0 and capacity[3] > 0 else 0.0
    return node + 2.0 * pack + 0.5 * gpu


def test_batch_placement_matches_the_reference_and_never_overfills() -> None:
    rng = random.Random(11)
    hosts = [
        host(
            f"h{i}",
            vcpus=rng.choice([8, 16, 32]),
            memory_mib=rng.choice([16384, 32768, 65536]),
            disk_gib=rng.choice([200, 500]),
            gpus=rng.choice([0, 0, 2]),
            cpu_overcommit=rng.choice([1.0, 2.0]),
            allocated=Resources(vcpus=rng.randint(0, 4), memory_mib=rng.randint(0, 8192)),
            enabled=rng.random() > 0.1,
        )
        for i in range(40)
    ]
    requests = [
        request(
            f"r{i}",
            vcpus=rng.choice([1, 2, 4, 8]),
            memory_mib=rng.choice([1024, 4096, 8192, 16384]),
            disk_gib=rng.choice([0, 20, 80]),
            gpus=rng.choice([0] * 9 + [1]),
            expected_duration_s=rng.choice([None, 60.0, 600.0, 86400.0]),
        )
        for i in range(300)
    ]
    used = {h.name: [float(v) for v in h.in_use().as_tuple()] for h in hosts}
    scheduler = Scheduler(hosts)
    placements = scheduler.place(requests)
    assert [p.request_id for p in placements] == [r.id for r in requests]
    placed = 0
    for req, placement in zip(requests, placements, strict=True):
        scores = {h.name: reference_score(h, used[h.name], req) for h in hosts}
        feasible = {name: s for name, s in scores.items() if s is not None}
        if placement.host is None:
            assert not feasible, f"{req.id} was refused but fits on {sorted(feasible)}"
            continue
        placed += 1
        assert placement.host in feasible
        # Scores are computed in single precision, so near-ties may go either way.
        assert feasible[placement.host] == pytest.approx(max(feasible.values()), abs=1e-4)
        assert placement.score == pytest.approx(feasible[placement.host], abs=1e-4)
        for r, amount in enumerate(req.resources.as_tuple()):
            used[placement.host][r] += amount
    assert 50 < placed < len(requests)
    for updated in scheduler.inventory():
        in_use = updated.in_use().as_tuple()
        assert list(in_use) == used[updated.name]
        assert all(u <= c for u, c in zip(in_use, updated.effective_capacity().as_tuple(), strict=True))


def test_inventory_reports_the_new_allocations() -> None:
    scheduler = Scheduler([host("h", allocated=Resources(vcpus=2))])
    scheduler.place([request("a", vcpus=3, memory_mib=2048), request("b", vcpus=1, anti_affinity_group="g")])
    updated = scheduler.inventory()[0]
    assert updated.allocated == Resources(vcpus=6, memory_mib=3072, disk_gib=20)
    assert updated.anti_affinity_groups == frozenset({"g"})


def test_drf_ordered_batch_keeps_request_order_in_the_result() -> None:
    hosts = [host("h", vcpus=4, memory_mib=4096)]
    requests = [request(f"{t}{i}", tenant=t) for i in range(3) for t in ("x", "y")]
    placements = Scheduler(hosts).place(requests, tenant_weights={})
    assert [p.request_id for p in placements] == [r.id for r in requests]
    assert sum(p.host is not None for p in placements) == 4


def test_validation_errors() -> None:
    with pytest.raises(ValueError, match="gpu_model"):
        request(gpu_model="a100")
    with pytest.raises(ValueError, match="unique"):
        Scheduler([host("h"), host("h")])
    with pytest.raises(ValueError, match="unique"):
        Scheduler([host("h")]).place([request("same"), request("same")], tenant_weights={})


def test_custom_filters_outside_the_score_bounds_still_never_pick_a_refused_host() -> None:
    # Without the capacity filter an over-allocated host passes with a free fraction of -9 on vCPUs,
    # which drives its shifted score below zero, the value that marks refused hosts.
    over = host("over", vcpus=4, allocated=Resources(vcpus=40))
    hosts = [host("off", enabled=False), over]
    scheduler = Scheduler(hosts, "spread", filters=[HostEnabledFilter()])
    placement = scheduler.place_one(request("r1"))
    assert placement.host == "over"
    assert placement.score is not None and placement.score < -4


# The fast path (default filters, fused into one comparison) against the general one (every filter's mask).


def random_inventory(rng: random.Random, count: int, huge: bool = False) -> list[HostInventory]:
    models = ["a100", "h100", "l4"]
    hosts = []
    for i in range(count):
        gpus = rng.choice([0, 0, 0, 2, 4, 8])
        memory = rng.choice([16384, 65536, 262144]) * (100 if huge else 1)
        cells = rng.choice([0, 1, 2, 2, 4])
        hosts.append(
            host(
                f"h{i}",
                vcpus=rng.choice([4, 16, 64]),
                memory_mib=memory,
                disk_gib=rng.choice([100, 500, 2000]),
                gpus=gpus,
                cpu_overcommit=rng.choice([1.0, 1.5, 4.0]),
                mem_overcommit=rng.choice([1.0, 1.25]),
                host_reserve=Resources(vcpus=rng.choice([0, 2]), memory_mib=rng.choice([0, 2048])),
                # Some hosts start over-allocated on a resource, which only matters to requests using it.
                allocated=Resources(
                    vcpus=rng.randint(0, 80), memory_mib=rng.randint(0, memory // 2), disk_gib=rng.randint(0, 90)
                ),
                reserved=Resources(gpus=rng.randint(0, gpus)),
                gpu_models={rng.choice(models): gpus} if gpus and rng.random() < 0.8 else {},
                numa_cells=tuple(
                    NumaCell(free_vcpus=rng.randint(0, 32), free_memory_mib=rng.randint(0, memory // 2))
                    for _ in range(cells)
                ),
                enabled=rng.random() > 0.15,
                anti_affinity_groups=frozenset(rng.sample(["a", "b", "c"], rng.randint(0, 2))),
            )
        )
    return hosts


def random_requests(rng: random.Random, count: int, huge: bool = False) -> list[PlacementRequest]:
    requests = []
    for i in range(count):
        gpus = rng.choice([0] * 6 + [1, 2, 4])
        requests.append(
            request(
                f"r{i}",
                tenant=rng.choice(["t1", "t2", "t3"]),
                vcpus=rng.choice([0, 1, 2, 4, 8, 16, 96]),
                memory_mib=rng.choice([0, 1024, 4096, 16384, 65536]) * (100 if huge else 1),
                disk_gib=rng.choice([0, 10, 80]),
                gpus=gpus,
                gpu_model=rng.choice([None, "a100", "h100", "mi300"]) if gpus else None,
                expected_duration_s=rng.choice([None, 30.0, 600.0, 86400.0]),
                anti_affinity_group=rng.choice([None, None, None, "a", "b", "d"]),
                numa_fit=rng.random() < 0.2,
            )
        )
    return requests


def general_path(scheduler: Scheduler) -> Scheduler:
    scheduler._fast = False
    return scheduler


@pytest.mark.parametrize("seed", range(6))
def test_fast_path_makes_exactly_the_decisions_of_the_general_path(seed: int) -> None:
    rng = random.Random(seed)
    huge = seed == 5  # amounts beyond 2**24 keep the free amounts in float64
    hosts = random_inventory(rng, rng.choice([1, 7, 64, 203]), huge)
    requests = random_requests(rng, 400, huge)
    policy = "spread" if seed % 2 else "pack"
    for tenant_weights in (None, {"t1": 1.0, "t2": 2.0}):
        fast = Scheduler(hosts, policy)
        general = general_path(Scheduler(hosts, policy))
        assert fast._fast and not general._fast
        assert (fast.state.free.dtype == np.float64) == huge
        placed = fast.place(requests, tenant_weights)
        assert placed == general.place(requests, tenant_weights)
        assert fast.inventory() == general.inventory()
        assert fast.last_drf == general.last_drf
        assert any(p.placed for p in placed) and not all(p.placed for p in placed)


def test_fast_path_with_no_hosts_every_host_enabled_and_one_at_a_time() -> None:
    assert place_one([], request("r1")).reason == "no hosts to place r1 on"
    rng = random.Random(3)
    hosts = [h.model_copy(update={"enabled": True}) for h in random_inventory(rng, 9)]
    requests = random_requests(rng, 60)
    fast, general = Scheduler(hosts), general_path(Scheduler(hosts))
    assert [fast.place_one(r) for r in requests] == [general.place_one(r) for r in requests]
