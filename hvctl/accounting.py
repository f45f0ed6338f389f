"""Resource accounting. A VM's footprint R_vm = Σ_i R_vm,i is a vector over resources i (vCPUs, memory, disk,
GPUs). Two views of it:

* what it charges its **tenant**: exactly what was asked for, so a VM sized to its tenant's quota fits the quota
  (harvester#6293 refused such VMs by counting hypervisor overhead against the tenant);
* what it takes from its **host**: that plus QEMU's own memory, which the host must really have.

Admission compares usage + request with a limit per resource and names the first resource that does not fit.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hvctl.spec import VMSpec

UNITS = {"vcpus": "", "memory_mib": " MiB", "disk_gib": " GiB", "gpus": "", "vms": ""}
NAMES = {"vcpus": "vcpus", "memory_mib": "memory", "disk_gib": "disk", "gpus": "gpus", "vms": "vms"}


@dataclass(frozen=True)
class Usage:
    vcpus: float = 0
    memory_mib: float = 0
    disk_gib: float = 0
    gpus: float = 0
    vms: float = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def tenant_charge(spec: VMSpec) -> Usage:
    return Usage(spec.vcpus, spec.memory_mib, spec.disk_gib, spec.gpus.count, 1)


def host_footprint(spec: VMSpec) -> Usage:
    from hvctl.designer import qemu_overhead_mib  # the designer is heavy; `hvctl list` never needs it

    return Usage(spec.vcpus, spec.memory_mib + qemu_overhead_mib(spec), spec.disk_gib, spec.gpus.count, 1)


def first_excess(who: str, request: Usage, used: Usage, limit: dict[str, float | None]) -> str | None:
    """The refusal for the first resource over its limit, e.g.
    ``tenant acme: memory 6144 MiB requested, 10240 of 12288 MiB in use``; None when everything fits."""
    for key, cap in limit.items():
        want = getattr(request, key)
        have = getattr(used, key)
        if cap is not None and want > 0 and have + want > cap + 1e-9:
            unit = UNITS[key]
            return f"{who}: {NAMES[key]} {_n(want)}{unit} requested, {_n(have)} of {_n(cap)}{unit} in use"
    return None


def _n(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.2f}"
