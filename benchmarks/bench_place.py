"""Benchmark the placement scheduler against a naive first-fit loop on a synthetic cluster.

5,000 hosts of mixed sizes (some with GPUs of two models, a few disabled, partly allocated already)
receive 10,000 requests from 20 tenants with different weights. Demand is set above capacity on
purpose, so that the order in which tenants are served, and so DRF, decides who gets what.

Run from the repository root: ``.venv/bin/python benchmarks/bench_place.py``. The report is printed and
written to ``benchmarks/results/bench_place.txt``; its last line is machine-readable.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hvctl.scheduler import HostInventory, NumaCell, Placement, PlacementRequest, Resources, Scheduler

SEED = 20240601
HOST_COUNT = 5_000
REQUEST_COUNT = 10_000
TENANT_COUNT = 20
GPU_MODELS = ("a100", "h100")
# The naive loop gets this much wall time; its rate is extrapolated per request from what it finished.
NAIVE_BUDGET_S = 20.0
RESULTS_PATH = Path(__file__).resolve().parent / "results" / "bench_place.txt"

# (vcpus, memory GiB, disk GiB, gpus, share of hosts)
HOST_SHAPES = (
    (16, 64, 500, 0, 0.25),
    (32, 128, 1000, 0, 0.30),
    (64, 256, 2000, 0, 0.20),
    (128, 512, 4000, 0, 0.15),
    (64, 512, 4000, 4, 0.06),
    (96, 1024, 8000, 8, 0.04),
)


def make_hosts(rng: np.random.Generator) -> list[HostInventory]:
    shapes = rng.choice(len(HOST_SHAPES), size=HOST_COUNT, p=[s[4] for s in HOST_SHAPES])
    reserve = Resources(vcpus=2, memory_mib=4096, disk_gib=50)
    hosts = []
    for i, shape in enumerate(shapes):
        vcpus, memory_gib, disk_gib, gpus, _ = HOST_SHAPES[shape]
        capacity = Resources(vcpus=vcpus, memory_mib=memory_gib * 1024, disk_gib=disk_gib, gpus=gpus)
        cpu_overcommit = float(rng.choice([1.0, 2.0, 4.0]))
        mem_overcommit = float(rng.choice([1.0, 1.0, 1.25]))
        # Up to 30% of the physical CPU, memory and disk is already taken by running VMs.
        taken = rng.uniform(0.0, 0.3)
        allocated = Resources(
            vcpus=int((vcpus - 2) * taken),
            memory_mib=int((memory_gib * 1024 - 4096) * taken),
            disk_gib=int((disk_gib - 50) * taken),
        )
        half_vcpus = (vcpus - 2 - allocated.vcpus) // 2
        half_memory = (memory_gib * 1024 - 4096 - allocated.memory_mib) // 2
        cell = NumaCell(free_vcpus=half_vcpus, free_memory_mib=half_memory)
        gpu_models = {str(rng.choice(GPU_MODELS)): gpus} if gpus else {}
        hosts.append(
            HostInventory(
                name=f"h{i:05d}",
                capacity=capacity,
                allocated=allocated,
                cpu_overcommit=cpu_overcommit,
                mem_overcommit=mem_overcommit,
                host_reserve=reserve,
                gpu_models=gpu_models,
                numa_cells=(cell, cell),
                enabled=bool(rng.random() > 0.01),
            )
        )
    return hosts


def make_requests(rng: np.random.Generator) -> tuple[list[PlacementRequest], dict[str, float]]:
    tenants = [f"t{i:02d}" for i in range(TENANT_COUNT)]
    weights = {t: float(w) for t, w in zip(tenants, rng.choice([1, 1, 2, 3], size=TENANT_COUNT), strict=True)}
    # Each tenant leans towards small or large VMs, so that dominant resources and sizes differ.
    vcpu_choices = np.array([2, 4, 8, 16, 32, 64])
    leanings = rng.dirichlet(np.ones(len(vcpu_choices)), size=TENANT_COUNT)
    memory_per_vcpu = rng.choice([2, 4, 8, 12], size=TENANT_COUNT)
    requests = []
    for i in range(REQUEST_COUNT):
        tenant = int(rng.integers(TENANT_COUNT))
        vcpus = int(rng.choice(vcpu_choices, p=leanings[tenant]))
        memory_mib = int(vcpus * memory_per_vcpu[tenant] * 1024 * rng.choice([0.5, 1.0, 1.5]))
        gpus = int(rng.choice([1, 2, 4, 8])) if rng.random() < 0.06 else 0
        gpu_model = str(rng.choice(GPU_MODELS)) if gpus and rng.random() < 0.6 else None
        duration = float(np.exp(rng.uniform(np.log(60), np.log(7 * 86400)))) if rng.random() < 0.8 else None
        requests.append(
            PlacementRequest(
                id=f"r{i:05d}",
                tenant=tenants[tenant],
                resources=Resources(
                    vcpus=vcpus,
                    memory_mib=memory_mib,
                    disk_gib=int(rng.choice([20, 50, 100, 200])),
                    gpus=gpus,
                ),
                gpu_model=gpu_model,
                expected_duration_s=duration,
                anti_affinity_group=f"g{int(rng.integers(300))}" if rng.random() < 0.05 else None,
                numa_fit=bool(rng.random() < 0.1),
            )
        )
    return requests, weights


@dataclass
class NaiveHost:
    """Plain-Python host state for the first-fit baseline."""

    name: str
    enabled: bool
    free: list[int]  # vcpus, memory, disk, gpus
    gpu_models: dict[str, int]
    numa_cells: list[list[int]]
    groups: set[str]


def naive_first_fit(
    hosts: Sequence[HostInventory], requests: Sequence[PlacementRequest], budget_s: float
) -> tuple[list[str | None], float, np.ndarray]:
    """First host (in list order) that passes every filter; stops after ``budget_s`` of wall time.

    Returns the host chosen per request tried, the time taken and the free (vCPUs, memory, disk) of each
    enabled host afterwards.
    """
    state = [
        NaiveHost(
            h.name,
            h.enabled,
            [e - u for e, u in zip(h.effective_capacity().as_tuple(), h.in_use().as_tuple(), strict=True)],
            dict(h.gpu_models),
            [[c.free_vcpus, c.free_memory_mib] for c in h.numa_cells],
            set(h.anti_affinity_groups),
        )
        for h in hosts
    ]
    chosen: list[str | None] = []
    started = time.perf_counter()
    for request in requests:
        if time.perf_counter() - started > budget_s:
            break
        vcpus, memory, disk, gpus = request.resources.as_tuple()
        model, group = request.gpu_model, request.anti_affinity_group
        found: str | None = None
        for host in state:
            free = host.free
            if not host.enabled or free[0] < vcpus or free[1] < memory or free[2] < disk or free[3] < gpus:
                continue
            if model is not None and host.gpu_models.get(model, 0) < gpus:
                continue
            if group is not None and group in host.groups:
                continue
            cell = None
            if request.numa_fit:
                cell = next((c for c in host.numa_cells if c[0] >= vcpus and c[1] >= memory), None)
                if cell is None:
                    continue
            free[0] -= vcpus
            free[1] -= memory
            free[2] -= disk
            free[3] -= gpus
            if gpus and host.gpu_models:
                take_from = model or max(host.gpu_models, key=host.gpu_models.__getitem__)
                host.gpu_models[take_from] -= gpus
            if cell is not None:
                cell[0] -= vcpus
                cell[1] -= memory
            if group is not None:
                host.groups.add(group)
            found = host.name
            break
        chosen.append(found)
    elapsed = time.perf_counter() - started
    free_after = np.array([h.free[:3] for h in state if h.enabled], dtype=np.float64)
    return chosen, elapsed, free_after


def weighted_shares(
    hosts: Sequence[HostInventory],
    requests: Sequence[PlacementRequest],
    chosen: Sequence[str | None],
    weights: dict[str, float],
) -> dict[str, float]:
    """Each tenant's dominant share of the enabled hosts' effective capacity, divided by its weight.

    Only what this round placed counts, since the synthetic hosts' earlier allocations have no tenant.
    """
    capacity = np.sum([h.effective_capacity().as_tuple() for h in hosts if h.enabled], axis=0)
    usage = {t: np.zeros(4) for t in weights}
    for request, host in zip(requests, chosen, strict=True):
        if host is not None:
            usage[request.tenant] += request.resources.as_tuple()
    return {
        t: float(np.max(np.divide(u, capacity, where=capacity > 0, out=np.zeros(4)))) / weights[t]
        for t, u in usage.items()
    }


def spread_of(shares: dict[str, float], tenants: set[str] | None = None) -> float:
    """max - min over ``tenants`` (all of them by default)."""
    values = [v for t, v in shares.items() if tenants is None or t in tenants]
    return max(values) - min(values) if values else 0.0


def stranded_fractions(
    free: np.ndarray, smallest: np.ndarray, capacity_vcpus: float
) -> tuple[float, float, float]:
    """Fragmentation after a round, from the free (vCPUs, memory, disk) of each enabled host.

    A host's free capacity is stranded when the host cannot take even the smallest request of the batch
    (the per-resource minimum of vCPUs, memory and disk over all requests). Returns the stranded share of
    the free vCPUs and of the free memory, and the share of all vCPUs left free.
    """
    stranded = np.any(free < smallest, axis=1)
    free_vcpus, free_memory = free[:, 0].clip(min=0), free[:, 1].clip(min=0)
    return (
        float(free_vcpus[stranded].sum() / max(free_vcpus.sum(), 1)),
        float(free_memory[stranded].sum() / max(free_memory.sum(), 1)),
        float(free_vcpus.sum() / capacity_vcpus),
    )


def fairness_and_fragmentation(
    label: str,
    hosts: Sequence[HostInventory],
    requests: Sequence[PlacementRequest],
    chosen: Sequence[str | None],
    weights: dict[str, float],
    free_after: np.ndarray,
) -> tuple[float, float, list[str]]:
    """Placed fraction, DRF spread and report lines for one scheduler's outcome."""
    placed = sum(h is not None for h in chosen) / len(requests)
    shares = weighted_shares(hosts, requests, chosen, weights)
    spread = spread_of(shares)
    # DRF can only equalise tenants that wanted more than they got; the others simply got everything.
    wanting_more = {r.tenant for r, h in zip(requests, chosen, strict=True) if h is None}
    mean_share = float(np.mean(list(shares.values())))
    smallest = np.min([r.resources.as_tuple()[:3] for r in requests], axis=0)
    capacity_vcpus = sum(h.effective_capacity().vcpus for h in hosts if h.enabled)
    cpu_stranded, mem_stranded, cpu_free = stranded_fractions(free_after, smallest, capacity_vcpus)
    return (
        placed,
        spread,
        [
            f"{label} placed {placed:.3f} of requests; DRF spread (max - min weighted dominant share) "
            f"{spread:.4f} over all {len(shares)} tenants ({spread / mean_share:.0%} of the mean share), "
            f"{spread_of(shares, wanting_more):.4f} over the {len(wanting_more)} tenants with refusals",
            f"{label} fragmentation: {cpu_stranded:.3f} of free vCPUs and {mem_stranded:.3f} of free memory "
            f"are stranded on hosts that cannot fit the smallest request; {cpu_free:.3f} of vCPUs left free",
        ],
    )


def main() -> int:
    lines: list[str] = []

    def report(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    rng = np.random.default_rng(SEED)
    hosts = make_hosts(rng)
    requests, weights = make_requests(rng)
    cores = os.cpu_count()
    report(f"# bench_place  {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}")
    report(
        f"# machine: {platform.machine()}, {cores} cores, "
        f"python {platform.python_version()}, numpy {np.__version__}"
    )
    total = np.sum([h.effective_capacity().as_tuple() for h in hosts if h.enabled], axis=0)
    demand = np.sum([r.resources.as_tuple() for r in requests], axis=0)
    free_before = total - np.sum([h.in_use().as_tuple() for h in hosts if h.enabled], axis=0)
    report(f"# {HOST_COUNT} hosts, {REQUEST_COUNT} requests, {TENANT_COUNT} tenants, seed {SEED}")
    report(
        "# demand / free before the round (vcpus, memory, disk, gpus): "
        + ", ".join(f"{d / f:.2f}" for d, f in zip(demand, free_before, strict=True))
    )

    started = time.perf_counter()
    scheduler = Scheduler(hosts, "pack")
    built = time.perf_counter()
    placements: list[Placement] = scheduler.place(requests, tenant_weights=weights)
    ours_s = time.perf_counter() - started
    ours_per_s = len(requests) / ours_s
    report(
        f"ours  (numpy, pack, weighted DRF): {len(requests)} requests decided in {ours_s:.3f} s, of which "
        f"{built - started:.3f} s building the state = {ours_per_s:,.0f} placements/s "
        "(every request decided, placed or refused, counts as a placement)"
    )
    ours_free = np.array(
        [
            np.subtract(h.effective_capacity().as_tuple(), h.in_use().as_tuple())[:3]
            for h in scheduler.inventory()
            if h.enabled
        ],
        dtype=np.float64,
    )
    ours_chosen = [p.host for p in placements]
    placed, spread, lines_out = fairness_and_fragmentation(
        "ours ", hosts, requests, ours_chosen, weights, ours_free
    )
    for line in lines_out:
        report(line)

    naive_chosen, naive_s, naive_free = naive_first_fit(hosts, requests, NAIVE_BUDGET_S)
    naive_per_s = len(naive_chosen) / naive_s
    complete = len(naive_chosen) == len(requests)
    report(
        f"naive (plain Python first-fit over the hosts, FIFO, same filters): {len(naive_chosen)} requests in "
        f"{naive_s:.3f} s = {naive_per_s:,.0f} placements/s"
        + (
            " (the whole batch)"
            if complete
            else f" (stopped at its {NAIVE_BUDGET_S:.0f} s budget; its rate is extrapolated per placement "
            "from the requests it finished, the cheaper early ones, so the ratio below is conservative)"
        )
    )
    if complete:
        for line in fairness_and_fragmentation("naive", hosts, requests, naive_chosen, weights, naive_free)[
            2
        ]:
            report(line)
    ratio = ours_per_s / naive_per_s
    report(
        "goals: >= 20000 placements/s: {}; >= 10x naive: {}; spread <= 0.05: {}".format(
            *("met" if ok else "MISSED" for ok in (ours_per_s >= 20_000, ratio >= 10, spread <= 0.05))
        )
    )
    report(
        f"placements_per_s={ours_per_s:.0f} naive_per_s={naive_per_s:.0f} ratio={ratio:.1f} "
        f"placed={placed:.3f} spread={spread:.4f}"
    )

    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
