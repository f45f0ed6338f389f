"""GPU passthrough on a remote host, end to end: hvctl on this machine, the GPU on another one.

L1 is a TCG guest with QEMU's Intel vIOMMU and QEMU's emulated `edu` PCI device (vendor 0x1234, device 0x11e8; no
host driver, so it stands in for an accelerator, allowlisted by the policy). A second edu sits behind a conventional
PCI bridge with a virtio-rng on its host driver, so its IOMMU group is not viable. L1 runs libvirtd and nothing of
hvctl. hvctl runs here, registers L1 as a host over `qemu+ssh` (its SSH forward, with L1's host key pinned), and
does everything through L1's libvirt: lists its PCI devices from the node-device API, detaches edu to vfio-pci
(virNodeDeviceDetachFlags), boots L2 in L1 with hvctl's own <hostdev>, and reattaches edu when L2 is destroyed.
Real: L1's kernel VFIO and IOMMU groups (QEMU's vIOMMU), L1's libvirt and QEMU, L2's PCI bus. Nothing is faked.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest
from conftest import HVCTL, REPO, Controller, short_tempdir
from framework.controller import NOWHERE, AroundController
from framework.devhost import PrivateLibvirtd
from test_vm_vfio import EMULATED_DEVICES

from hvctl.access import copy, run_command
from hvctl.ledger import VMRecord
from hvctl.ops.create import create
from hvctl.ops.incarnation import BootOptions
from hvctl.seed import operator_key
from hvctl.spec import VMSpec
from images.store import ImageStore

pytestmark = [pytest.mark.vm, pytest.mark.timeout(2400)]

EDU = "0000:00:0a.0"  # edu on L1's root bus gets an IOMMU group of its own
POLICY = """accelerators:
  edu: {vendor: 0x1234, device: 0x11e8}
hosts: {reserve: {memory_mib: 0}}
tenants:
  default: {quota: {vcpus: 4, memory_mib: 2048, disk_gib: 10, gpus: 2, vms: 4}}
"""


@dataclass
class Fleet(AroundController):
    """The controller under test (on this machine) with L1 registered as host ``l1``, and a way into L1 as root."""

    controller: Controller
    uri: str
    l1: VMRecord
    key: Path
    added: subprocess.CompletedProcess[str]  # `hvctl host add l1 URI --json`

    def on_l1(self, command: str) -> str:
        """What ``command`` prints inside L1 (L1's own view, which the test may look at and hvctl does not)."""
        out, err = io.BytesIO(), io.BytesIO()
        assert run_command(self.l1, self.key, command, out, err) == 0, err.getvalue().decode(errors="replace")
        return out.getvalue().decode()

    def driver(self, address: str) -> str:
        return self.on_l1(f"basename \"$(readlink /sys/bus/pci/devices/{address}/driver)\" 2>/dev/null || true")\
            .strip() or "none"

    def bindings(self) -> list[tuple[str, str, str]]:
        return [(r.address, r.vm, r.state) for r in self.controller.ctx.ledger.gpus.bindings("l1")]

    def pool_files(self) -> list[str]:
        return sorted(self.on_l1("ls /var/lib/libvirt/images/hvctl").split())


@pytest.fixture(scope="module")
def fleet(libvirtd: PrivateLibvirtd, image_dir: Path) -> Iterator[Fleet]:
    store = ImageStore(image_dir)
    store.build("nested")
    store.build("minimal")
    outer = Controller.open(short_tempdir("hvn-"), libvirtd.uri, image_dir)  # L0's, which boots L1 (scaffolding)
    ctx = outer.ctx
    inner = Controller.open(short_tempdir("hvf-"), NOWHERE, image_dir, policy=POLICY)  # the controller under test
    state = inner.state
    try:
        # Two vCPUs: L2's QEMU runs its vCPU and I/O threads side by side, and L0 gives each a core (MTTCG). 8 GiB of
        # disk: hvctl's pool on a host wants 2 GiB free for images.
        l1 = create(ctx, VMSpec.parse(name="l1", vcpus=2, memory_mib=2048, disk_gib=8, image="nested", viommu=True),
                    options=BootOptions(timeout=300, extra_qemu_args=EMULATED_DEVICES))
        key = operator_key(ctx.paths.keys)
        copy(l1, key, str(REPO / "tests/guest_scripts/l1_libvirtd.sh"), "/root/l1_libvirtd.sh", upload=True)
        out, err = io.BytesIO(), io.BytesIO()
        assert run_command(l1, key, "sh /root/l1_libvirtd.sh", out, err) == 0, err.getvalue().decode()[-3000:]
        # qemu+ssh runs the ssh binary, which reads known_hosts from the user's own file: a wrapper pins L1's key.
        known_hosts, wrapper = state / "l1_known_hosts", state / "l1_ssh"
        assert l1.host_pubkey
        known_hosts.write_text(f"[127.0.0.1]:{l1.ssh_port} {' '.join(l1.host_pubkey.split()[:2])}\n")
        wrapper.write_text(f"#!/bin/sh\nexec ssh -o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking=yes "
                           f"-o BatchMode=yes -i {key} \"$@\"\n")
        wrapper.chmod(0o700)
        uri = f"qemu+ssh://root@127.0.0.1:{l1.ssh_port}/system?command={wrapper}"
        added = inner.hvctl("host", "add", "l1", uri, "--json", timeout=600)
        yield Fleet(inner, uri, l1, key, added)
    finally:
        try:
            inner.close()  # its VMs first: they run inside L1
        finally:
            outer.close()


def test_host_add_and_gpu_list_show_the_remote_hosts_devices_from_its_libvirt(fleet: Fleet) -> None:
    added = fleet.added
    assert added.returncode == 0, added.stderr
    view = json.loads(added.stdout)
    assert EDU in [g["address"] for g in view["gpus"]] and {g["model"] for g in view["gpus"]} == {"edu"}
    listed = fleet.hvctl("gpu", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    assert data["unreachable"] == {} and set(data["checks"]) == {"local", "l1"}
    assert [c["name"] for c in data["checks"]["l1"] if c["ok"]] == ["iommu"]
    rows = {g["address"]: g for g in data["gpus"] if g["host"] == "l1"}
    assert rows[EDU]["passable"] and rows[EDU]["driver"] is None and rows[EDU]["model"] == "edu"
    # The edu behind the bridge shares its group with a virtio-rng on its host driver, which is named.
    (bridged,) = [g for a, g in rows.items() if a != EDU]
    assert not bridged["passable"] and "bound to host driver virtio-pci" in bridged["why_not"]
    assert [g["host"] for g in json.loads(fleet.hvctl("gpu", "list", "--host", "l1", "--json").stdout)["gpus"]] \
        == ["l1", "l1"]
    table = fleet.hvctl("gpu", "list", "--host", "l1")
    assert table.returncode == 0 and EDU in table.stdout and "l1" in table.stdout


def test_a_request_the_viable_devices_cannot_meet_names_the_group_in_the_way_and_leaves_nothing(
        fleet: Fleet, refused: subprocess.CompletedProcess[str]) -> None:
    assert refused.returncode == 19, refused.stderr
    last = refused.stderr.strip().splitlines()[-1]
    assert "2 GPU(s) of model edu requested on host l1, 1 passable and free" in last
    assert "is not viable" in last and "is bound to host driver virtio-pci" in last and "1af4:" in last
    assert fleet.driver(EDU) == "none" and fleet.bindings() == []
    assert not [f for f in fleet.pool_files() if f.startswith("vm-l4")]
    conn = libvirt.open(fleet.uri)
    try:
        assert [d.name() for d in conn.listAllDomains(0)] == []
    finally:
        conn.close()


@pytest.fixture(scope="module")
def refused(fleet: Fleet) -> subprocess.CompletedProcess[str]:
    """A create for two edus, when only one is in a viable group. It uploads the image to l1 on its way."""
    return fleet.hvctl("create", "l4", "--host", "l1", "--image", "minimal", "--memory", "128", "--gpus", "2",
                       "--gpu-model", "edu")


@pytest.fixture(scope="module")
def race(fleet: Fleet, refused: subprocess.CompletedProcess[str]) -> dict[str, subprocess.CompletedProcess[str]]:
    """Two creates at once for the last passable device: l2 and l3, each asking for one edu. The image is on l1 by
    then (``refused`` put it there), so they race for the device and not also to upload it."""
    env = {"HVCTL_STATE_DIR": str(fleet.state), "HVCTL_CONNECT": NOWHERE, "COLUMNS": "200",
           "NO_COLOR": "1"}
    procs = {name: subprocess.Popen([*HVCTL, "create", name, "--host", "l1", "--image", "minimal", "--memory", "128",
                                     "--gpus", "1", "--gpu-model", "edu", "--boot-timeout", "1200", "--json"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=os.environ | env) for name in ("l2", "l3")}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=1500)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


def winner_of(race: dict[str, subprocess.CompletedProcess[str]]) -> tuple[str, str]:
    won = [name for name, r in race.items() if r.returncode == 0]
    assert len(won) == 1, {name: (r.returncode, r.stderr[-2000:]) for name, r in race.items()}
    return won[0], next(name for name in race if name != won[0])


def test_two_creates_racing_for_the_last_device_one_wins_and_one_is_refused_cleanly(
        fleet: Fleet, race: dict[str, subprocess.CompletedProcess[str]]) -> None:
    winner, loser = winner_of(race)
    lost = race[loser]
    # Refused at the claim (both chose it) or at the choice (the winner's claim came first): one line either way.
    assert lost.returncode in (18, 19), lost.stderr
    last = lost.stderr.strip().splitlines()[-1]
    assert last.startswith("hvctl: error: ") and "Traceback" not in lost.stderr
    assert f"claimed by VM {winner}" in last or f"{EDU} is held by VM {winner}" in last, last
    assert not [f for f in fleet.pool_files() if f.startswith(f"vm-{loser}")]
    assert [(a, vm) for a, vm, _ in fleet.bindings()] == [(EDU, winner)]


def test_the_winner_got_edu_on_vfio_pci_through_libvirt_and_l2_sees_it(
        fleet: Fleet, race: dict[str, subprocess.CompletedProcess[str]]) -> None:
    winner, _ = winner_of(race)
    assert fleet.driver(EDU) == "vfio-pci"
    assert fleet.bindings() == [(EDU, winner, "bound")]  # the ledger's journal
    conn = libvirt.open(fleet.uri)
    try:
        xml = conn.lookupByName(winner).XMLDesc(0)
        # libvirt's own view agrees: the node device is on vfio-pci.
        node = conn.nodeDeviceLookupByName("pci_0000_00_0a_0").XMLDesc(0)
    finally:
        conn.close()
    assert "<hostdev mode='subsystem' type='pci' managed='no'>" in xml
    assert "bus='0x00' slot='0x0a' function='0x0'" in xml
    assert "<name>vfio-pci</name>" in node
    console = fleet.hvctl("console-log", winner)
    assert console.returncode == 0, console.stderr
    assert f"HVCTL-READY name={winner}" in console.stdout
    assert any(line.startswith("HVCTL-PCI ") and line.endswith(" 1234:11e8") for line in console.stdout.splitlines()), \
        console.stdout[-2000:]


def test_destroy_gives_edu_back_through_libvirt_and_the_ledger_holds_no_binding(
        fleet: Fleet, race: dict[str, subprocess.CompletedProcess[str]]) -> None:
    winner, _ = winner_of(race)
    gone = fleet.hvctl("destroy", winner, timeout=600)
    assert gone.returncode == 0, gone.stderr
    assert fleet.driver(EDU) == "none"
    assert fleet.on_l1(f"cat /sys/bus/pci/devices/{EDU}/driver_override").strip() in ("", "(null)")
    assert fleet.on_l1("ls /dev/vfio").split() == ["vfio"]
    assert fleet.bindings() == []
    assert not [f for f in fleet.pool_files() if f.startswith("vm-")]
    listed = json.loads(fleet.hvctl("gpu", "list", "--host", "l1", "--json").stdout)
    (edu,) = [g for g in listed["gpus"] if g["address"] == EDU]
    assert edu["passable"] and edu["owner"] is None and edu["driver"] is None


def test_a_create_killed_after_its_domain_was_defined_is_undone_by_doctor_repair_through_libvirt(
        fleet: Fleet, race: dict[str, subprocess.CompletedProcess[str]]) -> None:
    """After the destroy above, edu is free again. A create is killed (SIGKILL, hvctl's crash hook) once its domain
    is defined on l1, with edu already detached to vfio-pci; `doctor --repair` finds it all from the ledger."""
    killed = fleet.hvctl("create", "l5", "--host", "l1", "--image", "minimal", "--memory", "128", "--gpus", "1",
                         "--gpu-model", "edu", crash_after="create.defined", timeout=600)
    assert killed.returncode == -9, killed.stderr
    assert fleet.driver(EDU) == "vfio-pci" and [(a, vm) for a, vm, _ in fleet.bindings()] == [(EDU, "l5")]
    repaired = fleet.hvctl("doctor", "--repair", "--json", timeout=600)
    data = json.loads(repaired.stdout)["repaired"]
    assert data["gpus_unreachable"] == {}, data
    assert any("l5" in op["operation"] for op in data["operations"]) or EDU in data["gpus_returned"], data
    assert fleet.driver(EDU) == "none" and fleet.bindings() == []
    assert not [f for f in fleet.pool_files() if f.startswith("vm-l5")]
    conn = libvirt.open(fleet.uri)
    try:
        assert [d.name() for d in conn.listAllDomains(0)] == []
    finally:
        conn.close()
    again = fleet.hvctl("doctor", "--repair", "--json")
    assert json.loads(again.stdout)["repaired"]["operations"] == []
