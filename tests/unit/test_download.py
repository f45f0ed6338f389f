"""Copies out of an untrusted guest, against a real OpenSSH sshd on loopback standing in for the guest's side: the
guest's files (a symlink to /dev/zero, a file over the limit) and the controller's (an existing file, a symlink
planted where the copy will land) are arranged here, and the real SFTP transfer runs.

Also the names hvctl accepts from a guest for checkpoints, and the objectives that reach the guest."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import paramiko
import pytest
from conftest import short_tempdir

from guest.workloads.schema import TrainProgress
from hvctl.access import AccessError, download
from hvctl.errors import InvalidSpec
from hvctl.ops.ckpt_migrate import CheckpointMigrationFailed, Moving, _reported_checkpoint
from hvctl.ops.run import check_objective, checkpoint_step, push_checkpoint, train_args

SSHD = Path("/usr/sbin/sshd")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def sshd() -> Iterator[tuple[Path, int, Path]]:
    """A key-only sshd on 127.0.0.1 with its own host key, config and pid file; stopped by its own pid."""
    if os.geteuid() != 0 or not SSHD.exists():
        # Fail, not skip: `make test` promises these ran (as the VM fixtures do); `make deps` installs sshd.
        pytest.fail("these tests need root and OpenSSH's sshd (Debian's openssh-server; `make deps` installs it)")
    root = short_tempdir("hvc-sshd-")
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)], check=True)
    (root / "authorized_keys").write_text((root / "client_key.pub").read_text())
    port = _free_port()
    config = root / "sshd_config"
    config.write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {root}/host_key
PidFile {root}/sshd.pid
AuthorizedKeysFile {root}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
""")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else "sshd exited"
                assert time.monotonic() < deadline, "sshd did not listen within 30 s"
                time.sleep(0.05)
        yield root, port, root / "client_key"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def sftp(sshd: tuple[Path, int, Path]) -> Iterator[paramiko.SFTPClient]:
    root, port, key = sshd
    client = paramiko.SSHClient()
    client.get_host_keys().add(f"[127.0.0.1]:{port}", "ssh-ed25519",
                               paramiko.Ed25519Key.from_private_key_file(str(root / "host_key")))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect("127.0.0.1", port=port, username="root", pkey=paramiko.Ed25519Key.from_private_key_file(str(key)),
                   allow_agent=False, look_for_keys=False, timeout=30)
    sftp = client.open_sftp()
    yield sftp
    sftp.close()
    client.close()


@pytest.fixture
def dirs() -> Iterator[tuple[Path, Path]]:
    """(the guest's files, the controller's destination)."""
    root = short_tempdir("hvc-dl-")
    (root / "guest").mkdir()
    (root / "local").mkdir()
    yield root / "guest", root / "local"
    shutil.rmtree(root, ignore_errors=True)


def leftovers(local: Path) -> list[str]:
    return sorted(p.name for p in local.iterdir())


def test_a_download_lands_whole_and_private(sftp: paramiko.SFTPClient, dirs: tuple[Path, Path]) -> None:
    guest, local = dirs
    data = os.urandom(3 << 20)
    (guest / "f").write_bytes(data)
    (guest / "f").chmod(0o644)
    assert download(sftp, str(guest / "f"), local / "f", max_bytes=4 << 20, overwrite=False) == len(data)
    assert (local / "f").read_bytes() == data
    assert stat.S_IMODE((local / "f").stat().st_mode) == 0o600
    assert leftovers(local) == ["f"]


def test_a_file_over_the_limit_is_refused_before_a_byte_moves(sftp: paramiko.SFTPClient,
                                                                dirs: tuple[Path, Path]) -> None:
    guest, local = dirs
    with (guest / "big").open("wb") as f:
        f.truncate(5 << 30)  # sparse: 5 GiB claimed, nothing stored
    with pytest.raises(AccessError, match="over the 1048576-byte download limit"):
        download(sftp, str(guest / "big"), local / "big", max_bytes=1 << 20, overwrite=False)
    assert leftovers(local) == []


def test_a_file_that_lies_about_its_size_is_cut_off(sftp: paramiko.SFTPClient, dirs: tuple[Path, Path]) -> None:
    """A symlink to /dev/zero claims 0 bytes and never ends."""
    guest, local = dirs
    (guest / "ckpt").symlink_to("/dev/zero")
    with pytest.raises(AccessError, match="grew past the 0 bytes"):
        download(sftp, str(guest / "ckpt"), local / "ckpt", max_bytes=1 << 30, overwrite=False)
    assert leftovers(local) == []


def test_an_existing_file_is_replaced_only_with_force(sftp: paramiko.SFTPClient, dirs: tuple[Path, Path]) -> None:
    guest, local = dirs
    (guest / "f").write_bytes(b"from the guest")
    victim = local / "victim"
    victim.write_bytes(b"the admin's file")
    (local / "f").symlink_to(victim)  # planted where the copy lands
    with pytest.raises(AccessError, match="already exists"):
        download(sftp, str(guest / "f"), local / "f", max_bytes=1 << 20, overwrite=False)
    assert victim.read_bytes() == b"the admin's file"
    download(sftp, str(guest / "f"), local / "f", max_bytes=1 << 20, overwrite=True)
    # The symlink itself was replaced; what it pointed at is untouched.
    assert not (local / "f").is_symlink() and (local / "f").read_bytes() == b"from the guest"
    assert victim.read_bytes() == b"the admin's file"
    assert leftovers(local) == ["f", "victim"]


def test_checkpoint_names_from_a_guest_are_accepted_only_as_steps() -> None:
    assert checkpoint_step("ckpt-00000010.pt") == 10
    for name in ("../../.bashrc", "ckpt-10.pt", "ckpt-00000010.pt/../x", ".bashrc", "ckpt-00000010.pt\n", ""):
        assert checkpoint_step(name) is None, name


def test_a_checkpoint_path_reported_by_a_guest_must_be_the_step_it_claims() -> None:
    item = Moving(source_id="w1", args=[], checkpoint_dir="/var/lib/hvctl-agent/checkpoints/ssl")
    path = "/var/lib/hvctl-agent/checkpoints/ssl/ckpt-00000004.pt"
    assert _reported_checkpoint(TrainProgress(step=4, loss=1.0, lr=0.1, checkpoint=path), item) == path
    for step, bad in ((4, "/root/.ssh/id_ed25519"), (4, "/var/lib/hvctl-agent/checkpoints/ssl/../../../../etc/shadow"),
                      (5, path), (4, None)):
        with pytest.raises(CheckpointMigrationFailed, match="refusing to copy it"):
            _reported_checkpoint(TrainProgress(step=step, loss=1.0, lr=0.1, checkpoint=bad), item)


def test_objectives_are_checked_before_anything_reaches_a_guest(tmp_path: Path) -> None:
    assert check_objective("seed-rl") == "seed-rl"
    for bad in ("ssl;reboot", "ssl/../../etc", "$(reboot)", ""):
        with pytest.raises(InvalidSpec, match="unknown objective"):
            train_args(bad, 10, 2)
        ckpt = tmp_path / "ckpt-00000001.pt"
        ckpt.write_bytes(b"x")
        # Refused before the VM record is even looked at.
        with pytest.raises(InvalidSpec, match="unknown objective"):
            push_checkpoint(cast(Any, None), cast(Any, None), bad, ckpt)
