"""hvctl image build, list, rm."""

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from hvctl.cli.common import (
    JsonOpt,
    RichReporter,
    Table,
    ctx,
    emit_json,
    image_app,
    out,
)

# -- images ---------------------------------------------------------------------------------------------------


@image_app.command("build")
def image_build(
    recipe: Annotated[str, typer.Argument(help="Shipped recipe name or path to a recipe .toml.")] = "minimal",
    force: Annotated[bool, typer.Option(help="Build again even if an identical build is cached: the new build "
                                             "goes beside the old ones, which the VMs made on them keep.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Build a guest image from a recipe; an unchanged recipe is served from the cache."""
    started = time.monotonic()
    with RichReporter(f"image build {recipe}") as reporter:
        image = ctx().images.build(recipe, reporter.step, force=force)
    if as_json:
        emit_json(json.loads(image.model_dump_json()))
    else:
        out.print(f"image {image.name}@{image.content_hash} ready in {time.monotonic() - started:.1f} s "
                  f"(kernel {image.kernel_version}, {image.size_bytes / 2**20:.1f} MiB)")


@image_app.command("list")
def image_list(as_json: JsonOpt = False) -> None:
    """List built images."""
    images = ctx().images.list()
    if as_json:
        emit_json([json.loads(i.model_dump_json()) for i in images])
        return
    table = Table("NAME", "HASH", "KIND", "KERNEL", "SIZE MiB", "BUILT")
    for i in images:
        table.add_row(i.name, i.content_hash, i.kind.value, i.kernel_version, f"{i.size_bytes / 2**20:.1f}",
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(i.built_at)))
    out.print(table)


@image_app.command("rm")
def image_rm(name: str, as_json: JsonOpt = False) -> None:
    """Remove every build of an image, unless a VM still uses it."""
    c = ctx()
    in_use = {r.base_disk for r in c.ledger.vms.all()}
    removed = c.images.remove(name, in_use)
    if as_json:
        emit_json({"removed": [f"{i.name}@{i.content_hash}" for i in removed]})
    else:
        out.print(f"removed {len(removed)} build(s) of {name}")


@image_app.command("import")
def image_import(
    name: str,
    file: Annotated[Path, typer.Argument(help="A qcow2 cloud image (its own bootloader, cloud-init).")],
    sha256: Annotated[str | None, typer.Option("--sha256", help="Refuse the file unless its SHA-256 is this.")]
    = None,
    firmware: Annotated[str, typer.Option(help="What boots it: bios (SeaBIOS) or uefi (OVMF).")] = "bios",
    as_json: JsonOpt = False,
) -> None:
    """Bring a stock cloud image into the store. VMs made from it boot through the firmware and the image's own
    bootloader; cloud-init reads hvctl's NoCloud seed (hostname, keys, the pinned host key, network-config) and
    its final message on the serial console is the VM's readiness line."""
    started = time.monotonic()
    with RichReporter(f"image import {name}") as reporter:
        image = ctx().images.import_image(name, file, sha256, {"uefi": "efi"}.get(firmware, firmware),
                                          progress=reporter.step)
    if as_json:
        emit_json(json.loads(image.model_dump_json()))
    else:
        out.print(f"image {image.name}@{image.content_hash} imported in {time.monotonic() - started:.1f} s "
                  f"({image.size_bytes / 2**20:.1f} MiB, {image.disk_virtual_bytes / 2**30:.1f} GiB virtual, "
                  f"{firmware} firmware)")
