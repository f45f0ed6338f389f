"""The production NIC (`create --bridge/--network --ip`): what the seed tells the guest, and refusals before
anything is written. tests/functional/test_vm_base.py boots a guest on a real bridge and SSHes to it there."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from test_gpu_create import Rig

from hvctl.errors import InvalidSpec
from hvctl.ops.create import create
from hvctl.seed import USER_NIC_MAC, build_seed, generate_ed25519
from hvctl.spec import NetworkAttach, VMSpec


def test_the_seed_carries_the_nic_for_hvctl_init_and_for_cloud_init(tmp_path: Path) -> None:
    attach = NetworkAttach(bridge="br-prod", address="198.18.77.10/24", gateway="198.18.77.1")  # type: ignore[arg-type]
    seed = tmp_path / "seed.iso"
    build_seed(seed, "web", ["ssh-ed25519 AAAA test"], generate_ed25519("k"), "token", ("52:54:00:aa:bb:cc", attach))
    out = tmp_path / "x"
    out.mkdir()
    for name in ("hvctl/net", "network-config"):  # read back out of the ISO with the same tools' counterpart
        data = subprocess.run(["isoinfo", "-R", "-x", f"/{name}", "-i", str(seed)], capture_output=True,
                              check=True).stdout
        (out / name.replace("/", "_")).write_bytes(data)
    assert (out / "hvctl_net").read_text() == "52:54:00:aa:bb:cc 198.18.77.10/24 198.18.77.1\n"
    config = json.loads((out / "network-config").read_text())
    assert config["version"] == 2
    prod, user = config["ethernets"]["prod0"], config["ethernets"]["user0"]
    assert prod == {"match": {"macaddress": "52:54:00:aa:bb:cc"}, "addresses": ["198.18.77.10/24"],
                    "routes": [{"to": "default", "via": "198.18.77.1"}]}
    assert user["match"] == {"macaddress": USER_NIC_MAC} and user["dhcp4-overrides"] == {"use-routes": False}


def test_a_missing_libvirt_network_or_bridge_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    try:
        with pytest.raises(InvalidSpec, match="has no libvirt network 'nope'"):
            create(rig.ctx, VMSpec.parse(name="n1", image="stub", network={"network": "nope"}))
        assert rig.ctx.ledger.vms.all() == [] and not rig.ctx.paths.vm_dir("n1").exists()
        assert rig.ctx.host().network_active("default") is True  # the test driver's own network
    finally:
        rig.ctx.close()
        shutil.rmtree(rig.state, ignore_errors=True)
