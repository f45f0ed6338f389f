"""vfio/ on a real kernel: a TCG guest on q35 with QEMU's Intel IOMMU, QEMU's `edu` device (no host driver, the
stand-in accelerator) and a virtio-rng device on its host driver. The guest runs vfio/ against its own sysfs:
discover the groups, bind edu to vfio-pci and see /dev/vfio/N appear, release it, and refuse a non-viable group.
This is the test that proves the sysfs code outside the fake trees."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, Controller, short_tempdir
from framework.devhost import PrivateLibvirtd

from hvctl.access import copy, run_command
from hvctl.ops.create import create
from hvctl.ops.incarnation import BootOptions
from hvctl.seed import operator_key
from hvctl.spec import VMSpec
from images.store import ImageStore

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]

# edu on the root bus gets a group of its own. Behind a conventional PCI bridge, devices share the bridge's requester
# ID and so one IOMMU group: a second edu there sits with a virtio-rng on its host driver, the "not viable" case.
EMULATED_DEVICES = (
    "-device", "edu,bus=pcie.0,addr=0xa",
    "-device", "pcie-pci-bridge,id=hvctl-br1,bus=pcie.0,addr=0xb",
    "-device", "edu,bus=hvctl-br1,addr=0x1",
    "-device", "virtio-rng-pci,bus=hvctl-br1,addr=0x2",
)


@pytest.fixture(scope="module")
def probe_output(libvirtd: PrivateLibvirtd, image_dir: Path) -> Iterator[dict[str, object]]:
    ImageStore(image_dir).build("base")
    controller = Controller.open(short_tempdir("hvv-"), libvirtd.uri, image_dir)
    ctx, state = controller.ctx, controller.state
    try:
        record = create(ctx, VMSpec.parse(name="iommu", memory_mib=512, disk_gib=2, image="base", viommu=True),
                        options=BootOptions(timeout=180, extra_qemu_args=EMULATED_DEVICES))
        key = operator_key(ctx.paths.keys)
        assert run_command(record, key, "mkdir -p /root/vfio", io.BytesIO(), io.BytesIO()) == 0
        for source in sorted((REPO / "vfio").glob("*.py")):
            copy(record, key, str(source), f"/root/vfio/{source.name}", upload=True)
        copy(record, key, str(REPO / "tests/guest_scripts/vfio_probe.py"), "/root/vfio_probe.py", upload=True)
        out = state / "probe.json"
        with out.open("wb") as stdout, open(state / "probe.err", "wb") as stderr:
            code = run_command(record, key, "python3 /root/vfio_probe.py", stdout, stderr)
        assert code == 0, (state / "probe.err").read_text()
        yield json.loads(out.read_text())
    finally:
        controller.close()


def test_the_guest_kernel_has_iommu_groups(probe_output: dict[str, object]) -> None:
    assert probe_output["iommu"] is True
    groups = probe_output["groups"]
    assert isinstance(groups, dict) and len(groups) > 3 and "-1" not in groups


def test_edu_binds_to_vfio_pci_gets_a_vfio_node_and_goes_back(probe_output: dict[str, object]) -> None:
    edu = probe_output["edu"]
    assert isinstance(edu, dict)
    assert edu["driver_before"] is None
    assert edu["driver_bound"] == "vfio-pci" and edu["dev_vfio"] is True
    # It had no driver before; after release it has none again and no override is left behind.
    assert edu["driver_after"] is None and edu["override_after"] in ("", "(null)")


def test_a_group_with_a_device_on_a_host_driver_is_refused_and_left_alone(probe_output: dict[str, object]) -> None:
    groups = probe_output["multi_device_groups"]
    assert isinstance(groups, list)
    refused = [g for g in groups if not g["viable"]]
    bridged = [g for g in refused if any("virtio-pci" in b for b in g["blockers"])]
    assert bridged, f"the group behind the bridge was not refused: {groups}"
    for group in refused:
        assert str(group["bind"]).startswith("refused:") and group["blockers"]
        assert group["driver_after_refusal"] == group["driver_before"]
