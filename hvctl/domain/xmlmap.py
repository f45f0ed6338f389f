"""One declaration per XML value, read both ways.

A class of the domain model declares, in document order, where each of its fields lives below its element, and
which parts of the element are fixed. ``emit`` writes an element from an object and ``parse`` reads the fields back,
both from that one list, so a field cannot be written one way and read another (virtinst's XMLProperty is the
model). Paths are ElementTree paths below the element ("." is the element itself).

- ``Fixed(path, attrs, text)``: always written there; never read (libvirt writes it back, hvctl decides nothing).
- ``Value(field, path, attr)``: a field as an attribute, or as the element's text when ``attr`` is None. ``None``
  writes nothing (and ``when`` names a field that must be set for it to be written); a value not found reads as the
  field's default, or is an error where the field has none. ``also``: attributes written beside it.
- ``Quantity(field, path, unit)``: a size written in ``unit`` with its ``unit=`` attribute; read in any unit.
- ``Flag(field, path)``: True is an empty element there, False its absence.
- ``Pairs(field, path, key, value)``: a tuple of pairs as repeated elements, each with two attributes.
- ``Nested(field, path, cls)``: an object of a class with its own declarations, in the element at ``path``.
- ``Custom(fields, write, read)``: fields whose XML is not one value in one place, by two functions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar
from xml.etree import ElementTree as ET

# A field's conversion to its XML text and back.
Conv = tuple[Callable[[Any], str], Callable[[str], Any]]
TEXT: Conv = (str, str)
INT: Conv = (str, int)


def enum_of(cls: Callable[[str], Any]) -> Conv:
    return (lambda v: str(v.value), cls)


def hex_width(width: int) -> Conv:
    """libvirt's PCI address parts: ``0x`` and ``width`` hex digits."""
    return (lambda v: f"0x{v:0{width}x}", lambda s: int(s, 16))


# libvirt's size units (domain XML "unit" attributes), in bytes.
UNITS = {"b": 1, "bytes": 1, "k": 1024, "KiB": 1024, "M": 1024**2, "MiB": 1024**2, "G": 1024**3, "GiB": 1024**3,
         "T": 1024**4, "TiB": 1024**4, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4}


def in_unit(text: str, unit: str | None, wanted: str) -> int:
    """A size libvirt wrote as ``text`` in ``unit`` (KiB when it names none), in ``wanted`` units."""
    return int(text) * UNITS[unit or "KiB"] // UNITS[wanted]


@dataclass(frozen=True)
class Fixed:
    path: str
    attrs: tuple[tuple[str, str], ...] = ()
    text: str | None = None


@dataclass(frozen=True)
class Value:
    field: str
    path: str
    attr: str | None = None
    conv: Conv = TEXT
    also: tuple[tuple[str, str], ...] = ()
    when: str | None = None
    # The attribute's name is the value of this field instead of ``attr`` (<source bridge=…> or <source network=…>).
    attr_from: str | None = None


@dataclass(frozen=True)
class Quantity:
    field: str
    path: str
    unit: str


@dataclass(frozen=True)
class Flag:
    field: str
    path: str


@dataclass(frozen=True)
class Pairs:
    field: str
    path: str
    key: str
    value: str
    key_conv: Conv = TEXT


@dataclass(frozen=True)
class Nested:
    field: str
    path: str
    cls: type[HasXml]


@dataclass(frozen=True)
class Custom:
    """Fields whose XML is not one value in one place (a variant, a namespace, QEMU's argument list), written and
    read by the two functions given: the one place for them. ``write(element, obj)``; ``read(element)`` returns the
    fields."""

    fields: tuple[str, ...]
    write: Callable[[ET.Element, Any], None]
    read: Callable[[ET.Element], dict[str, Any]]


Item = Fixed | Value | Quantity | Flag | Pairs | Nested | Custom


class HasXml(Protocol):
    xml: ClassVar[tuple[Item, ...]]


T = TypeVar("T")


def _parent_and_tag(path: str) -> tuple[str, str]:
    parent, _, tag = path.rpartition("/")
    return parent or ".", tag


def _at(el: ET.Element, path: str) -> ET.Element:
    """The element at ``path`` below ``el``, made (with every element above it) where there is none yet."""
    if path == ".":
        return el
    parent_path, tag = _parent_and_tag(path)
    parent = _at(el, parent_path)
    found = parent.find(tag)
    return found if found is not None else ET.SubElement(parent, tag)


def write(el: ET.Element, obj: object, items: tuple[Item, ...]) -> ET.Element:
    """``obj``'s declared fields into ``el`` (in declaration order); returns ``el``."""
    for item in items:
        if isinstance(item, Fixed):
            target = _at(el, item.path)
            for name, value in item.attrs:
                target.set(name, value)
            if item.text is not None:
                target.text = item.text
            continue
        if isinstance(item, Custom):
            item.write(el, obj)
            continue
        value = getattr(obj, item.field)
        if isinstance(item, Value):
            if value is None or (item.when is not None and not getattr(obj, item.when)):
                continue
            target = _at(el, item.path)
            attr = getattr(obj, item.attr_from) if item.attr_from else item.attr
            if attr is None:
                target.text = item.conv[0](value)
            else:
                target.set(attr, item.conv[0](value))
            for name, fixed in item.also:
                target.set(name, fixed)
        elif isinstance(item, Quantity):
            if value is not None:
                target = _at(el, item.path)
                target.text = str(value)
                target.set("unit", item.unit)
        elif isinstance(item, Flag):
            if value:
                _at(el, item.path)
        elif isinstance(item, Pairs):
            if value:
                parent_path, tag = _parent_and_tag(item.path)
                parent = _at(el, parent_path)
                for key, val in value:
                    ET.SubElement(parent, tag, {item.key: item.key_conv[0](key), item.value: str(val)})
        elif value is not None:  # Nested
            write(_at(el, item.path), value, item.cls.xml)
    return el


def emit(tag: str, obj: HasXml) -> ET.Element:
    """A new element ``tag`` holding ``obj``, as its class declares."""
    return write(ET.Element(tag), obj, obj.xml)


def _default(cls: type, name: str, where: str) -> Any:
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    raise ValueError(f"<{where}> lacks {name}")


def fields_of(el: ET.Element, cls: type) -> dict[str, Any]:
    """The declared fields of ``cls`` as ``el`` holds them (a missing one: its default, else an error)."""
    found: dict[str, Any] = {}
    for item in cls.xml:  # type: ignore[attr-defined]
        if isinstance(item, Fixed):
            continue
        if isinstance(item, Custom):
            found.update(item.read(el))
            continue
        at = el if item.path == "." else el.find(item.path)
        if isinstance(item, Flag):
            found[item.field] = at is not None
        elif isinstance(item, Pairs):
            parent_path, tag = _parent_and_tag(item.path)
            parent = el if parent_path == "." else el.find(parent_path)
            found[item.field] = tuple((item.key_conv[1](p.get(item.key, "")), p.get(item.value, ""))
                                      for p in (parent.iterfind(tag) if parent is not None else ()))
        elif isinstance(item, Nested):
            found[item.field] = (parse(at, item.cls) if at is not None
                                 else _default(cls, item.field, f"{el.tag}>/{item.path}"))
        elif isinstance(item, Quantity):
            found[item.field] = (in_unit(at.text, at.get("unit"), item.unit) if at is not None and at.text
                                 else _default(cls, item.field, f"{el.tag}>/{item.path}"))
        else:
            attr = found[item.attr_from] if item.attr_from else item.attr
            text = None if at is None else (at.text if attr is None else at.get(attr))
            found[item.field] = (item.conv[1](text) if text is not None
                                 else _default(cls, item.field, f"{el.tag}>/{item.path}"))
    return found


def parse(el: ET.Element, cls: type[T]) -> T:
    return cls(**fields_of(el, cls))


def declared_fields(cls: type) -> list[str]:
    """The fields ``cls`` declares, in order (a test checks every one is exercised by some golden file)."""
    items = cls.xml  # type: ignore[attr-defined]
    return [f for item in items if not isinstance(item, Fixed)
            for f in (item.fields if isinstance(item, Custom) else (item.field,))]
