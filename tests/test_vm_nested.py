"""GPU passthrough end to end, nested: the proof short of a real GPU.

L1 is a TCG guest with QEMU's Intel vIOMMU and an emulated `edu` PCI device (vendor 0x1234, device 0x11e8; no host
driver, so it stands in for an accelerator, allowlisted by the policy). QEMU, libvirt and hvctl's dependencies are in
its image; the test copies hvctl's source and the `minimal` image in. Inside L1, hvctl runs against L1's own libvirtd:
`create l2 --gpus 1 --gpu-model edu` binds edu to vfio-pci through vfio/, writes hvctl's own <hostdev> XML, and L2
boots with the device on its PCI bus, which L2's console lists. `destroy l2` gives the device back.
Real: the kernel's VFIO (L1's), the IOMMU (QEMU's vIOMMU), libvirt and QEMU inside L1. Nothing here is faked.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, short_tempdir

from hvctl.access import copy, run_command
from hvctl.context import Context
from hvctl.devhost import PrivateLibvirtd
from hvctl.ops.create import create
from hvctl.ops.incarnation import BootOptions
from hvctl.ops.lifecycle import destroy
from hvctl.seed import operator_key
from hvctl.spec import VMSpec
from images.store import ImageStore

pytestmark = [pytest.mark.vm, pytest.mark.timeout(2400)]

EDU = "0000:00:0a.0"  # edu on L1's root bus gets an IOMMU group of its own
EDU_DEVICE = ("-device", "edu,bus=pcie.0,addr=0xa")


@pytest.fixture(scope="module")
def nested(libvirtd: PrivateLibvirtd, image_dir: Path) -> Iterator[dict[str, object]]:
    store = ImageStore(image_dir)
    store.build("nested")
    minimal = store.build("minimal")
    state = short_tempdir("hvn-")
    (state / "images").symlink_to(image_dir)
    ctx = Context(state_dir=state, uri=libvirtd.uri)
    try:
        # Two vCPUs: L2's QEMU runs its vCPU and I/O threads side by side, and L0 gives each a core (MTTCG).
        l1 = create(ctx, VMSpec.parse(name="l1", vcpus=2, memory_mib=2048, disk_gib=4, image="nested", viommu=True),
                    options=BootOptions(timeout=300, extra_qemu_args=EDU_DEVICE))
        bundle = state / "hvctl.tar.gz"
        with tarfile.open(bundle, "w:gz") as tar:
            for part in ("hvctl", "vfio", "images", "guest", "policies"):
                tar.add(REPO / part, arcname=part, filter=lambda t: None if "__pycache__" in t.name else t)
            tar.add(minimal.directory, arcname=minimal.directory.name)
        key = operator_key(ctx.paths.keys)
        copy(l1, key, str(bundle), "/root/hvctl.tar.gz", upload=True)
        copy(l1, key, str(REPO / "tests/guest_scripts/nested_l1.sh"), "/root/nested_l1.sh", upload=True)
        out, err = io.BytesIO(), io.BytesIO()
        code = run_command(l1, key, f"sh /root/nested_l1.sh {minimal.directory.name} {EDU}", out, err)
        (state / "l1-stderr.txt").write_bytes(err.getvalue())
        assert code == 0, err.getvalue().decode(errors="replace")[-3000:]
        yield json.loads(out.getvalue().decode().strip().splitlines()[-1])
    finally:
        for vm in ctx.ledger.list_vms():
            destroy(ctx, vm.name)
        ctx.close()
        shutil.rmtree(state, ignore_errors=True)


def test_l1_sees_edu_as_a_passable_accelerator(nested: dict[str, object]) -> None:
    before = nested["gpu_before"]
    assert isinstance(before, dict)
    (edu,) = [g for g in before["gpus"] if g["address"] == EDU]
    assert edu["model"] == "edu" and edu["passable"] and edu["driver"] is None
    assert any(c["name"] == "iommu" and c["ok"] for c in before["host"])
    host = nested["host"]
    assert isinstance(host, dict) and [g["address"] for g in host["gpus"]] == [EDU]


def test_hvctl_in_l1_binds_edu_and_passes_it_to_l2_with_its_own_hostdev(nested: dict[str, object]) -> None:
    assert nested["driver_during"] == "vfio-pci"
    assert nested["bindings_during"] == [{"address": EDU, "vm": "l2", "state": "bound"}]  # the ledger's journal
    xml = str(nested["l2_xml"])
    assert "<hostdev mode='subsystem' type='pci' managed='no'>" in xml
    assert "bus='0x00' slot='0x0a' function='0x0'" in xml


def test_l2_sees_the_device_on_its_pci_bus(nested: dict[str, object]) -> None:
    console = str(nested["l2_console"])
    assert "HVCTL-READY name=l2" in console
    assert any(line.startswith("HVCTL-PCI ") and line.endswith(" 1234:11e8") for line in console.splitlines()), \
        console[-2000:]


def test_destroying_l2_returns_edu_to_no_driver(nested: dict[str, object]) -> None:
    assert nested["driver_after"] is None
    assert nested["override_after"] in ("", "(null)")
    assert nested["vfio_nodes_after"] == [] and nested["bindings_after"] == []
