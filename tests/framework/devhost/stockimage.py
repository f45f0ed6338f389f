"""A stock-style cloud image, built from Debian packages, for the tests and the demo of `hvctl image import`.

No cloud image can be downloaded here, so this makes one the way a distribution's cloud image is made: systemd,
cloud-init, a kernel with its initramfs and GRUB on a partitioned disk, booted by the firmware, configured at first
boot from a NoCloud seed. hvctl does not know it was built here: it is handed the qcow2 like any downloaded one.

It boots with either firmware, as Debian's own cloud images do. The disk is made without mounting anything:

* the root filesystem with ``mkfs.ext4 -d`` from the tree, in the MBR's first entry, after the ESP on the disk
  (so cloud-init's growpart can grow it to the end of a larger disk);
* BIOS: GRUB's ``boot.img`` in the MBR and a ``core.img`` made by ``grub-mkimage`` in the gap after it (LBA 1;
  boot.img's default kernel sector, and core.img's own blocklist for the rest, which ``grub-mkimage`` sets). That is
  what ``grub-install`` writes for a BIOS boot, less the probing of devices;
* UEFI: an EFI system partition (MBR type 0xEF, FAT, made with mkfs.fat and mtools from the tree) holding GRUB as
  the removable-media path ``EFI/BOOT/BOOTX64.EFI``, which firmware boots with no NVRAM boot entry; its embedded
  config finds the root filesystem by UUID and reads the same grub.cfg.

Usage: PYTHONPATH=tests python -m framework.devhost.stockimage OUT.qcow2 [--cache DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from images.rootfs import debian_mirror

SUITE = "bookworm"
PACKAGES = ("systemd-sysv", "udev", "dbus", "openssh-server", "linux-image-cloud-amd64", "initramfs-tools",
            "grub-pc-bin", "grub-efi-amd64-bin", "dosfstools", "mtools", "ifupdown", "isc-dhcp-client", "e2fsprogs",
            "iproute2", "netbase", "ca-certificates")
# Installed by apt inside the tree once it boots as a chroot: debootstrap's own ordering fails to configure
# cloud-init's Python dependencies (python3-cryptography) in one pass.
SECOND_STAGE = ("cloud-init", "cloud-guest-utils", "locales")
# The partition starts at 1 MiB, as every partitioning tool does: the gap before it holds GRUB's core.img.
PART_START_SECTOR = 2048
GRUB_MODULES = ("biosdisk", "part_msdos", "ext2", "normal", "linux", "search", "search_fs_uuid", "configfile",
                "echo", "test", "gzio", "boot")
# UEFI GRUB has every module it needs built in: the tree's /boot/grub has no module directory.
EFI_MODULES = ("part_msdos", "ext2", "fat", "normal", "linux", "search", "search_fs_uuid", "configfile", "echo",
               "test", "gzio", "boot", "serial", "terminal", "efi_gop")
ESP_MIB = 32
CLOUD_CFG = """\
# Written by hvctl's stock-style image builder: NoCloud only (no network metadata service to wait for).
datasource_list: [ NoCloud, None ]
# Always present (glibc's built-in UTF-8 locale): nothing to generate at first boot.
locale: C.UTF-8
"""


def _run(argv: list[str], **kwargs: object) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise SystemExit(f"{argv[0]} failed: {(result.stderr or result.stdout).strip()[-2000:]}")


def bootstrap(root: Path, cache: Path) -> None:
    mirror = debian_mirror()
    key = hashlib.sha256(f"stock|{SUITE}|{sorted(PACKAGES)}|{SECOND_STAGE}|{mirror}".encode()).hexdigest()[:16]
    tarball = cache / f"stock-{SUITE}-{key}.tar"
    root.mkdir(parents=True)
    if tarball.is_file():
        _run(["tar", "-C", str(root), "--numeric-owner", "-xpf", str(tarball)])
        return
    _run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(root), mirror])
    # apt in the tree, in a private mount namespace (its /proc and /dev are mounted there, never on this machine).
    shutil.copyfile("/etc/resolv.conf", root / "etc/resolv.conf")
    script = (f"mount -t proc proc {root}/proc && mount --bind /dev {root}/dev && "
              f"chroot {root} env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "
              f"{' '.join(SECOND_STAGE)} && chroot {root} apt-get clean")
    _run(["unshare", "--mount", "--propagation", "private", "sh", "-ec", script])
    (root / "etc/resolv.conf").unlink()
    cache.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_suffix(".partial")
    _run(["tar", "-C", str(root), "--numeric-owner", "-cpf", str(partial), "."])
    partial.rename(tarball)


def configure(root: Path, fs_uuid: str) -> None:
    """What a cloud image ships: fstab by UUID, GRUB's config with a serial console, cloud-init on NoCloud, no
    host keys or machine-id of its own (each instance makes its own), a DHCP NIC for the first boot."""
    kernel = sorted((root / "boot").glob("vmlinuz-*"))[-1].name
    initrd = sorted((root / "boot").glob("initrd.img-*"))[-1].name
    (root / "etc/fstab").write_text(f"UUID={fs_uuid} / ext4 defaults,errors=remount-ro 0 1\n")
    grub = root / "boot/grub"
    grub.mkdir(parents=True, exist_ok=True)
    (grub / "grub.cfg").write_text(
        "serial --unit=0 --speed=115200\nterminal_input serial console\nterminal_output serial console\n"
        "set timeout=0\n"
        f"search --no-floppy --fs-uuid --set=root {fs_uuid}\n"
        "menuentry 'Debian GNU/Linux' {\n"
        f"  linux /boot/{kernel} root=UUID={fs_uuid} ro console=tty0 console=ttyS0,115200n8\n"
        f"  initrd /boot/{initrd}\n"
        "}\n")
    (root / "etc/cloud/cloud.cfg.d/90-hvctl-stock.cfg").write_text(CLOUD_CFG)
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc/machine-id").write_text("")
    (root / "etc/hostname").write_text("localhost\n")
    interfaces = root / "etc/network/interfaces"
    interfaces.write_text("source /etc/network/interfaces.d/*\nauto lo\niface lo inet loopback\n")


def make_disk(root: Path, out: Path, work: Path, size_mib: int) -> None:
    fs_uuid = str(uuid.uuid4())
    configure(root, fs_uuid)
    part = work / "root.ext4"
    part_mib = size_mib - 2
    _run(["mkfs.ext4", "-q", "-U", fs_uuid, "-L", "root", "-d", str(root), str(part), f"{part_mib}M"])
    # The image's own GRUB and FAT tools make its boot loaders; a chroot without mounts is enough.
    _run(["chroot", str(root), "grub-mkimage", "-O", "i386-pc", "-o", "/core.img", "-p", "(hd0,msdos1)/boot/grub",
          *GRUB_MODULES])
    core = work / "core.img"
    shutil.move(root / "core.img", core)
    if core.stat().st_size > (PART_START_SECTOR - 1) * 512:
        raise SystemExit(f"GRUB's core.img ({core.stat().st_size} bytes) does not fit before the partition")
    (root / "early.cfg").write_text(f"search --no-floppy --fs-uuid --set=root {fs_uuid}\n"
                                    "set prefix=($root)/boot/grub\nconfigfile $prefix/grub.cfg\n")
    _run(["chroot", str(root), "grub-mkimage", "-O", "x86_64-efi", "-o", "/BOOTX64.EFI", "-p", "/boot/grub",
          "-c", "/early.cfg", *EFI_MODULES])
    _run(["chroot", str(root), "mkfs.fat", "-C", "-n", "ESP", "/esp.img", str(ESP_MIB * 1024)])
    _run(["chroot", str(root), "mmd", "-i", "/esp.img", "::/EFI", "::/EFI/BOOT"])
    _run(["chroot", str(root), "mcopy", "-i", "/esp.img", "/BOOTX64.EFI", "::/EFI/BOOT/BOOTX64.EFI"])
    esp = work / "esp.img"
    shutil.move(root / "esp.img", esp)
    for leftover in ("early.cfg", "BOOTX64.EFI"):
        (root / leftover).unlink()
    disk = work / "disk.raw"
    total_mib = size_mib + ESP_MIB
    with open(disk, "wb") as blank:
        blank.truncate(total_mib * 2**20)
    boot = (root / "usr/lib/grub/i386-pc/boot.img").read_bytes()
    esp_start = PART_START_SECTOR
    root_start = esp_start + ESP_MIB * 2048
    root_sectors = total_mib * 2048 - root_start

    def entry(bootable: bool, kind: int, start: int, sectors: int) -> bytes:
        # CHS fields unused (0xfe 0xff 0xff: "use LBA").
        return bytes([0x80 if bootable else 0, 0xFE, 0xFF, 0xFF, kind, 0xFE, 0xFF, 0xFF]) \
            + start.to_bytes(4, "little") + sectors.to_bytes(4, "little")

    table = entry(True, 0x83, root_start, root_sectors) + entry(False, 0xEF, esp_start, ESP_MIB * 2048)
    with open(disk, "r+b") as f:
        f.seek(0)
        f.write(boot[:440])  # GRUB's boot code, then the disk signature, the table and the boot signature
        f.write(uuid.uuid4().bytes[:4] + b"\0\0" + table + bytes(32) + b"\x55\xaa")
        f.seek(512)
        f.write(core.read_bytes())
        for start, src_path in ((esp_start, esp), (root_start, part)):
            f.seek(start * 512)
            with open(src_path, "rb") as src:
                shutil.copyfileobj(src, f, 16 << 20)
    _run(["qemu-img", "convert", "-q", "-c", "-O", "qcow2", str(disk), str(out)])


def build(out: Path, cache: Path) -> Path:
    with tempfile.TemporaryDirectory(prefix="hvctl-stock-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        root = work / "root"
        bootstrap(root, cache)
        used = int(subprocess.run(["du", "-sm", str(root)], capture_output=True, text=True).stdout.split()[0])
        make_disk(root, out, work, (int(used * 1.3) + 384 + 63) // 64 * 64)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--cache", type=Path, default=Path("/var/tmp/hvctl-test-images/.cache"))
    args = parser.parse_args()
    build(args.out, args.cache)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
