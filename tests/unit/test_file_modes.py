"""Secrets on the controller are born with their final mode: never world-readable, not even between a create and a
chmod. Each test takes away the chmod the old code relied on (or checks the file as SQLite first opens it)."""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
from pathlib import Path
from typing import Any

import pytest
from conftest import short_tempdir

from hvctl.ledger import Ledger
from hvctl.paths import StateDir, make_private_dir
from hvctl.seed import build_seed, generate_ed25519, new_agent_token


@pytest.fixture
def open_umask() -> Any:
    old = os.umask(0o022)  # the usual umask: files are 0644 unless created otherwise
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_ledger_exists_as_0600_before_sqlite_writes_a_byte(tmp_path: Path, open_umask: None,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real_connect = sqlite3.connect

    def connect(path: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        seen.append(mode(Path(path)))
        return real_connect(path, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", connect)
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    ledger.hosts.ensure("local", "test:///default")
    assert seen == [0o600]
    assert {p.name: mode(p) for p in tmp_path.iterdir()} == {
        "ledger.sqlite3": 0o600, "ledger.sqlite3-wal": 0o600, "ledger.sqlite3-shm": 0o600}
    ledger.close()


def test_the_seed_is_born_0640_without_a_chmod(tmp_path: Path, open_umask: None,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "chmod", lambda *args, **kwargs: None)
    out = tmp_path / "seed.iso"
    build_seed(out, "vm", ["ssh-ed25519 AAAA test"], generate_ed25519("test"), new_agent_token())
    assert mode(out) == 0o640


def test_vm_directories_are_closed_to_other_users(tmp_path: Path) -> None:
    make_private_dir(tmp_path / "qemu-as-user", qemu_gid=64055)
    make_private_dir(tmp_path / "qemu-as-root", qemu_gid=None)
    assert (mode(tmp_path / "qemu-as-user"), (tmp_path / "qemu-as-user").stat().st_gid) == (0o750, 64055)
    assert mode(tmp_path / "qemu-as-root") == 0o700


def test_the_state_dir_can_be_passed_through_but_not_listed(open_umask: None) -> None:
    root = short_tempdir("hvm-")  # pytest's tmp_path is too deep for agent socket paths
    try:
        state = StateDir(root)
        state.ensure()
        assert (mode(state.root), mode(state.root / "vms"), mode(state.images)) == (0o711, 0o711, 0o755)
    finally:
        shutil.rmtree(root)
