"""hvctl's config file: defaults for the global options, so an admin need not repeat -c, --state-dir or --policy.

Files are read in order, a later one overriding an earlier: ``/etc/hvctl/config.toml``, then
``~/.config/hvctl/config.toml`` (``$XDG_CONFIG_HOME`` if set). ``HVCTL_CONFIG=FILE`` reads that file alone. Each
key is a global option's own name (``SETTINGS``): what the file can set is exactly what the flags can, and the
flags' help is the settings' documentation. A flag or its environment variable beats the file.

    connect = "qemu+ssh://root@hv1/system"
    state_dir = "/srv/hvctl"
    policy = "/etc/hvctl/policy.yaml"
    wait = 30
    ledger = "postgresql://hvctl@db.example/hvctl"   # several controllers, one fleet (README)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hvctl.errors import InvalidSpec

# Setting → the type its value must have. The keys are the root command's parameter names (hvctl.cli.common's
# main_options), so the file feeds click's default_map directly.
SETTINGS: dict[str, type | tuple[type, ...]] = {"connect": str, "state_dir": str, "policy": str,
                                                "wait": (int, float), "ledger": str}
ENV = "HVCTL_CONFIG"


def config_files() -> list[Path]:
    if os.environ.get(ENV):
        return [Path(os.environ[ENV])]
    home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return [Path("/etc/hvctl/config.toml"), home / "hvctl" / "config.toml"]


def load() -> tuple[dict[str, Any], dict[str, str]]:
    """The merged settings, and for each the file it came from. A file that is not there is skipped (but the one
    HVCTL_CONFIG names must exist); a bad one is refused with its path and the key."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    explicit = bool(os.environ.get(ENV))
    for path in config_files():
        try:
            text = path.read_text()
        except FileNotFoundError:
            if explicit:
                raise InvalidSpec(f"{ENV}={path}: no such file") from None
            continue
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidSpec(f"cannot read config file {path}: {getattr(exc, 'strerror', None) or exc}") from None
        import tomllib  # only when there is a file: most runs have none

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InvalidSpec(f"config file {path}: {exc}") from None
        for key, value in data.items():
            if key not in SETTINGS:
                raise InvalidSpec(f"config file {path}: unknown setting {key!r}; known: {', '.join(SETTINGS)}")
            if isinstance(value, bool) or not isinstance(value, SETTINGS[key]):
                raise InvalidSpec(f"config file {path}: {key} = {value!r} is not a "
                                  f"{'number' if key == 'wait' else 'string'}")
            values[key], sources[key] = value, str(path)
    return values, sources
