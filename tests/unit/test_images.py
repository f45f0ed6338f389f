"""Image recipes and the store. Builds that touch apt run for real; the module resolver runs on a tree we make."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hvctl.errors import ImageError
from images.initramfs import module_closure
from images.recipe import Recipe, load_recipe
from images.store import Image, ImageStore


def test_shipped_recipe_loads_and_hash_is_stable() -> None:
    recipe = load_recipe("minimal")
    assert recipe.kind == "initramfs" and "virtio_blk" in recipe.modules
    assert recipe.content_hash() == load_recipe("minimal").content_hash()
    changed = Recipe(**{**recipe.model_dump(), "modules": (*recipe.modules, "vfio")})
    assert changed.content_hash() != recipe.content_hash()


def test_bad_recipes_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no image recipe 'nope'; shipped recipes: base, minimal"):
        load_recipe("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nkind = "initramfs"\npackages = ["ok; rm -rf /"]\n')
    with pytest.raises(ImageError, match="packages"):
        load_recipe(str(bad))
    bad.write_text("name = [")
    with pytest.raises(ImageError, match="bad.toml"):
        load_recipe(str(bad))


def test_module_closure_orders_dependencies_first(tmp_path: Path) -> None:
    (tmp_path / "modules.dep").write_text(
        "kernel/virtio_blk.ko: kernel/virtio.ko kernel/virtio_ring.ko\n"
        "kernel/virtio_ring.ko: kernel/virtio.ko\nkernel/virtio.ko:\nkernel/virtio_pci.ko: kernel/virtio.ko\n")
    (tmp_path / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\n")
    order = module_closure(tmp_path, ("virtio_blk", "virtio_pci", "ext4"))
    assert order == ["kernel/virtio.ko", "kernel/virtio_ring.ko", "kernel/virtio_blk.ko", "kernel/virtio_pci.ko"]
    with pytest.raises(ImageError, match="'nonesuch' is neither built in nor shipped"):
        module_closure(tmp_path, ("nonesuch",))


def test_a_build_that_fails_halfway_leaves_no_half_image(tmp_path: Path) -> None:
    if shutil.which("apt-get") is None:
        pytest.fail("apt-get is required (Debian host)")
    recipe = tmp_path / "broken.toml"
    recipe.write_text('name = "broken"\nkind = "initramfs"\npackages = ["hvctl-no-such-package"]\n'
                      'init = "minimal-init.sh"\n')
    store = ImageStore(tmp_path / "images")
    with pytest.raises(ImageError, match="failed"):
        store.build(str(recipe))
    assert list((tmp_path / "images").iterdir()) == []
    assert store.list() == []


def test_unknown_and_damaged_images(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    with pytest.raises(ImageError, match="unknown image 'base'; no images are built"):
        store.get("base")
    directory = tmp_path / "fake@0000"
    directory.mkdir()
    image = Image(name="fake", content_hash="0000", kind="initramfs", directory=directory, kernel_version="6.1",
                  built_at=1.0, size_bytes=0)
    (directory / "manifest.json").write_text(image.model_dump_json())
    assert [i.name for i in store.list()] == ["fake"]
    with pytest.raises(ImageError, match="image fake is damaged: vmlinuz is missing"):
        store.get("fake").verify()
    for part in ("vmlinuz", "initrd.img"):
        (directory / part).write_bytes(b"x")
    (directory / "base.qcow2").write_bytes(b"QFI\xfb" + b"\x00" * 100)
    with pytest.raises(ImageError, match="image fake is damaged"):
        store.get("fake").verify()
    (directory / "manifest.json").write_text(json.dumps({"garbage": True}))
    assert store.list() == []


def test_an_image_built_through_a_path_that_is_gone_is_found_where_it_is(tmp_path: Path) -> None:
    """A state dir whose images/ was a symlink to a shared store builds there; once that state dir is removed, the
    manifest names a directory that no longer exists, and the store must still find the files."""
    store = tmp_path / "shared"
    store.mkdir()
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "images").symlink_to(store)
    through = fake_build(ImageStore(tmp_path / "state" / "images"), "base", "cccc" * 4, 1.0)
    for part in ("vmlinuz", "initrd.img"):
        (through.directory / part).write_bytes(b"x")
    (tmp_path / "state" / "images").unlink()
    (tmp_path / "state").rmdir()
    found = ImageStore(store).get("base")
    assert found.directory == store / f"base@{'cccc' * 4}" and found.kernel.read_bytes() == b"x"


def fake_build(store: ImageStore, name: str, content_hash: str, built_at: float) -> Image:
    directory = store.root / f"{name}@{content_hash}"
    directory.mkdir(parents=True)
    image = Image(name=name, content_hash=content_hash, kind="initramfs", directory=directory,
                  kernel_version="6.1", built_at=built_at, size_bytes=0)
    (directory / "manifest.json").write_text(image.model_dump_json())
    return image


def test_a_vm_is_tied_to_the_build_it_was_made_on_here_or_in_a_hosts_pool(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    old = fake_build(store, "base", "aaaa" * 8, 1.0)
    new = fake_build(store, "base", "bbbb" * 8, 2.0)
    assert store.get("base") == new  # the newest, for new VMs
    # A VM made on the older build keeps it, whether its row names the file here or its upload in a host's pool.
    assert store.for_base(old.base_disk) == old
    assert store.for_base("/var/lib/libvirt/images/hvctl/img-base-aaaaaaaaaaaaaaaa.qcow2") == old
    assert not new.is_base_of(old.base_disk)
    with pytest.raises(ImageError, match="no image in the store is the base of /elsewhere/base.qcow2"):
        store.for_base("/elsewhere/base.qcow2")
    with pytest.raises(ImageError, match="in use by a VM's disk"):
        store.remove("base", {Path("/var/lib/libvirt/images/hvctl/img-base-bbbbbbbbbbbbbbbb.qcow2")})
    assert store.list() == [new, old]


def test_force_builds_beside_the_old_build_which_the_vms_made_on_it_keep(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's side of --force: the new build gets its own directory and pool name, the old one is untouched
    and still found as the base of its VMs' disks. The builder itself is stubbed (it is exercised by the image
    tests that run apt); the store runs for real, qemu-img included."""
    import subprocess

    import images.initramfs

    def stub_builder(recipe: Recipe, work: Path, say: object) -> str:
        for part in ("vmlinuz", "initrd.img"):
            (work / part).write_bytes(b"x")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(work / "base.qcow2"), "64M"], check=True)
        return "6.1-stub"

    monkeypatch.setattr(images.initramfs, "build_initramfs_image", stub_builder)
    store = ImageStore(tmp_path)
    first = store.build("minimal")
    assert first.build == 0 and first.directory.name == f"minimal@{first.content_hash}"
    assert store.build("minimal") == first  # cached
    second = store.build("minimal", force=True)
    assert second.build == 1 and second.directory.name == f"minimal@{first.content_hash}.b1"
    assert first.base_disk.exists() and second.base_disk.exists()  # beside, never over
    assert store.get("minimal") == second and store.build("minimal") == second  # new VMs get the newest
    assert store.for_base(first.base_disk) == first  # an older VM keeps the build it was made on
    assert second.volume_prefix == first.volume_prefix + "-b1"  # and each build has its own upload in a pool
    assert store.for_base(f"/pool/{first.volume_prefix}.qcow2") == first
    assert store.for_base(f"/pool/{second.volume_prefix}.qcow2") == second


def test_importing_a_cloud_image_checks_it_with_qemu_img_and_refusals_leave_nothing(tmp_path: Path) -> None:
    import hashlib
    import subprocess

    def qcow2(name: str, size: str, *extra: str) -> Path:
        path = tmp_path / name
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *extra, str(path), size], check=True)
        return path

    store = ImageStore(tmp_path / "store")
    good = qcow2("good.qcow2", "1G")
    backed = qcow2("backed.qcow2", "1G", "-b", str(good), "-F", "qcow2")
    huge = qcow2("huge.qcow2", "65G")
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(65536))
    for args, needle in (((raw,), "'raw', not qcow2"), ((backed,), "has a backing file"),
                         ((huge,), r"65.0 GiB \(virtual\), over the 64 GiB"),
                         ((good, "0" * 64), "sha256 is"), ((tmp_path / "nope",), "is not a file")):
        with pytest.raises(ImageError, match=needle):
            store.import_image("cloudy", *args)  # type: ignore[arg-type]
    with pytest.raises(ImageError, match="one of hvctl's recipes"):
        store.import_image("base", good)
    with pytest.raises(ImageError, match="bios or uefi"):
        store.import_image("cloudy", good, firmware="pxe")
    assert not store.root.exists() or not any(store.root.iterdir())
    digest = hashlib.sha256(good.read_bytes()).hexdigest()
    image = store.import_image("cloudy", good, sha256=digest, firmware="efi")
    assert (image.kind.value, image.firmware, image.agent, image.disk_virtual_bytes) == ("cloud", "efi", False, 2**30)
    assert store.get("cloudy") == image and image.directory.name == f"cloudy@{digest[:16]}"
    image.verify()  # a cloud image has no kernel or initrd of hvctl's to check
    assert store.import_image("cloudy", good) == image  # the same file again: the same build
