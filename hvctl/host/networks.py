"""hvctl's tenant networks on a host: an isolated libvirt network per tenant network, defined the first time a VM on
that host needs it. Isolated: no <forward> (libvirt routes nothing in or out) and no <ip> (the host has no address
on the segment, and no DHCP server runs there).

That alone does not keep a VM in: a guest that routes the host's own address through its tenant NIC reaches the
host's stack (the host answers ARP on any interface), and it may send with another VM's address or MAC. So every
tenant NIC carries libvirt's nwfilter TENANT_FILTER: libvirt's clean-traffic (its own MAC, IP and ARP only, IPv4
and ARP only) plus hvctl's rule that what leaves the VM over IPv4 is for its own subnet. The filters are defined
on the host with the network; libvirt applies them with ebtables and iptables in the host's network namespace."""

from __future__ import annotations

from xml.etree import ElementTree as ET

import libvirt

from hvctl.domain.devices import TENANT_FILTER, TENANT_MTU
from hvctl.domain.model import HVCTL_NS
from hvctl.host._errors import _errors, _typed

TENANT_FILTERS = {
    TENANT_FILTER: f"""<filter name='{TENANT_FILTER}' chain='root'>
  <filterref filter='clean-traffic'/>
  <filterref filter='hvctl-tenant-dst-v1'/>
</filter>""",
    # After clean-traffic's source check (chain ipv4-ip, priority -710) and before its "accept IPv4" (-650).
    "hvctl-tenant-dst-v1": """<filter name='hvctl-tenant-dst-v1' chain='ipv4-hvdst' priority='-690'>
  <rule action='return' direction='out' priority='100'>
    <ip dstipaddr='$NET' dstipmask='$MASK'/>
  </rule>
  <rule action='drop' direction='out' priority='1000'/>
</filter>""",
}


def ensure_tenant_filters(conn: libvirt.virConnect, uri: str) -> bool:
    """Define hvctl's tenant filters on the host unless it has them. False only for libvirt's test driver, which has
    no nwfilter support (its domains never run, so nothing is left unfiltered)."""
    for name, xml in reversed(TENANT_FILTERS.items()):  # the referenced filter first
        try:
            conn.nwfilterLookupByName(name)
            continue
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT and uri.startswith("test:"):
                return False
            if exc.get_error_code() != libvirt.VIR_ERR_NO_NWFILTER:
                raise _typed(exc, f"reading nwfilter {name}") from None
        with _errors(f"defining nwfilter {name} (tenant networks need libvirt's nwfilter driver, with ebtables and "
                     "iptables on the host)"):
            conn.nwfilterDefineXML(xml)
    return True


def isolated_network_xml(name: str, bridge: str, tenant_network: str, tenant: str, subnet: str) -> str:
    root = ET.Element("network")
    ET.SubElement(root, "name").text = name
    ET.SubElement(ET.SubElement(root, "metadata"), f"{{{HVCTL_NS}}}network",
                  {"name": tenant_network, "tenant": tenant, "subnet": subnet})
    ET.SubElement(root, "bridge", {"name": bridge, "stp": "off", "delay": "0"})
    # Room for VXLAN's 50 bytes on a 1500-byte underlay when the network spans hosts (the guests' NICs get it from
    # their own <mtu>: libvirt sets the tap's from the network, but tells the guest only the interface's).
    ET.SubElement(root, "mtu", {"size": str(TENANT_MTU)})
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
