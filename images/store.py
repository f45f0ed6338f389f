"""The image store: built images live under ``STATE/images/<name>@<hash>/``, each an immutable directory.

A build happens in a hidden temporary directory and is renamed into place only when complete, so a build that fails
halfway leaves nothing in the store. Running VMs' overlays point at a version's base disk; a rebuilt recipe gets a
new directory instead of overwriting the one they use.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from hvctl.errors import ImageError
from images.recipe import Recipe, RecipeKind, load_recipe, shipped_recipe_names

Progress = Callable[[str], None]
# The largest virtual disk `hvctl image import` takes (a cloud image is a few GiB; VMs grow their overlays).
MAX_IMPORT_VIRTUAL_BYTES = 64 * 2**30


class Image(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    content_hash: str
    kind: RecipeKind
    directory: Path
    kernel_version: str
    built_at: float
    size_bytes: int
    # The base disk's virtual size: a VM's overlay must be at least this large.
    disk_virtual_bytes: int = 0
    # Whether hvctl's agent is baked in: then "up" means the agent answers, not only the console marker.
    agent: bool = False
    # 0 for the first build of a recipe; `image build --force` makes build 1, 2, ... beside it, never over it.
    build: int = 0
    # Imported cloud images only: "bios" or "efi", what boots their disk (they have no kernel or initrd of ours).
    firmware: str | None = None

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    @property
    def base_disk(self) -> Path:
        return self.directory / "base.qcow2"

    @property
    def volume_prefix(self) -> str:
        """How this build is named in a host's storage pool: one upload per build, never shared between builds."""
        return f"img-{self.name}-{self.content_hash[:16]}" + (f"-b{self.build}" if self.build else "")

    def is_base_of(self, disk: Path | str) -> bool:
        """Whether ``disk`` (a VM's backing image, as its ledger row names it) is this build: its base.qcow2 here,
        or the volume it was uploaded as into a host's pool (``volume_prefix``.qcow2)."""
        path = Path(disk)
        return path == self.base_disk or path.name == f"{self.volume_prefix}.qcow2"

    def verify(self) -> None:
        """Refuse an image whose files went missing or whose base disk qemu-img cannot read."""
        for part in (self.base_disk,) if self.kind is RecipeKind.CLOUD else (self.kernel, self.initrd, self.base_disk):
            if not part.is_file() or part.stat().st_size == 0:
                raise ImageError(f"image {self.name} is damaged: {part.name} is missing or empty",
                                 hint=f"rebuild it with `hvctl image build {self.name}`")
        check = subprocess.run(["qemu-img", "check", "-q", str(self.base_disk)], capture_output=True, text=True)
        if check.returncode != 0:
            raise ImageError(f"image {self.name} is damaged: {check.stderr.strip() or 'qemu-img check failed'}",
                             hint=f"rebuild it with `hvctl image build {self.name}`")


class ImageStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def list(self) -> builtins.list[Image]:
        images = []
        for manifest in sorted(self.root.glob("*@*/manifest.json")):
            try:
                image = Image.model_validate_json(manifest.read_text())
            except ValueError:
                continue  # A damaged manifest is reported by `hvctl doctor`, not fatal to listing.
            if not image.directory.is_dir():
                # The manifest keeps the path the store was reached by at build time (VMs' disks name their base by
                # it); a state dir that reached a shared store through a symlink, since removed, leaves it stale.
                image = image.model_copy(update={"directory": manifest.parent})
            images.append(image)
        return sorted(images, key=lambda i: (i.name, -i.built_at))

    def get(self, name: str) -> Image:
        """The newest build of an image name."""
        for image in self.list():
            if image.name == name:
                return image
        known = sorted({i.name for i in self.list()})
        raise ImageError(
            f"unknown image {name!r}" + (f"; built images: {', '.join(known)}" if known else "; no images are built"),
            hint=f"build it with `hvctl image build {name}`",
        )

    def find(self, recipe: Recipe) -> Image | None:
        """The newest build of exactly this recipe."""
        content_hash = recipe.content_hash()
        return next((i for i in self.list() if i.name == recipe.name and i.content_hash == content_hash), None)

    def for_base(self, disk: Path | str) -> Image:
        """The build a VM's disk is backed by (see ``Image.is_base_of``): the one its copy must be backed by too."""
        for image in self.list():
            if image.is_base_of(disk):
                return image
        raise ImageError(f"no image in the store is the base of {disk}",
                         hint="the build that VM was made from has been removed")

    def build(self, recipe_name: str, progress: Progress | None = None, force: bool = False) -> Image:
        """The cached build of the recipe, or a new one. ``force`` makes a new build beside the others (build N+1 in
        NAME@HASH.bN), never over one: overlays of VMs made on an older build keep the base they were made on,
        and new VMs get the newest."""
        recipe = load_recipe(recipe_name)
        cached = self.find(recipe)
        if cached is not None and not force:
            return cached
        self.root.mkdir(parents=True, exist_ok=True)
        build = 1 + max((i.build for i in self.list() if i.name == recipe.name
                         and i.content_hash == recipe.content_hash()), default=-1)
        final = self.root / (f"{recipe.name}@{recipe.content_hash()}" + (f".b{build}" if build else ""))
        if final.exists():
            raise ImageError(f"{final} is left over from another build and has no valid manifest",
                             hint="remove it, then build again")
        work = self.root / f".build-{recipe.name}-{time.time_ns()}"
        work.mkdir()
        say = progress or (lambda _msg: None)
        try:
            # Each builder (debootstrap, cpio, the kernel's modules) loads only when a build of its kind runs.
            if recipe.kind is RecipeKind.INITRAMFS:
                from images.initramfs import build_initramfs_image

                kernel_version = build_initramfs_image(recipe, work, say)
            else:
                from images.rootfs import build_debian_image

                kernel_version = build_debian_image(recipe, work, self.root / ".cache", say)
            size = sum(p.stat().st_size for p in work.iterdir() if p.is_file())
            virtual = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(work / "base.qcow2")],
                                                capture_output=True, text=True, check=True).stdout)["virtual-size"]
            image = Image(name=recipe.name, content_hash=recipe.content_hash(), kind=recipe.kind,
                          directory=final, kernel_version=kernel_version, built_at=time.time(), size_bytes=size,
                          disk_virtual_bytes=virtual, agent=recipe.agent, build=build)
            (work / "manifest.json").write_text(image.model_dump_json(indent=2))
            _put_in_place(work, final)
            return image
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def import_image(self, name: str, source: Path, sha256: str | None = None, firmware: str = "bios",
                     max_virtual_bytes: int = MAX_IMPORT_VIRTUAL_BYTES, progress: Progress | None = None) -> Image:
        """A stock cloud image (a qcow2 with its own bootloader and cloud-init) into the store, as NAME@SHA256.

        Refused before anything is written: a name a recipe uses, a file that is not a standalone qcow2 (a backing
        file would make the image depend on something outside the store; raw and other formats are not checked
        for what they hide), a virtual size over ``max_virtual_bytes``, a checksum that does not match. The copy
        is checked with ``qemu-img check`` before it is renamed into place."""
        say = progress or (lambda _msg: None)
        if not re.fullmatch(r"[a-z][a-z0-9.-]{0,62}", name):
            raise ImageError(f"invalid image name {name!r}: must match [a-z][a-z0-9.-]{{0,62}}")
        if name in shipped_recipe_names():
            raise ImageError(f"{name!r} is one of hvctl's recipes; give the imported image another name")
        if firmware not in ("bios", "efi"):
            raise ImageError(f"--firmware takes bios or uefi, not {firmware!r}")
        if not source.is_file():
            raise ImageError(f"{source} is not a file")
        say("inspecting it with qemu-img info")
        virtual = _standalone_qcow2_size(source, max_virtual_bytes)
        say("checksumming")
        actual = _sha256(source)
        if sha256 is not None and actual != sha256.lower():
            raise ImageError(f"{source}: sha256 is {actual}, not {sha256}")
        final = self.root / f"{name}@{actual[:16]}"
        # By its directory's name: the manifest records the path the store was reached by when it was imported.
        existing = next((i for i in self.list() if i.directory.name == final.name), None)
        if existing is not None:
            return existing
        self.root.mkdir(parents=True, exist_ok=True)
        work = self.root / f".import-{name}-{time.time_ns()}"
        work.mkdir()
        try:
            say("copying it into the store")
            shutil.copyfile(source, work / "base.qcow2")
            check = subprocess.run(["qemu-img", "check", "-q", str(work / "base.qcow2")], capture_output=True,
                                   text=True)
            if check.returncode != 0:
                raise ImageError(f"{source} fails qemu-img check: {check.stderr.strip()}")
            (work / "base.qcow2").chmod(0o644)
            image = Image(name=name, content_hash=actual[:16], kind=RecipeKind.CLOUD, directory=final,
                          kernel_version="its own", built_at=time.time(),
                          size_bytes=(work / "base.qcow2").stat().st_size, disk_virtual_bytes=virtual, agent=False,
                          firmware=firmware)
            (work / "manifest.json").write_text(image.model_dump_json(indent=2))
            _put_in_place(work, final)
            return image
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def remove(self, name: str, in_use: set[Path] | None = None) -> builtins.list[Image]:
        """Remove every build of ``name`` unless a VM's overlay still uses its base disk (here, or the copy of it
        in a host's pool: a migration back here needs the build it was made from)."""
        victims = [i for i in self.list() if i.name == name]
        if not victims:
            raise ImageError(f"unknown image {name!r}")
        busy = [i for i in victims if in_use and any(i.is_base_of(disk) for disk in in_use)]
        if busy:
            raise ImageError(f"image {name} is in use by a VM's disk; destroy those VMs first")
        for image in victims:
            shutil.rmtree(image.directory)
        return victims


def _standalone_qcow2_size(source: Path, max_virtual_bytes: int) -> int:
    """The virtual size of ``source``, which must be a qcow2 with no backing file and at most ``max_virtual_bytes``."""
    probe = subprocess.run(["qemu-img", "info", "--output=json", str(source)], capture_output=True, text=True)
    if probe.returncode != 0:
        raise ImageError(f"qemu-img cannot read {source}: {probe.stderr.strip()}")
    info = json.loads(probe.stdout)
    if info.get("format") != "qcow2":
        raise ImageError(f"{source} is {info.get('format')!r}, not qcow2", hint="qemu-img convert -O qcow2 it")
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise ImageError(f"{source} has a backing file ({info.get('backing-filename')}); an image must stand "
                         "alone", hint="qemu-img convert -O qcow2 flattens it")
    virtual = int(info.get("virtual-size", 0))
    if virtual > max_virtual_bytes:
        raise ImageError(f"{source} is {virtual / 2**30:.1f} GiB (virtual), over the {max_virtual_bytes / 2**30:g} "
                         "GiB hvctl imports")
    return virtual


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _put_in_place(work: Path, final: Path) -> None:
    """Rename a finished image directory into place. Another command that made the same build (same name, same
    content hash) first has done the job; anything else in the way is an error."""
    try:
        work.rename(final)
    except OSError:
        if (final / "manifest.json").is_file():
            return
        raise ImageError(f"cannot put the image in place: {final} is in the way",
                         hint="remove it (`hvctl image rm`) and try again") from None
