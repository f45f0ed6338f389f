"""The remote-style test host: a libvirtd and an sshd in their own network and mount namespaces, reached only over a
veth pair, with a pinned host key. Starting and stopping one must leave the machine exactly as it was.

Marked `vm`: it starts real daemons as root (no guest boots here)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
from conftest import hvctl_cli, short_tempdir

from hvctl.devhost import _alive
from hvctl.devhost.remote import RemoteStyleHost
from hvctl.errors import HostUnreachable
from hvctl.host import Host
from hvctl.ops.volumes import ensure_image
from hvctl.seed import generate_ed25519
from images.store import ImageStore

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


@pytest.fixture(scope="module")
def remote(image_dir: Path) -> Iterator[tuple[RemoteStyleHost, Path]]:
    """One remote-style host, and a controller state dir (with the image store) that it cannot see."""
    state = short_tempdir("hvs-")
    (state / "images").symlink_to(image_dir)
    host = RemoteStyleHost(short_tempdir("hvr-"), index=42, hide=(state,))
    try:
        yield host.start(), state
    finally:
        host.stop()
        shutil.rmtree(host.root, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)


def hvctl_at(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return hvctl_cli(state, "test:///default", *args, timeout=120)


def test_host_add_over_ssh_records_the_remote_hosts_facts(remote: tuple[RemoteStyleHost, Path]) -> None:
    host, state = remote
    added = hvctl_at(state, "host", "add", "far", host.uri, "--json")
    assert added.returncode == 0, added.stderr
    view = json.loads(added.stdout)
    assert view["uri"] == host.uri and view["cpus"] >= 1 and view["memory_mib"] > 0 and view["accel"] == "qemu"
    assert view["pool"]["name"] == "hvctl" and view["pool"]["path"] == "/var/lib/libvirt/images/hvctl"
    assert view["pool"]["available_bytes"] > 0
    # The pool's directory is the host's: made in its private tree, not on the controller's filesystem.
    assert (host.root / "var/lib/libvirt/images/hvctl").is_dir()
    assert hvctl_at(state, "host", "rm", "far").returncode == 0


def test_host_add_with_a_refused_key_or_a_closed_port_is_one_line_and_writes_nothing(
        remote: tuple[RemoteStyleHost, Path], tmp_path: Path) -> None:
    host, state = remote
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    wrapper = tmp_path / "ssh"
    wrapper.write_text(host.ssh_wrapper.read_text().replace(str(host.client_key), str(stranger)))
    wrapper.chmod(0o700)
    refused_uri = host.uri.replace(str(host.ssh_wrapper), str(wrapper))
    # Nothing listens there; the address is this host's own, so nothing leaves the veth pair.
    closed_port_uri = host.uri.replace(f"@{host.address}/", f"@{host.address}:2222/")
    for uri in (refused_uri, closed_port_uri):
        result = hvctl_at(state, "host", "add", "bad", uri)
        # stderr: the step that failed, then the one error line.
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 5 and last.startswith("hvctl: error: cannot reach libvirt at"), result.stderr
        assert "ssh" in last and "Traceback" not in result.stderr
    listed = json.loads(hvctl_at(state, "host", "list", "--json").stdout)
    assert "bad" not in {h["name"] for h in listed}


def test_an_image_is_uploaded_once_per_host_through_its_pool(remote: tuple[RemoteStyleHost, Path],
                                                              image_dir: Path) -> None:
    host, _ = remote
    image = ImageStore(image_dir).get("minimal")
    conn = Host(host.uri)
    try:
        pool, made = conn.ensure_pool()
        progress: list[tuple[str, int, int]] = []
        first = ensure_image(pool, image, lambda what, done, total: progress.append((what, done, total)))
        sizes = [image.kernel.stat().st_size, image.initrd.stat().st_size, image.base_disk.stat().st_size]
        assert first.uploaded_bytes == sum(sizes)
        assert [(what, done) for what, done, total in progress if done == total] == [
            ("minimal's kernel", sizes[0]), ("minimal's initrd", sizes[1]), ("minimal's qcow2", sizes[2])]
        second = ensure_image(pool, image)
        assert second.uploaded_bytes == 0 and second.base == first.base
        # The bytes arrived in the host's own tree, whole: the same digest inside its namespace as here.
        holder = host.pids()["holder"]
        inside = subprocess.run(["nsenter", "-t", str(holder), "-m", "sha256sum", str(first.kernel.path)],
                                capture_output=True, text=True, check=True).stdout.split()[0]
        assert inside == hashlib.sha256(image.kernel.read_bytes()).hexdigest()
        assert (host.root / str(first.kernel.path).lstrip("/")).exists()
        for volume in pool.volumes():
            pool.delete(volume.name)
        if made:
            pool.release()
    finally:
        conn.close()
