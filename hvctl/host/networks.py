"""hvctl's tenant networks on a host: an isolated libvirt network per tenant network, defined the first time a VM on
that host needs it. Isolated: no <forward> (libvirt routes nothing in or out) and no <ip> (the host has no address
on the segment, and no DHCP server runs there), so the segment joins the VMs on it and nothing else."""

from __future__ import annotations

from xml.etree import ElementTree as ET

import libvirt

from hvctl.domain.model import HVCTL_NS
from hvctl.host._errors import _errors


def isolated_network_xml(name: str, bridge: str, tenant_network: str, tenant: str, subnet: str) -> str:
    root = ET.Element("network")
    ET.SubElement(root, "name").text = name
    ET.SubElement(ET.SubElement(root, "metadata"), f"{{{HVCTL_NS}}}network",
                  {"name": tenant_network, "tenant": tenant, "subnet": subnet})
    ET.SubElement(root, "bridge", {"name": bridge, "stp": "off", "delay": "0"})
    return ET.tostring(root, encoding="unicode")


def _lookup(conn: libvirt.virConnect, name: str) -> libvirt.virNetwork | None:
    with _errors(f"reading libvirt network {name}"):
        try:
            return conn.networkLookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_NETWORK:
                raise
            return None


def ensure_network(conn: libvirt.virConnect, xml: str) -> bool:
    """Define (persistent, autostarted) and start the network ``xml`` describes, unless the host has it running.
    Returns whether anything was made or started."""
    name = ET.fromstring(xml).findtext("name") or ""
    net = _lookup(conn, name)
    if net is not None and net.isActive():
        return False
    with _errors(f"defining libvirt network {name}"):
        if net is None:
            net = conn.networkDefineXML(xml)
        net.setAutostart(1)
        net.create()
    return True


def remove_network(conn: libvirt.virConnect, name: str) -> bool:
    """Stop and undefine network ``name``; False when the host has none by that name."""
    net = _lookup(conn, name)
    if net is None:
        return False
    with _errors(f"removing libvirt network {name}"):
        if net.isActive():
            net.destroy()
        net.undefine()
    return True
