"""Build a Debian guest: debootstrap a minbase tree, add the kernel's modules, Python packages and hvctl's agent,
install hvctl's init, and turn the tree into an ext4 qcow2 base without mounting anything.

The debootstrap tree is the slow part (~90 s) and depends only on the suite, the package list and the mirror, so it is
cached as a tarball under that key: changing the agent or the init rebuilds the image in seconds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from guest.kinds import BAKED_MODELS, MODELS_DIR
from hvctl.errors import ImageError
from images.initramfs import _run, build_initramfs, fetch_kernel, make_disk
from images.recipe import GUEST_DIR, INIT_DIR, Recipe

SSHD_CONFIG = """\
# Written by hvctl's image builder. Keys only; the host key is the one hvctl generated for this VM.
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
HostKey /etc/ssh/ssh_host_ed25519_key
UseDNS no
PrintMotd no
"""

POWER_BUTTON = """#!/bin/sh
sync
exec busybox poweroff -f
"""


def debian_mirror() -> str:
    """The mirror apt on this host already uses, so the build reaches only what the machine is configured for."""
    candidates = [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]
    for source in candidates:
        if not source.is_file():
            continue
        for line in source.read_text().splitlines():
            words = line.split()
            if line.startswith("URIs:") and len(words) > 1:
                return words[1]
            if line.startswith("deb ") and len(words) > 2 and "security" not in words[1]:
                return words[1]
    return "http://deb.debian.org/debian"


def build_debian_image(recipe: Recipe, work: Path, cache: Path, say: Callable[[str], None]) -> str:
    if recipe.init is None or recipe.stage1 is None:
        raise ImageError(f"recipe {recipe.name} needs both `init` and `stage1`")
    root = work / "root"
    _bootstrap(recipe, root, cache, say)

    kernel = fetch_kernel(recipe, work, say)
    say("installing kernel modules and hvctl's init")
    shutil.copy(kernel.vmlinuz, work / "vmlinuz")
    shutil.copytree(kernel.modules_dir, root / "lib/modules" / kernel.version, symlinks=True)
    _run(["depmod", "-b", str(root), kernel.version])
    (root / "etc/hvctl-guest-modules").write_text("\n".join(recipe.guest_modules) + "\n")
    shutil.copy(INIT_DIR / recipe.init, root / "sbin/hvctl-init")
    os.chmod(root / "sbin/hvctl-init", 0o755)
    (root / "etc/ssh/sshd_config.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/ssh/sshd_config.d/hvctl.conf").write_text(SSHD_CONFIG)
    # debootstrap's openssh-server generated host keys; a VM must only ever present the key hvctl made for it.
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc/acpi/PWRF").mkdir(parents=True, exist_ok=True)
    (root / "etc/acpi/PWRF/00000080").write_text(POWER_BUTTON)
    os.chmod(root / "etc/acpi/PWRF/00000080", 0o755)
    (root / "etc/hvctl-image").write_text(f"{recipe.name}@{recipe.content_hash()}\n")

    lib = root / "opt/hvctl/lib"
    lib.mkdir(parents=True, exist_ok=True)
    if recipe.python_packages:
        say(f"installing Python packages for the guest: {', '.join(recipe.python_packages)}")
        _pip_target(recipe.python_packages, lib)
    if recipe.agent:
        shutil.copytree(GUEST_DIR, lib / "guest", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for model in recipe.models:
        say(f"building the {model} model for the guest")
        _bake_model(model, root / MODELS_DIR.lstrip("/") / model)
    # Byte-compile with the guest's own interpreter: under TCG, compiling at first import costs seconds per boot.
    subprocess.run(["chroot", str(root), "python3", "-m", "compileall", "-q", "-j", "0", "/opt/hvctl/lib"],
                   capture_output=True, check=False)

    for rel in recipe.trim:
        victim = root / rel
        if victim.is_dir() and not victim.is_symlink():
            shutil.rmtree(victim)
        elif victim.exists():
            victim.unlink()

    say("building the stage-1 initramfs")
    build_initramfs(kernel, recipe.modules, recipe.stage1, work / "initrd.img", work)

    say("making the ext4 base disk")
    used_mib = _tree_mib(root)
    # Headroom for the first boot's writes; the guest grows the filesystem to the overlay's size itself.
    size = ((int(used_mib * 1.2) + 256) + 63) // 64 * 64
    make_disk(root, work / "base.qcow2", size, work)
    shutil.rmtree(root)
    shutil.rmtree(work / "unpacked", ignore_errors=True)
    shutil.rmtree(work / "debs", ignore_errors=True)
    return kernel.version


def _bootstrap(recipe: Recipe, root: Path, cache: Path, say: Callable[[str], None]) -> None:
    mirror = debian_mirror()
    key = hashlib.sha256(f"{recipe.suite}|{sorted(recipe.packages)}|{mirror}".encode()).hexdigest()[:16]
    tarball = cache / f"rootfs-{recipe.suite}-{key}.tar"
    root.mkdir()
    if tarball.is_file():
        say("unpacking the cached debootstrap tree")
        _run(["tar", "-C", str(root), "--numeric-owner", "-xpf", str(tarball)])
        return
    say(f"debootstrap {recipe.suite} minbase (+{len(recipe.packages)} packages) from {mirror}")
    _run(["debootstrap", "--variant=minbase", f"--include={','.join(recipe.packages)}", recipe.suite, str(root),
          mirror])
    cache.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_suffix(".partial")
    _run(["tar", "-C", str(root), "--numeric-owner", "-cpf", str(partial), "."])
    partial.rename(tarball)


def _pip_target(packages: tuple[str, ...], target: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-compile", "--only-binary=:all:", "--target",
         str(target), *packages],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        lines = (result.stderr.strip() or result.stdout.strip()).splitlines()
        raise ImageError(f"pip install for the guest failed: {lines[-1] if lines else result.returncode}")


def _bake_model(model: str, out: Path) -> None:
    """Build a model with the workloads' own code on the host (same Python ABI, deterministic seeds)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    args = [a.format(out=out) for a in BAKED_MODELS[model]]
    result = subprocess.run([sys.executable, "-m", "guest.workloads", *args], capture_output=True, text=True,
                            cwd=GUEST_DIR.parent)
    if result.returncode != 0:
        lines = (result.stderr.strip() or result.stdout.strip()).splitlines()
        raise ImageError(f"building the {model} model failed: {lines[-1] if lines else result.returncode}")


def _tree_mib(root: Path) -> int:
    out = subprocess.run(["du", "-sm", "--apparent-size", str(root)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])
