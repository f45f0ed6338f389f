"""Turn the ledger's hosts and allocations into scheduler inventories, and pick a host for a spec."""

from __future__ import annotations

from hvctl.accounting import host_footprint
from hvctl.designer import qemu_overhead_mib
from hvctl.errors import HvctlError
from hvctl.ledger import Admission, HostRecord, Ledger
from hvctl.policy import Policy
from hvctl.scheduler import HostInventory, NumaCell, PlacementRequest, Resources, place_one
from hvctl.spec import VMSpec

# Hosts do not report disk capacity through libvirt; disk is limited by tenant quotas only.
UNLIMITED_DISK_GIB = 1 << 30


class NoValidHost(HvctlError):
    exit_code = 17


def host_limit(policy: Policy, record: HostRecord, gpus: int) -> dict[str, float | None]:
    reserve = policy.hosts.reserve
    return {
        "vcpus": max((record.cpus or 0) - reserve.vcpus, 0) * policy.hosts.cpu_overcommit,
        "memory_mib": max((record.memory_mib or 0) - reserve.memory_mib, 0) * policy.hosts.mem_overcommit,
        "disk_gib": (max(record.disk_gib - reserve.disk_gib, 0) * policy.hosts.disk_overcommit
                     if record.disk_gib is not None else None),
        "gpus": max(gpus - reserve.gpus, 0),
        "vms": None,
    }



def host_allowance(ledger: Ledger, policy: Policy, host: str) -> dict[str, float | None]:
    """What may be allocated on ``host`` under ``policy``: its probed size less the reserve, times the overcommit,
    and its GPUs."""
    return host_limit(policy, ledger.hosts.get(host), len(ledger.hosts.hardware(host).gpus))


def admission_for(ledger: Ledger, policy: Policy, tenant: str, host: str) -> Admission:
    """The limits a new allocation of ``tenant`` on ``host`` is admitted against, in the ledger's transaction."""
    return Admission(tenant_limit=policy.tenant(tenant).quota.model_dump(),
                     host_limit=host_allowance(ledger, policy, host))

def inventory(ledger: Ledger, policy: Policy, record: HostRecord) -> HostInventory:
    hardware = ledger.hosts.hardware(record.name)
    used = ledger.host_usage(record.name)
    groups = frozenset(v.spec.anti_affinity for v in ledger.vms.all(host=record.name) if v.spec.anti_affinity)
    models: dict[str, int] = {}
    unhealthy = ledger.gpus.health(record.name)
    gpus = tuple(g for g in hardware.gpus if g.address not in unhealthy)  # dead until a host reboot: not capacity
    # Devices a VM holds (claimed or bound, not yet given back) are not free, whatever model they are. The inventory
    # rows carry no owner: the ledger's GPU journal is where ownership lives.
    from hvctl.passthrough import owners  # passthrough imports ops, which import this module

    held = owners(ledger, record.name)
    for gpu in gpus:
        if gpu.address not in held:
            models[gpu.model] = models.get(gpu.model, 0) + 1
    reserve = policy.hosts.reserve
    return HostInventory(
        name=record.name,
        capacity=Resources(vcpus=record.cpus or 0, memory_mib=record.memory_mib or 0,
                           disk_gib=UNLIMITED_DISK_GIB if record.disk_gib is None
                           else round(max(record.disk_gib - reserve.disk_gib, 0) * policy.hosts.disk_overcommit),
                           gpus=len(gpus)),
        allocated=Resources(vcpus=round(used.vcpus), memory_mib=round(used.memory_mib), disk_gib=round(used.disk_gib),
                            gpus=round(used.gpus)),
        cpu_overcommit=policy.hosts.cpu_overcommit,
        mem_overcommit=policy.hosts.mem_overcommit,
        host_reserve=Resources(vcpus=reserve.vcpus, memory_mib=reserve.memory_mib, gpus=reserve.gpus),
        gpu_models=models,
        numa_cells=tuple(NumaCell(free_vcpus=c.cpus, free_memory_mib=c.memory_mib) for c in hardware.numa_cells),
        enabled=record.enabled,
        anti_affinity_groups=groups,
    )


def placement_request(spec: VMSpec, policy: Policy) -> PlacementRequest:
    charge = host_footprint(spec)
    return PlacementRequest(
        id=spec.name, tenant=spec.tenant,
        resources=Resources(vcpus=spec.vcpus, memory_mib=spec.memory_mib + qemu_overhead_mib(spec),
                            disk_gib=spec.disk_gib, gpus=int(charge.gpus)),
        gpu_model=spec.gpus.model, expected_duration_s=policy.placement.default_duration_s,
        anti_affinity_group=spec.anti_affinity,
    )


def choose_host(ledger: Ledger, policy: Policy, spec: VMSpec) -> str:
    hosts = [h for h in ledger.hosts.all() if h.cpus is not None]
    if not hosts:
        raise NoValidHost("no host with known capacity is registered", hint="`hvctl host add NAME URI`")
    decision = place_one([inventory(ledger, policy, h) for h in hosts], placement_request(spec, policy),
                         policy.placement.mode)
    if decision.host is None:
        raise NoValidHost(f"no host can take {spec.name}: {decision.reason}")
    return decision.host
