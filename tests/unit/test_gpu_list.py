"""`hvctl gpu list` on a fake sysfs tree (no GPU or IOMMU exists on these machines; see tests/fakesysfs.py), and on
this machine's real sysfs, where it must honestly find none."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import short_tempdir
from fakesysfs import BMC_VGA, GPU, H100, IDLE_GPU, NIC, standard_host

from hvctl.ops.gpus import list_gpus


def test_gpu_list_reports_viability_and_why_not(tmp_path: Path) -> None:
    host = standard_host(tmp_path)
    rows = {g.address: g for g in list_gpus(host.sys).gpus}
    assert {GPU, H100, BMC_VGA, IDLE_GPU} <= set(rows)
    assert rows[GPU].passable and rows[GPU].driver == "nvidia" and len(rows[GPU].functions) == 2
    assert not rows[H100].passable and NIC in (rows[H100].why_not or "") and "e1000e" in (rows[H100].why_not or "")
    assert rows[H100].numa_node == 1
    assert not rows[BMC_VGA].passable and "boot VGA" in (rows[BMC_VGA].why_not or "")
    assert rows[IDLE_GPU].passable and rows[IDLE_GPU].driver is None
    assert rows[GPU].as_json()["passable"] is True and rows[GPU].as_json()["functions"] == list(rows[GPU].functions)


def test_gpu_list_cli_on_this_machine_finds_none_and_says_why(tmp_path: Path) -> None:
    state = short_tempdir("hvgl-")
    env = os.environ | {"HVCTL_STATE_DIR": str(state), "NO_COLOR": "1", "COLUMNS": "200"}
    result = subprocess.run([sys.executable, "-m", "hvctl.cli", "gpu", "list", "--json"], capture_output=True,
                            text=True, env=env)
    shutil.rmtree(state)
    assert result.returncode == 0
    data = json.loads(result.stdout)
    real_gpus = [d for d in Path("/sys/bus/pci/devices").glob("*")
                 if (d / "class").read_text().startswith("0x03")]
    assert len(data["gpus"]) == len(real_gpus) and data["unreachable"] == {}
    assert {g["host"] for g in data["gpus"]} <= {"local"}
    iommu = next(c for c in data["checks"]["local"] if c["name"] == "iommu")
    assert iommu["ok"] == any(Path("/sys/kernel/iommu_groups").glob("*"))
    if not iommu["ok"]:
        assert "intel_iommu=on" in iommu["hint"]


def test_gpu_release_cli_refuses_bad_addresses_in_one_line_without_touching_anything(tmp_path: Path) -> None:
    host = standard_host(tmp_path / "fake")  # a FAKE sysfs tree: nothing here has a GPU
    before = host.snapshot()
    state = short_tempdir("hvgl-")
    env = os.environ | {"HVCTL_STATE_DIR": str(state), "NO_COLOR": "1", "COLUMNS": "200"}
    for address, expected in (("0000:99:00.0", "no PCI device 0000:99:00.0"), (NIC, "is not a GPU"),
                              ("zzz", "'zzz' is not a PCI address"), (GPU, "is not bound by hvctl")):
        result = subprocess.run([sys.executable, "-m", "hvctl.cli", "gpu", "release", address, "--sysfs",
                                 str(host.sys)], capture_output=True, text=True, env=env)
        assert result.returncode == 2 and expected in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert host.snapshot() == before
    shutil.rmtree(state)
