"""Build the minimal guest: a Debian cloud kernel plus a busybox initramfs, from Debian packages only."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hvctl.errors import ImageError
from images.recipe import INIT_DIR, Recipe

BASE_DISK_MIB = 64


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        detail = (result.stderr.strip() or result.stdout.strip()).splitlines()
        raise ImageError(f"`{' '.join(cmd[:3])}` failed: {detail[-1] if detail else 'exit ' + str(result.returncode)}")
    return result.stdout


def resolve_kernel_package(meta: str) -> str:
    """linux-image-cloud-amd64 is a metapackage; the kernel itself is its linux-image-<version> dependency."""
    if meta[len("linux-image-"):][:1].isdigit():
        return meta
    out = _run(["apt-cache", "depends", "--no-recommends", "--no-suggests", meta])
    for line in out.splitlines():
        dep = line.strip().removeprefix("Depends:").strip()
        if dep.startswith("linux-image-") and dep[len("linux-image-"):][:1].isdigit():
            return dep
    raise ImageError(f"cannot resolve kernel package {meta!r}",
                     hint="run `apt-get update` so apt knows the current kernel")


def download_debs(packages: list[str], into: Path) -> list[Path]:
    into.mkdir(parents=True, exist_ok=True)
    # apt's sandbox user cannot write into root-owned build directories; download as root.
    _run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *packages], cwd=into)
    return sorted(into.glob("*.deb"))


def module_closure(modules_dir: Path, wanted: tuple[str, ...]) -> list[str]:
    """Module paths (relative to modules_dir) in load order: every dependency before its user."""
    deps: dict[str, list[str]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    by_name = {Path(m).name.removesuffix(".ko").replace("-", "_"): m for m in deps}
    ordered: list[str] = []

    def visit(mod: str) -> None:
        if mod in ordered:
            return
        for dep in deps.get(mod, []):
            visit(dep)
        ordered.append(mod)

    builtin = (modules_dir / "modules.builtin").read_text()
    for name in wanted:
        if name in by_name:
            visit(by_name[name])
        elif f"/{name}.ko" not in builtin:
            raise ImageError(f"kernel module {name!r} is neither built in nor shipped with this kernel")
    return ordered


@dataclass(frozen=True)
class KernelTree:
    version: str
    vmlinuz: Path
    modules_dir: Path
    busybox: Path


def fetch_kernel(recipe: Recipe, work: Path, say: Callable[[str], None], extra: tuple[str, ...] = ()) -> KernelTree:
    """Download and unpack the kernel package, busybox-static and ``extra`` packages; depmod the modules."""
    kernel_pkg = resolve_kernel_package(recipe.kernel_package)
    packages = sorted({"busybox-static", *extra})
    say(f"downloading {kernel_pkg} and {', '.join(packages)}")
    debs = download_debs([kernel_pkg, *packages], work / "debs")
    unpacked = work / "unpacked"
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb), str(unpacked)])
    kernels = sorted((unpacked / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise ImageError(f"{kernel_pkg} contained no kernel")
    version = kernels[-1].name.removeprefix("vmlinuz-")
    busybox = unpacked / "bin/busybox"
    if not busybox.is_file():
        raise ImageError("busybox-static did not provide /bin/busybox")
    _run(["depmod", "-b", str(unpacked), version])
    return KernelTree(version, kernels[-1], unpacked / "lib/modules" / version, busybox)


def build_initramfs(kernel: KernelTree, modules: tuple[str, ...], init_script: str, out: Path, work: Path) -> None:
    """A busybox initramfs whose /init is ``init_script``, with ``modules`` (and their dependencies) to insmod."""
    order = module_closure(kernel.modules_dir, modules)
    tree = work / "initramfs"
    for sub in ("bin", "dev", "proc", "sys", "etc", "mnt", "tmp"):
        (tree / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy(kernel.busybox, tree / "bin/busybox")
    for mod in order:
        target = tree / "lib/modules" / mod
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(kernel.modules_dir / mod, target)
    (tree / "etc/hvctl-modules").write_text("\n".join(order) + "\n")
    shutil.copy(INIT_DIR / init_script, tree / "init")
    os.chmod(tree / "init", 0o755)
    _write_cpio(tree, out)
    shutil.rmtree(tree)


def build_initramfs_image(recipe: Recipe, work: Path, say: Callable[[str], None]) -> str:
    kernel = fetch_kernel(recipe, work, say, extra=recipe.packages)
    shutil.copy(kernel.vmlinuz, work / "vmlinuz")
    if recipe.init is None:
        raise ImageError(f"recipe {recipe.name} names no init script")
    say("assembling initramfs")
    build_initramfs(kernel, recipe.modules, recipe.init, work / "initrd.img", work)

    say("creating base disk")
    disk_tree = work / "disk"
    disk_tree.mkdir()
    (disk_tree / "hvctl-image").write_text(f"{recipe.name}@{recipe.content_hash()}")
    make_disk(disk_tree, work / "base.qcow2", BASE_DISK_MIB, work)
    for scratch in (work / "debs", work / "unpacked", disk_tree):
        shutil.rmtree(scratch)
    return kernel.version


def make_disk(tree: Path, out: Path, size_mib: int, work: Path) -> None:
    """An ext4 filesystem made from a directory tree without mounting anything, converted to qcow2."""
    raw = work / "disk.raw"
    _run(["mkfs.ext4", "-q", "-F", "-L", "hvctl-root", "-d", str(tree), str(raw), f"{size_mib}M"])
    _run(["qemu-img", "convert", "-q", "-O", "qcow2", str(raw), str(out)])
    raw.unlink()


def _write_cpio(tree: Path, out: Path) -> None:
    files = sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))
    listing = "\n".join([".", *files]) + "\n"
    cpio = subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"], cwd=tree, input=listing.encode(),
                          capture_output=True)
    if cpio.returncode != 0:
        raise ImageError(f"cpio failed: {cpio.stderr.decode(errors='replace').strip()}")
    out.write_bytes(gzip.compress(cpio.stdout, compresslevel=6, mtime=0))
