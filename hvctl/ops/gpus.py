"""hvctl gpu list: the host's GPUs as VFIO sees them, from sysfs, with IOMMU viability and ownership."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from vfio import PciSysfs, VfioError, check_group, host_checks, plan_devices


def list_gpus(sysfs_root: Path = Path("/sys"), owners: dict[str, str] | None = None,
              allowlist: tuple[tuple[int, int], ...] = (),
              model_of: Callable[[int, int], str] | None = None,
              health: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Every GPU with address, model ids, group, driver, NUMA node, reset methods, owner, health, and whether (and
    why not) passable."""
    owners = owners or {}
    health = health or {}
    sysfs = PciSysfs(sysfs_root)
    rows = []
    for gpu in sysfs.gpus(accelerator_allowlist=allowlist):
        primary = gpu.primary
        passable, why = True, None
        if gpu.address in health:
            passable, why = False, f"{health[gpu.address]['state']}: {health[gpu.address]['reason']}"
        elif primary.boot_vga:
            passable, why = False, "it is the boot VGA device the host console uses"
        elif primary.iommu_group is None:
            passable, why = False, "not in any IOMMU group (IOMMU off?)"
        else:
            try:
                wanted = [d.address for d in plan_devices(sysfs, gpu)]
                report = check_group(sysfs, primary.iommu_group, wanted)
                if not report.viable:
                    passable, why = False, "; ".join(b.describe() for b in report.blockers)
            except VfioError as exc:
                passable, why = False, exc.message
        rows.append({
            "address": gpu.address, "ids": primary.ids,
            "model": model_of(primary.vendor, primary.device) if model_of else primary.ids,
            "functions": [d.address for d in gpu.functions],
            "iommu_group": primary.iommu_group, "driver": primary.driver, "numa_node": primary.numa_node,
            "reset_method": list(primary.reset_method),
            "health": health[gpu.address]["state"] if gpu.address in health else "ok",
            "owner": owners.get(gpu.address), "passable": passable, "why_not": why,
        })
    checks = [{"name": c.name, "ok": c.ok, "hint": None if c.ok else c.hint} for c in host_checks(sysfs_root)]
    return {"gpus": rows, "host": checks}
