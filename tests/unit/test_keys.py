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


def test_a_key_rm_killed_part_way_leaves_the_key_listed_and_running_it_again_finishes(
        state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ledger forgets the key last. Killed after a VM's seed was rewritten and before that (here: the ledger
    write raises), the key is still listed, so `key rm` can be run again, and the second run finishes the job."""
    from hvctl.context import Context
    from hvctl.ledger import VMPaths
    from hvctl.ops.keys import remove_tenant_key
    from hvctl.spec import VMSpec

    ctx = Context(state_dir=state, uri="test:///default")
    ctx.ledger.hosts.ensure("local", "test:///default")
    keep, drop = generate_ed25519("keep").public_line, generate_ed25519("drop").public_line
    for key in (keep, drop):
        ctx.ledger.keys.add("acme", key)
    files = ctx.paths.vm_files("vm1")
    files.dir.mkdir(parents=True)
    host_key = generate_ed25519("hvctl-host-vm1")
    build_seed(files.seed, "vm1", [keep, drop], host_key, "token")
    ctx.ledger.vms.reserve(VMSpec(name="vm1", tenant="acme", operator_key=False), "local",
                          VMPaths(Path("/base.qcow2"), files.overlay, files.seed, files.console_log,
                                  files.agent_socket), agent_token="token", host_pubkey=host_key.public_line)

    def killed(*_: object) -> bool:
        raise RuntimeError("killed before the ledger forgot the key")

    with monkeypatch.context() as patch:
        patch.setattr(ctx.ledger.keys, "remove", killed)
        with pytest.raises(RuntimeError):
            remove_tenant_key(ctx, "acme", drop)
    assert drop in {k for _, k in ctx.ledger.keys.all("acme")}
    assert read_seed_file(files.seed, "hvctl/authorized_keys").decode() == keep + "\n"
    done = remove_tenant_key(ctx, "acme", drop)
    assert done.as_json()["vms"] == [{"vm": "vm1", "seed": True, "live": False, "problem": None}]
    assert [k for _, k in ctx.ledger.keys.all("acme")] == [keep]
    assert read_seed_file(files.seed, "hvctl/authorized_keys").decode() == keep + "\n"
    ctx.close()
