"""Revoking access without a VM: the seed rewrite (real genisoimage and isoinfo) and `hvctl key rm` on a ledger."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import hvctl_cli, short_tempdir

from hvctl.seed import build_seed, generate_ed25519, read_seed_file, rewrite_seed


def test_a_rewritten_seed_keeps_the_vms_host_key_and_instance_id(tmp_path: Path) -> None:
    seed = tmp_path / "seed.iso"
    host_key = generate_ed25519("hvctl-host-vm")
    keep, drop = generate_ed25519("keep").public_line, generate_ed25519("drop").public_line
    build_seed(seed, "vm", [keep, drop], host_key, "old-token")
    before = json.loads(read_seed_file(seed, "meta-data"))["instance-id"]
    rewrite_seed(seed, "vm", [keep], host_key.public_line, "new-token")
    assert read_seed_file(seed, "hvctl/authorized_keys").decode() == keep + "\n"
    assert read_seed_file(seed, "hvctl/agent_token").decode().strip() == "new-token"
    assert read_seed_file(seed, "hvctl/ssh_host_ed25519_key") == host_key.private_openssh
    assert json.loads(read_seed_file(seed, "meta-data"))["instance-id"] == before
    user_data = json.loads(read_seed_file(seed, "user-data").decode().removeprefix("#cloud-config\n"))
    assert user_data["ssh_authorized_keys"] == [keep]
    assert stat.S_IMODE(seed.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed.iso"]


@pytest.fixture
def state() -> Iterator[Path]:
    path = short_tempdir("hvk-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def hvctl(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # A socket that does not exist: a command that reached libvirt would fail loudly instead of passing.
    return hvctl_cli(state, "qemu:///system?socket=/nonexistent", *args, timeout=60)


def test_key_rm_forgets_the_key_and_refuses_an_unknown_one(state: Path) -> None:
    pub = state / "k.pub"
    pub.write_text(generate_ed25519("tenant-key").public_line + "\n")
    assert hvctl(state, "key", "add", "acme", str(pub)).returncode == 0
    removed = hvctl(state, "key", "rm", "acme", str(pub), "--json")
    assert removed.returncode == 0, removed.stderr
    assert json.loads(removed.stdout) == {"tenant": "acme", "vms": []}
    assert json.loads(hvctl(state, "key", "list", "--json").stdout) == []
    again = hvctl(state, "key", "rm", "acme", str(pub))
    assert again.returncode != 0 and "not authorised for tenant acme" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    (state / "bad.pub").write_text("not a key\n")
    bad = hvctl(state, "key", "rm", "acme", str(state / "bad.pub"))
    assert bad.returncode == 2 and "is not an OpenSSH public key" in bad.stderr
