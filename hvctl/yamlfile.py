"""Every YAML document hvctl reads goes through here: size-capped, safe-loaded, and with no anchors or aliases.

PyYAML expands aliases into shared references and builds whatever they describe: a ~500-byte "billion laughs"
document becomes gigabytes once anything walks it (pydantic does). hvctl's files (policies, plans) never need
aliases, so they are refused outright rather than counted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_YAML_BYTES = 1 << 20


class _NoAliasLoader(yaml.SafeLoader):  # type: ignore[misc]
    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in hvctl's YAML files",
                                              event.start_mark)
        return super().compose_node(parent, index)


def read_text(path: Path) -> str:
    """A YAML file's text, refused past MAX_YAML_BYTES without reading the rest. OSError and UnicodeDecodeError
    propagate; a too-large file raises yaml.YAMLError like any other unusable document."""
    with path.open("rb") as f:
        data = f.read(MAX_YAML_BYTES + 1)
    return data.decode()


def _check_size(text: str) -> None:
    if len(text.encode()) > MAX_YAML_BYTES:
        raise yaml.YAMLError(f"the document is over {MAX_YAML_BYTES} bytes")


def load(text: str) -> Any:
    _check_size(text)
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass


def compose(text: str) -> yaml.Node | None:
    """The node tree (with line marks) under the same rules as ``load``."""
    _check_size(text)
    node: yaml.Node | None = yaml.compose(text, Loader=_NoAliasLoader)
    return node
