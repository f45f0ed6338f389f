"""Run inside a TCG guest with a virtual Intel IOMMU: exercise vfio/ against the guest kernel's real sysfs.

Copied into the guest with vfio/ beside it by tests/functional/test_vm_vfio.py; prints one JSON object.
"""

import json
import os
import subprocess
import sys

sys.path.insert(0, "/root")

from vfio import GroupNotViable, PciSysfs, VfioBinder, check_group, iommu_enabled, plan_devices  # noqa: E402

EDU = (0x1234, 0x11E8)
out: dict[str, object] = {}
subprocess.run(["modprobe", "vfio-pci"], check=True)
sysfs = PciSysfs("/sys")
out["iommu"] = iommu_enabled("/sys")
groups: dict[int, list[str]] = {}
drivers: dict[str, str | None] = {}
for device in sysfs.devices():
    groups.setdefault(device.iommu_group if device.iommu_group is not None else -1, []).append(device.address)
    drivers[device.address] = device.driver
out["groups"] = {str(k): v for k, v in sorted(groups.items())}
out["drivers"] = drivers

# The edu device alone in its group (on the root bus); a second one shares a group behind a PCI bridge.
edu = next(g for g in sysfs.gpus(accelerator_allowlist=(EDU,))
           if g.primary.ids == "1234:11e8" and len(groups[g.primary.iommu_group or -1]) == 1)
group = edu.primary.iommu_group
out["edu"] = {"address": edu.address, "group": group, "driver_before": edu.primary.driver}
binder = VfioBinder(sysfs, bind_timeout=20)
binding = binder.bind(plan_devices(sysfs, edu))
out["edu"]["driver_bound"] = sysfs.current_driver(edu.address)  # type: ignore[index]
out["edu"]["dev_vfio"] = os.path.exists(f"/dev/vfio/{group}")  # type: ignore[index]
binder.release(binding)
out["edu"]["driver_after"] = sysfs.current_driver(edu.address)  # type: ignore[index]
with open(f"/sys/bus/pci/devices/{edu.address}/driver_override") as f:
    out["edu"]["override_after"] = f.read().strip()  # type: ignore[index]

# A group with several endpoints, one of them on a host driver, must be refused and the blocker named.
refusals = []
for number, members in groups.items():
    if number < 0 or len(members) < 2:
        continue
    report = check_group(sysfs, number, [members[0]])
    entry: dict[str, object] = {"group": number, "members": members, "viable": report.viable,
                                "blockers": [b.describe() for b in report.blockers]}
    if not report.viable:
        try:
            binder.bind([members[0]])
            entry["bind"] = "bound (should have been refused)"
        except GroupNotViable as exc:
            entry["bind"] = f"refused: {exc.message}"
        entry["driver_after_refusal"] = sysfs.current_driver(members[0])
        entry["driver_before"] = drivers[members[0]]
    refusals.append(entry)
out["multi_device_groups"] = refusals
print(json.dumps(out))
