"""A stock-style cloud image: imported with `hvctl image import`, booted by SeaBIOS and the image's own GRUB,
configured by cloud-init from hvctl's NoCloud seed, up when cloud-init's final message reaches the serial console.

No cloud image can be downloaded here, so framework.devhost.stockimage builds one from Debian packages the way a
distribution does; hvctl is handed the qcow2 file like any other. What the tests check is what the guest did:
GRUB's BOOT_IMAGE on its kernel command line, cloud-init's status, the hostname and the keys from the seed (an SSH
session with the pinned host key)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Controller, short_tempdir
from framework.devhost import PrivateLibvirtd

from hvctl.context import Context

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1500)]


@dataclass
class CloudEnv:
    """A controller, the stock-style cloud image file it imports, the test image store and the daemon."""

    controller: Controller
    stock: Path
    images: Path
    libvirtd: PrivateLibvirtd

    @property
    def ctx(self) -> Context:
        return self.controller.ctx


@pytest.fixture(scope="module")
def env(libvirtd: PrivateLibvirtd, image_dir: Path, stock_image: Path) -> Iterator[CloudEnv]:
    controller = Controller.open(short_tempdir("hvcl-"), libvirtd.uri, image_dir, cli_timeout=900)
    try:
        yield CloudEnv(controller, stock_image, image_dir, libvirtd)
    finally:
        try:
            controller.close(remove_state=False)  # its VMs first
        finally:
            for image in controller.ctx.images.list():
                if image.kind.value == "cloud":
                    # The store's own path: a manifest records the one it was reached by at import.
                    shutil.rmtree(image_dir / image.directory.name, ignore_errors=True)
            shutil.rmtree(controller.state, ignore_errors=True)


def hvctl(env: CloudEnv, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return env.controller.hvctl(*args, timeout=timeout)


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stderr + result.stdout
    return result


def test_import_refuses_what_is_not_a_standalone_qcow2_and_leaves_nothing(env: CloudEnv,
                                                                          tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(1 << 20))
    backed = tmp_path / "backed.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(env.stock), "-F", "qcow2", str(backed)],
                   check=True)
    huge = tmp_path / "huge.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(huge), "100G"], check=True)
    images = env.images
    before = sorted(p.name for p in images.iterdir())
    for args, needle in (
        (["image", "import", "c", str(raw)], "'raw', not qcow2"),
        (["image", "import", "c", str(backed)], "has a backing file"),
        (["image", "import", "c", str(huge)], "100.0 GiB (virtual), over the 64 GiB"),
        (["image", "import", "c", str(env.stock), "--sha256", "0" * 64], "sha256 is"),
        (["image", "import", "base", str(env.stock)], "one of hvctl's recipes"),
        (["image", "import", "c", str(tmp_path / "nope.qcow2")], "is not a file"),
        (["image", "import", "c", str(env.stock), "--firmware", "coreboot"], "takes bios or uefi"),
    ):
        refused = hvctl(env, *args)
        assert refused.returncode == 8 and needle in refused.stderr, (args, refused.stderr)
        # Progress lines may come first; the error itself is one line, the last.
        assert refused.stderr.strip().splitlines()[-1].startswith("hvctl: error:") and "Traceback" not in refused.stderr
    assert sorted(p.name for p in images.iterdir()) == before


def test_a_stock_image_boots_through_grub_and_cloud_init_configures_it_from_the_seed(env: CloudEnv) -> None:
    stock = env.stock
    digest = hashlib.sha256(stock.read_bytes()).hexdigest()
    imported = json.loads(ok(hvctl(env, "image", "import", "debian-cloud", str(stock), "--sha256", digest,
                                   "--json")).stdout)
    assert imported["kind"] == "cloud" and imported["firmware"] == "bios" and imported["agent"] is False
    made = json.loads(ok(hvctl(env, "create", "c1", "--image", "debian-cloud", "--memory", "512", "--disk", "4",
                               "--boot-timeout", "800", "--json")).stdout)
    assert made["state"] == "running"
    # Up means cloud-init said so on the serial console, with the name from the seed.
    console = ok(hvctl(env, "console-log", "c1")).stdout
    ready = next(line for line in console.splitlines() if "HVCTL-READY" in line)
    assert "name=c1" in ready and "cloud-init finished" in ready
    # SSH with the host key hvctl generated and pinned, and the operator key cloud-init installed for root.
    assert ok(hvctl(env, "exec", "c1", "--", "hostname")).stdout.strip() == "c1"
    cmdline = ok(hvctl(env, "exec", "c1", "--", "cat", "/proc/cmdline")).stdout
    assert "BOOT_IMAGE=/boot/vmlinuz" in cmdline  # GRUB loaded the kernel, not libvirt's direct boot
    status = ok(hvctl(env, "exec", "c1", "--", "cloud-init", "status", "--long")).stdout
    assert "status: done" in status and "NoCloud" in status
    ctx = env.ctx
    xml = ctx.host().guest("c1").xml()
    assert "<kernel>" not in xml and "<boot dev='hd'/>" in xml
    ok(hvctl(env, "destroy", "c1"))


def test_the_same_stock_image_boots_through_ovmf_when_imported_for_uefi(env: CloudEnv) -> None:
    """The stock-style image boots with either firmware, as Debian's cloud images do. Imported with --firmware
    uefi, the VM boots OVMF (Secure Boot off), which runs GRUB from the EFI system partition's removable path; the
    guest sees EFI runtime services; its NVRAM, which libvirt made at first boot, goes with the VM."""
    stock = env.stock
    imported = json.loads(ok(hvctl(env, "image", "import", "debian-uefi", str(stock), "--firmware", "uefi",
                                   "--json")).stdout)
    assert imported["firmware"] == "efi"  # libvirt's name for it
    ok(hvctl(env, "create", "u1", "--image", "debian-uefi", "--memory", "512", "--disk", "4",
             "--boot-timeout", "900"))
    ctx = env.ctx
    xml = ctx.host().guest("u1").xml()
    assert "OVMF" in xml and "<kernel>" not in xml
    daemon = env.libvirtd
    # The daemon's /var/lib/libvirt is its own, under its root here.
    where = xml.split("<nvram", 1)[1].split(">", 1)[1].split("<", 1)[0]
    nvram = (daemon.root if daemon.private else Path("/")) / where.lstrip("/")
    assert nvram.is_file()
    assert ok(hvctl(env, "exec", "u1", "--", "ls", "/sys/firmware/efi")).stdout.strip()  # booted through UEFI
    assert "BOOT_IMAGE=/boot/vmlinuz" in ok(hvctl(env, "exec", "u1", "--", "cat", "/proc/cmdline")).stdout
    assert ok(hvctl(env, "exec", "u1", "--", "hostname")).stdout.strip() == "u1"
    ok(hvctl(env, "destroy", "u1"))
    assert not nvram.exists()
