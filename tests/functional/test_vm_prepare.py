"""hvctl host prepare over SSH (fabric) against a remote-style host: its own network, sshd and libvirtd, in
namespaces on this machine (framework.devhost.remote).

The host shares this machine's kernel, /usr and /etc: the steps that would change those (--vfio, --hugepages) are
only run with --dry-run here; the storage pool directory is the host's own (its private /var/lib/libvirt), so that
step really acts, and a second run finds everything done."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import hvctl_cli, short_tempdir
from framework.devhost import PrivateLibvirtd
from framework.devhost.remote import RemoteStyleHost

from hvctl.seed import generate_ed25519

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def far(libvirtd: PrivateLibvirtd, image_dir: Path) -> Iterator[tuple[RemoteStyleHost, Path]]:
    state = short_tempdir("hvp-")
    state.mkdir(exist_ok=True)
    (state / "images").symlink_to(image_dir)  # `host add` boots the minimal image there to probe its accelerator
    host = RemoteStyleHost(short_tempdir("hvr-"), index=46, hide=(state,))
    try:
        host.start()
        yield host, state
    finally:
        host.stop()
        shutil.rmtree(host.root, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)


def prepare(far: tuple[RemoteStyleHost, Path], *extra: str, known_hosts: Path | None = None,
            uri: str = "qemu:///system?socket=/nonexistent") -> subprocess.CompletedProcess[str]:
    host, state = far
    return hvctl_cli(state, uri, "host", "prepare", f"root@{host.address}", "-i", str(host.client_key),
                     "--known-hosts", str(known_hosts or host.known_hosts), *extra, timeout=240)


def outcomes(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    assert result.returncode == 0, result.stderr + result.stdout
    return {s["step"]: s["outcome"] for s in json.loads(result.stdout)["steps"]}


def test_prepare_is_idempotent_and_a_dry_run_changes_nothing(far: tuple[RemoteStyleHost, Path]) -> None:
    host, _ = far
    assert "hvctl" not in host.listdir("/var/lib/libvirt/images")
    planned = outcomes(prepare(far, "--dry-run", "--vfio", "--hugepages", "4096", "--json"))
    # The packages are installed on this machine (the Makefile's deps install them, ovmf included), whose /usr and
    # dpkg database the host shares; its own libvirtd answers inside its namespace.
    assert planned["packages"] == "ok" and planned["libvirtd"] == "ok"
    assert planned["storage pool directory"] == "would change" and planned["hugepages"] == "would change"
    assert "vfio-pci" in planned
    assert "hvctl" not in host.listdir("/var/lib/libvirt/images")  # the dry run wrote nothing

    first = outcomes(prepare(far, "--json"))
    assert first == {"packages": "ok", "libvirtd": "ok", "storage pool directory": "changed"}
    assert "hvctl" in host.listdir("/var/lib/libvirt/images")
    again = outcomes(prepare(far, "--json"))
    assert set(again.values()) == {"ok"}


def test_a_host_whose_key_is_not_the_pinned_one_is_refused(far: tuple[RemoteStyleHost, Path],
                                                          tmp_path: Path) -> None:
    host, _ = far
    impostor = generate_ed25519("impostor").public_line.split()
    pins = tmp_path / "known_hosts"
    pins.write_text(f"{host.address} {impostor[0]} {impostor[1]}\n")
    refused = prepare(far, known_hosts=pins)
    assert refused.returncode == 5 and "cannot run commands on" in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith("hvctl: error:")


def test_prepare_tls_installs_certificates_from_hvctls_ca_that_libvirt_accepts(far: tuple[RemoteStyleHost, Path],
                                                                               tmp_path: Path) -> None:
    """`--tls` puts hvctl's CA and a server certificate for the host's address where libvirtd reads them, and
    hvctl then reaches the host over qemu+tls with its own client certificate. This host has no systemd, so the
    listener step (libvirtd-tls.socket on Debian 12) refuses there with what to do; the test does that by hand,
    and the second run finds every step done. The host's /etc is an overlay: this machine's is untouched."""
    from hvctl.pki import Authority

    host, state = far
    planned = outcomes(prepare(far, "--tls", "--dry-run", "--json"))
    assert planned["tls certificates"] == "would change" and planned["libvirtd tls listener"] == "would change"
    assert not (state / "pki").exists()  # a dry run makes no CA either

    first = prepare(far, "--tls", "--json")
    assert first.returncode == 1 and "libvirtd tls listener failed: libvirtd is not run by systemd here" in first.stderr
    assert host.read("/etc/pki/CA/cacert.pem") == (state / "pki/ca/cacert.pem").read_text()
    assert "BEGIN CERTIFICATE" in host.read("/etc/pki/libvirt/servercert.pem")
    assert "BEGIN RSA PRIVATE KEY" in host.read("/etc/pki/libvirt/private/serverkey.pem")
    assert not Path("/etc/pki/libvirt/servercert.pem").exists() or \
        Path("/etc/pki/libvirt/servercert.pem").read_text() != host.read("/etc/pki/libvirt/servercert.pem")

    host.listen_tls_from_etc_pki()
    again = prepare(far, "--tls", "--json")
    assert set(outcomes(again).values()) == {"ok"}
    tls_uri = json.loads(again.stdout)["tls_uri"]
    assert tls_uri == f"qemu+tls://{host.address}/system?pkipath={state / 'pki/client'}"
    added = hvctl_cli(state, "qemu:///system?socket=/nonexistent", "host", "add", "far-tls", tls_uri, "--json")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["cpus"] > 0
    assert hvctl_cli(state, "qemu:///system?socket=/nonexistent", "host", "rm", "far-tls").returncode == 0

    # A client whose certificate another CA signed is refused by the host's libvirtd.
    stranger = Authority(tmp_path / "other-pki")
    stranger.ensure()
    probe = subprocess.run(["virsh", "-c", stranger.tls_uri(host.address), "version"], capture_output=True,
                           text=True, timeout=60)
    assert probe.returncode != 0 and "certificate" in probe.stderr.lower(), probe.stderr
