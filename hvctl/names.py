"""The one rule for names of VMs, tenants, hosts, images and snapshots, kept apart from the pydantic specs so that
the commands that only read (``hvctl list``) can check a name without importing pydantic."""

from __future__ import annotations

import re

from hvctl.errors import InvalidSpec

NAME_PATTERN = r"^[a-z][a-z0-9-]{0,62}$"
_NAME = re.compile(NAME_PATTERN)


def check_name(name: str, what: str = "name") -> str:
    if not _NAME.fullmatch(name):
        raise InvalidSpec(f"invalid {what} {name!r}: must match {NAME_PATTERN.strip('^$')}")
    return name
