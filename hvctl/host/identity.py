"""Whether a libvirt host is this machine: decided from what libvirt says, never from how a URI spells a name.

hvctl treats "this machine" specially where it must: VM files in the controller's state dir, GPUs bound through its
sysfs, cgroups read from its /sys/fs/cgroup. Everything else goes through libvirt, and works the same on any host.

A host is this machine when
- its URI needs no network at all: a unix socket (``qemu:///system``, ``qemu+unix://...``) or the in-process test
  driver reach only a daemon of this machine, whatever names the URI uses; or
- the host UUID its libvirt reports is this machine's: the SMBIOS system UUID, /etc/machine-id (the two sources
  libvirt itself reads, ``host_uuid_source``), or the UUID of a libvirtd reached over a unix socket here.
``qemu+ssh://localhost/system`` is therefore this machine only if the daemon that answers has one of those UUIDs,
and ``qemu+ssh://root@198.18.1.2/system`` (a host in its own namespaces, with its own UUID) is not, although both
run on the same kernel. Private daemons sharing this machine's filesystem must keep distinct UUIDs (libvirt refuses
to migrate between equal ones), so they are reached over unix sockets.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit
from xml.etree import ElementTree as ET

import libvirt

_SMBIOS_UUID = Path("/sys/class/dmi/id/product_uuid")
_MACHINE_ID = Path("/etc/machine-id")


def needs_no_network(uri: str) -> bool:
    """A URI whose transport cannot leave this machine: a unix socket, or a driver that runs in this process."""
    parts = urlsplit(uri)
    driver, _, transport = parts.scheme.partition("+")
    if driver == "test":
        return True
    if transport in ("", "unix"):
        return transport == "unix" or not parts.hostname  # qemu:///system, not qemu://otherhost/system (TLS)
    return False


def machine_uuids() -> frozenset[str]:
    """This machine's UUIDs as libvirt would derive them: SMBIOS, and /etc/machine-id formatted as a UUID."""
    found = set()
    for path in (_SMBIOS_UUID, _MACHINE_ID):
        try:
            found.add(str(uuid.UUID(path.read_text().strip())))
        except (OSError, ValueError):
            continue
    return frozenset(found)


def host_uuid(conn: libvirt.virConnect) -> str:
    caps = ET.fromstring(conn.getCapabilities())
    return str(uuid.UUID(caps.findtext("host/uuid") or "0" * 32))


def is_this_machine(uri: str, conn: libvirt.virConnect, local_daemon_uuids: Iterable[str] = ()) -> bool:
    """``conn`` is a connection to ``uri``; ``local_daemon_uuids``: UUIDs of daemons reached over unix sockets."""
    if needs_no_network(uri):
        return True
    return host_uuid(conn) in machine_uuids() | frozenset(local_daemon_uuids)
