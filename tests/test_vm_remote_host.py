"""The remote-style test host: a libvirtd and an sshd in their own network and mount namespaces, reached only over a
veth pair, with a pinned host key. Starting and stopping one must leave the machine exactly as it was.

Marked `vm`: it starts real daemons as root (no guest boots here)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
from conftest import short_tempdir

from hvctl.devhost import _alive
from hvctl.devhost.remote import RemoteStyleHost
from hvctl.errors import HostUnreachable
from hvctl.host import Host
from hvctl.seed import generate_ed25519

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]


def machine_state() -> tuple[list[str], list[str]]:
    """What a host's start and stop must leave as it found it: this namespace's mounts and network links."""
    mounts = subprocess.run(["findmnt", "-rn", "-o", "TARGET,SOURCE,FSTYPE"], capture_output=True, text=True,
                            check=True).stdout.splitlines()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout.splitlines()
    return sorted(mounts), sorted(line.split(":")[1].strip() for line in links)


@pytest.fixture
def controller_state() -> Iterator[Path]:
    """Stands in for the controller's state dir, which the host must not see."""
    path = short_tempdir("hvs-")
    (path / "ledger.sqlite3").write_text("the controller's")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_remote_style_host_is_reached_only_over_its_network_and_leaves_nothing(controller_state: Path) -> None:
    before = machine_state()
    host = RemoteStyleHost(short_tempdir("hvr-"), index=41, hide=(controller_state,))
    started: dict[str, int] = {}
    try:
        host.start()
        started = host.pids()
        assert set(started) >= {"holder", "libvirtd.pid", "virtlogd.pid", "sshd.pid"}
        assert host.uri.startswith("qemu+ssh://root@198.18.41.2/system")
        # hvctl's own host layer, over ssh: the libvirt it reaches is the one with this host's UUID and name.
        remote = Host(host.uri)
        try:
            caps = ET.fromstring(remote.conn.getCapabilities())
            assert caps.findtext("host/uuid") == host.host_uuid
            assert remote.conn.getHostname() == "hvctl-remote-41"
            assert remote.facts().cpus >= 1
        finally:
            remote.close()
        # The host sees none of the controller's files, and its own storage directory exists.
        holder = host.pids()["holder"]
        inside = subprocess.run(["nsenter", "-t", str(holder), "-m", "sh", "-c",
                                 f"ls -A {controller_state}; test -d {host.storage}"],
                                capture_output=True, text=True)
        assert inside.returncode == 0 and inside.stdout == ""
        # A host presenting another key is refused: the client pins the key, it does not learn it.
        pinned = host.known_hosts.read_text()
        impostor = generate_ed25519("impostor").public_line.split()
        host.known_hosts.write_text(f"{host.address} {impostor[0]} {impostor[1]}\n")
        with pytest.raises(HostUnreachable, match="cannot reach libvirt"):
            Host(host.uri)
        host.known_hosts.write_text(pinned)
    finally:
        host.stop()
        shutil.rmtree(host.root, ignore_errors=True)
    assert started and not [name for name, pid in started.items() if _alive(pid)]
    assert machine_state() == before
