"""A declarative image recipe, validated and content-hashed so an unchanged recipe never rebuilds."""

from __future__ import annotations

import enum
import hashlib
import json
import tomllib
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError, field_validator

from guest.kinds import BAKED_MODELS
from guest.validation import describe
from hvctl.errors import ImageError

RECIPES_DIR = Path(__file__).parent / "recipes"
INIT_DIR = Path(__file__).parent / "init"
# Bumped when a builder changes what it produces from the same recipe, so old cache entries stop matching.
BUILDER_VERSION = 1

PackageName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9+.-]{0,99}$")]
ModuleName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]+$")]
FileName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_.-]+$")]
GUEST_DIR = Path(__file__).resolve().parent.parent / "guest"


class RecipeKind(enum.StrEnum):
    INITRAMFS = "initramfs"
    DEBOOTSTRAP = "debootstrap"
    # Not a recipe: a stock cloud image brought in with `hvctl image import` (its own bootloader and cloud-init).
    CLOUD = "cloud"


class Recipe(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9.-]{0,62}$")]
    kind: RecipeKind
    suite: Annotated[str, StringConstraints(pattern=r"^[a-z]+$")] = "bookworm"
    kernel_package: PackageName = "linux-image-cloud-amd64"
    packages: tuple[PackageName, ...] = ()
    modules: tuple[ModuleName, ...] = ()
    init: FileName | None = None
    # Debian images only: a stage-1 initramfs init, modules the guest's own init loads, Python packages installed for
    # the guest from the host (same cp311 ABI), whether hvctl's agent is baked in, and paths removed to save space.
    stage1: FileName | None = None
    guest_modules: tuple[ModuleName, ...] = ()
    python_packages: tuple[Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.<>=!,-]*$")], ...] = ()
    agent: bool = False
    # Models built on the host at image build time and baked into MODELS_DIR/NAME (guest.kinds.BAKED_MODELS).
    models: tuple[str, ...] = ()
    trim: tuple[Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_./-]*$")], ...] = ()

    @field_validator("models")
    @classmethod
    def _known_models(cls, models: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [m for m in models if m not in BAKED_MODELS]
        if unknown:
            raise ValueError(f"unknown model {unknown[0]!r}; known: {', '.join(BAKED_MODELS)}")
        return models

    def content_hash(self) -> str:
        """Hash of everything that decides the image's bytes: the recipe, the files it names, the builder."""
        digest = hashlib.sha256()
        digest.update(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode())
        digest.update(str(BUILDER_VERSION).encode())
        for script in (self.init, self.stage1):
            if script:
                digest.update((INIT_DIR / script).read_bytes())
        if self.agent:
            # The agent is baked into the image, so its code is part of what the image is.
            for source in sorted(GUEST_DIR.rglob("*.py")):
                digest.update(str(source.relative_to(GUEST_DIR)).encode())
                digest.update(source.read_bytes())
        return digest.hexdigest()[:16]


def load_recipe(name_or_path: str) -> Recipe:
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPES_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.toml")))
        raise ImageError(f"no image recipe {name_or_path!r}; shipped recipes: {known}")
    try:
        return Recipe(**tomllib.loads(path.read_text()))
    except (tomllib.TOMLDecodeError, ValidationError) as exc:
        first = str(exc).splitlines()[0] if isinstance(exc, tomllib.TOMLDecodeError) else describe(exc)
        raise ImageError(f"{path}: {first}") from None


def shipped_recipe_names() -> set[str]:
    return {p.stem for p in RECIPES_DIR.glob("*.toml")}
