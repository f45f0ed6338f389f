"""hvctl gpu list: every host's GPUs as VFIO sees them, with IOMMU viability and ownership. This machine's come from
its sysfs; any other host's from its libvirt's node devices, through the same viability rules."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hvctl.errors import HostUnreachable, HypervisorError

if TYPE_CHECKING:
    from hvctl.context import Context
    from hvctl.ledger import GpuHealth
    from hvctl.passthrough import Released
from vfio import (
    IOMMU_HINT,
    Gpu,
    PciDevice,
    PciInventory,
    PciSysfs,
    VfioError,
    check_group,
    host_checks,
    plan_devices,
)

# The refusal of a VGA-compatible device on a host whose sysfs hvctl cannot read. Naming the model in the policy is
# the operator saying it is not the host's console.
UNKNOWN_CONSOLE = ("it is a VGA-compatible device, and libvirt cannot tell whether it draws the host's console; "
                   "name its vendor:device in the policy's accelerators to pass it through")


def unpassable(pci: PciInventory, gpu: Gpu, allowlist: tuple[tuple[int, int], ...] = (),
               health: dict[str, GpuHealth] | None = None) -> tuple[str | None, list[PciDevice]]:
    """Why ``gpu`` cannot be passed through from ``pci``'s host (None: it can), and the functions its bind moves.
    `gpu list` shows the reason; create, which also skips GPUs other VMs hold, gives it in its refusal."""
    primary, health = gpu.primary, health or {}
    if gpu.address in health:
        return f"{health[gpu.address].state}: {health[gpu.address].reason}", []
    if primary.boot_vga:
        return "it is the boot VGA device the host console uses", []
    if primary.boot_vga is None and (primary.vendor, primary.device) not in allowlist:
        return UNKNOWN_CONSOLE, []
    if primary.iommu_group is None:
        return "not in any IOMMU group (IOMMU off?)", []
    try:
        functions = plan_devices(pci, gpu)
        report = check_group(pci, primary.iommu_group, [d.address for d in functions])
    except VfioError as exc:
        return exc.message, []
    if not report.viable:
        return (f"group {primary.iommu_group} is not viable: "
                + "; ".join(b.describe() for b in report.blockers)), []
    return None, functions


@dataclass(frozen=True)
class GpuRow:
    """One GPU as `gpu list` shows it."""

    address: str
    ids: str  # vendor:device
    model: str  # as the policy names it, else the ids
    functions: tuple[str, ...]  # every function its passthrough moves with it
    iommu_group: int | None
    driver: str | None
    numa_node: int | None
    reset_method: tuple[str, ...]
    health: str  # "ok", or the state a failed release left it in
    owner: str | None  # the VM holding it
    why_not: str | None  # why it cannot be passed through; None: it can

    @property
    def passable(self) -> bool:
        return self.why_not is None

    def as_json(self) -> dict[str, Any]:
        return {"address": self.address, "ids": self.ids, "model": self.model, "functions": list(self.functions),
                "iommu_group": self.iommu_group, "driver": self.driver, "numa_node": self.numa_node,
                "reset_method": list(self.reset_method), "health": self.health, "owner": self.owner,
                "passable": self.passable, "why_not": self.why_not}


@dataclass(frozen=True)
class HostCheck:
    """A host prerequisite of passthrough (the IOMMU, vfio-pci), with what to do when it is missing."""

    name: str
    ok: bool
    hint: str | None

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "hint": self.hint}


@dataclass(frozen=True)
class HostGpus:
    """One host's GPUs and its checks."""

    gpus: tuple[GpuRow, ...]
    checks: tuple[HostCheck, ...]


@dataclass(frozen=True)
class FleetGpus:
    """`hvctl gpu list`: per host its GPUs and checks, and the hosts that could not be read with why."""

    hosts: dict[str, HostGpus]
    unreachable: dict[str, str]

    def as_json(self) -> dict[str, Any]:
        return {"gpus": [{"host": name} | row.as_json() for name, h in self.hosts.items() for row in h.gpus],
                "checks": {name: [c.as_json() for c in h.checks] for name, h in self.hosts.items()},
                "unreachable": dict(self.unreachable)}


def gpu_rows(pci: PciInventory, owners: dict[str, str] | None = None, allowlist: tuple[tuple[int, int], ...] = (),
             model_of: Callable[[int, int], str] | None = None,
             health: dict[str, GpuHealth] | None = None) -> tuple[GpuRow, ...]:
    """Every GPU with address, model ids, group, driver, NUMA node, reset methods, owner, health, and whether (and
    why not) passable."""
    owners = owners or {}
    health = health or {}
    rows = []
    for gpu in pci.gpus(accelerator_allowlist=allowlist):
        primary = gpu.primary
        why, _ = unpassable(pci, gpu, allowlist, health)
        rows.append(GpuRow(
            address=gpu.address, ids=primary.ids,
            model=model_of(primary.vendor, primary.device) if model_of else primary.ids,
            functions=tuple(d.address for d in gpu.functions), iommu_group=primary.iommu_group,
            driver=primary.driver, numa_node=primary.numa_node, reset_method=tuple(primary.reset_method),
            health=health[gpu.address].state if gpu.address in health else "ok",
            owner=owners.get(gpu.address), why_not=why))
    return tuple(rows)


def list_gpus(sysfs_root: Path = Path("/sys"), owners: dict[str, str] | None = None,
              allowlist: tuple[tuple[int, int], ...] = (),
              model_of: Callable[[int, int], str] | None = None,
              health: dict[str, GpuHealth] | None = None) -> HostGpus:
    """This machine's GPUs from sysfs, and its IOMMU and vfio-pci checks."""
    checks = tuple(HostCheck(c.name, c.ok, None if c.ok else c.hint) for c in host_checks(sysfs_root))
    return HostGpus(gpu_rows(PciSysfs(sysfs_root), owners, allowlist, model_of, health), checks)


def list_fleet_gpus(ctx: Context, hosts: list[str] | None = None, sysfs_root: Path | None = None) -> FleetGpus:
    """``hvctl gpu list``: the GPUs of every registered host (or of ``hosts``). One host's failure never hides the
    others'."""
    from hvctl import passthrough  # which imports this module

    names = hosts or [h.name for h in ctx.ledger.hosts.all()]
    allowlist = passthrough.accelerator_allowlist(ctx)
    found: dict[str, HostGpus] = {}
    unreachable: dict[str, str] = {}
    for name in names:
        ctx.ledger.hosts.get(name)  # an unknown name is refused, not listed empty
        owners, health = passthrough.owners(ctx.ledger, name), ctx.ledger.gpus.health(name)
        if ctx.is_this_machine(name):
            found[name] = list_gpus(sysfs_root or ctx.gpu_env.sysfs_root, owners, allowlist, ctx.policy.gpu_model,
                                    health)
            continue
        try:
            pci = ctx.host(name).pci_devices()
        except (HostUnreachable, HypervisorError) as exc:
            unreachable[name] = exc.message
            continue
        # libvirt loads vfio-pci itself when it detaches a device, so only the IOMMU is a host prerequisite here.
        found[name] = HostGpus(gpu_rows(pci, owners, allowlist, ctx.policy.gpu_model, health),
                               (HostCheck("iommu", pci.iommu_enabled, None if pci.iommu_enabled else IOMMU_HINT),))
    return FleetGpus(found, unreachable)


def release_gpu(ctx: Context, address: str, host: str | None = None, sysfs_root: Path | None = None) -> Released:
    """`hvctl gpu release`: a GPU hvctl bound, back on its host driver once its VM is gone (a crash, a host reboot);
    refused while a VM that exists holds it. ``host``: the one hvctl acts on when None."""
    from hvctl.passthrough import gpu_keepers, release_address  # passthrough imports this module

    on = host or ctx.host_name
    ctx.ledger.hosts.get(on)  # an unknown host is refused before anything is read
    env = dataclasses.replace(ctx.gpu_env, sysfs_root=sysfs_root) if sysfs_root else ctx.gpu_env
    return release_address(ctx, env, address, on, lambda: gpu_keepers(ctx, on))
