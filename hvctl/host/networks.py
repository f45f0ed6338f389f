"""hvctl's tenant networks on a host: an isolated libvirt network per tenant network, defined the first time a VM on
that host needs it. Isolated: no <forward>, so libvirt routes nothing in or out. The host has one address on the
segment, the subnet's first, where libvirt's dnsmasq serves DHCP and nothing else (no DNS, no router option): one
static lease per VM of the network, the address hvctl's IPAM gave it (``set_dhcp_host``), so that a stock image's
DHCP client gets what hvctl's own images read from their seed. No dynamic range: an unknown MAC gets no answer.

That alone does not keep a VM in: a guest that routes the host's own addresses through its tenant NIC reaches the
host's stack (the host answers ARP on any interface), and it may send with another VM's address or MAC. So every
tenant NIC carries libvirt's nwfilter TENANT_FILTER: libvirt's clean-traffic (its own MAC, IP and ARP only, IPv4
and ARP only) plus hvctl's rules that what leaves the VM over IPv4 is DHCP to the network's server, or for its own
subnet but not the server's address. The filters are defined on the host with the network; libvirt applies them
with ebtables and iptables in the host's network namespace.

A network hvctl defined before it served DHCP (no <ip>) is redefined when no NIC uses it; until then its VMs keep
their static addresses and a stock image on it gets no lease. A VM defined with the filter of those days
(hvctl-tenant-v1, which lets it reach its network's own address) gets today's at its next start or migration
(``hvctl.domain.model.retarget_tenant_filter``)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Network
from xml.etree import ElementTree as ET

import libvirt

from hvctl.domain.devices import TENANT_FILTER, TENANT_MTU, tenant_server
from hvctl.domain.model import HVCTL_NS
from hvctl.host._errors import _errors, _typed

TENANT_FILTERS = {
    TENANT_FILTER: f"""<filter name='{TENANT_FILTER}' chain='root'>
  <filterref filter='clean-traffic'/>
  <filterref filter='hvctl-tenant-dst-v2'/>
</filter>""",
    # $GW: the network's own address, where its DHCP server listens. Nothing but DHCP goes there; DHCP goes nowhere
    # else (a VM's DISCOVER is a broadcast from 0.0.0.0, which clean-traffic lets out for DHCP only).
    "hvctl-tenant-dst-v2": """<filter name='hvctl-tenant-dst-v2' chain='ipv4-hvdst' priority='-690'>
  <rule action='return' direction='out' priority='100'>
    <ip protocol='udp' dstipaddr='255.255.255.255' srcportstart='68' srcportend='68' dstportstart='67'
        dstportend='67'/>
  </rule>
  <rule action='return' direction='out' priority='110'>
    <ip protocol='udp' dstipaddr='$GW' srcportstart='68' srcportend='68' dstportstart='67' dstportend='67'/>
  </rule>
  <rule action='drop' direction='out' priority='200'>
    <ip dstipaddr='$GW'/>
  </rule>
  <rule action='return' direction='out' priority='300'>
    <ip dstipaddr='$NET' dstipmask='$MASK'/>
  </rule>
  <rule action='drop' direction='out' priority='1000'/>
</filter>""",
    # The rules of VMs created before the networks served DHCP (their networks have no address on the host).
    "hvctl-tenant-v1": """<filter name='hvctl-tenant-v1' chain='root'>
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
        try:
            conn.nwfilterDefineXML(xml)
        except libvirt.libvirtError as exc:
            if not _has_filter(conn, name):  # else another create defined it meanwhile, with the same rules
                raise _typed(exc, f"defining nwfilter {name} (tenant networks need libvirt's nwfilter driver, with "
                                  "ebtables and iptables on the host)") from None
    return True


def _has_filter(conn: libvirt.virConnect, name: str) -> bool:
    try:
        conn.nwfilterLookupByName(name)
        return True
    except libvirt.libvirtError:
        return False


@dataclass(frozen=True)
class DhcpHost:
    """One VM's static lease on a tenant network."""

    mac: str
    ip: str
    vm: str

    def to_xml(self) -> str:
        return ET.tostring(ET.Element("host", {"mac": self.mac, "ip": self.ip, "name": self.vm}), encoding="unicode")


def isolated_network_xml(name: str, bridge: str, tenant_network: str, tenant: str, subnet: str,
                         leases: Iterable[DhcpHost] = ()) -> str:
    net = IPv4Network(subnet)
    root = ET.Element("network")
    ET.SubElement(root, "name").text = name
    ET.SubElement(ET.SubElement(root, "metadata"), f"{{{HVCTL_NS}}}network",
                  {"name": tenant_network, "tenant": tenant, "subnet": subnet})
    ET.SubElement(root, "bridge", {"name": bridge, "stp": "off", "delay": "0"})
    # Room for VXLAN's 50 bytes on a 1500-byte underlay when the network spans hosts (the guests' NICs get it from
    # their own <mtu>: libvirt sets the tap's from the network, but tells the guest only the interface's).
    ET.SubElement(root, "mtu", {"size": str(TENANT_MTU)})
    ET.SubElement(root, "dns", {"enable": "no"})
    ip = ET.SubElement(root, "ip", {"address": str(tenant_server(net)), "prefix": str(net.prefixlen)})
    dhcp = ET.SubElement(ip, "dhcp")  # empty: libvirt starts dnsmasq with the first lease and stops it with the last
    for lease in leases:
        dhcp.append(ET.fromstring(lease.to_xml()))
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
    Returns whether anything was made or started. One hvctl defined without DHCP is defined again from ``xml``
    when no NIC is on it.

    Two creates may set up one network on one host at once (from two controllers, even): the one that loses the
    race finds the network the other defined and started, and takes it as its own."""
    name = ET.fromstring(xml).findtext("name") or ""
    net = _lookup(conn, name)
    if _is_up(net):
        return False
    if net is not None and net.isActive():
        with _errors(f"stopping libvirt network {name} to give it DHCP"):
            net.destroy()
    try:
        if net is None or ET.fromstring(net.XMLDesc(libvirt.VIR_NETWORK_XML_INACTIVE)).find("ip") is None:
            net = conn.networkDefineXML(xml)
        net.setAutostart(1)
        net.create()
    except libvirt.libvirtError as exc:
        if _is_up(_lookup(conn, name)):
            return False
        raise _typed(exc, f"defining libvirt network {name}") from None
    return True


def _is_up(net: libvirt.virNetwork | None) -> bool:
    """``net`` runs as hvctl wants it: with DHCP, or with NICs on it (which keep one made before DHCP as it is)."""
    if net is None or not net.isActive():
        return False
    live = ET.fromstring(net.XMLDesc(0))
    return live.find("ip") is not None or bool(int(live.get("connections", "0")))


_LIVE_AND_CONFIG = libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE | libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG


def dhcp_hosts(conn: libvirt.virConnect, name: str) -> list[DhcpHost] | None:
    """The static leases network ``name`` serves; None when it has no DHCP (defined before hvctl served it)."""
    served = _served(conn, name)
    return served[1] if served else None


def _served(conn: libvirt.virConnect, name: str) -> tuple[libvirt.virNetwork, list[DhcpHost]] | None:
    net = _lookup(conn, name)
    if net is None:
        return None
    with _errors(f"reading libvirt network {name}"):
        ip = ET.fromstring(net.XMLDesc(0)).find("ip")
    if ip is None:
        return None
    return net, [DhcpHost(h.get("mac", ""), h.get("ip", ""), h.get("name", "")) for h in ip.iterfind("dhcp/host")]


def set_dhcp_host(conn: libvirt.virConnect, name: str, lease: DhcpHost) -> bool:
    """Serve ``lease`` on network ``name``, live and in its definition, in place of any other lease of that MAC or
    address. False when the network has no DHCP."""
    served = _served(conn, name)
    if served is None:
        return False
    net, current = served
    if lease in current:
        return True
    with _errors(f"giving {lease.vm} its DHCP lease on libvirt network {name}"):
        for stale in current:
            if stale.mac == lease.mac or stale.ip == lease.ip:
                net.update(libvirt.VIR_NETWORK_UPDATE_COMMAND_DELETE, libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST, -1,
                           stale.to_xml(), _LIVE_AND_CONFIG)
        net.update(libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST, libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST, -1,
                   lease.to_xml(), _LIVE_AND_CONFIG)
    return True


def remove_dhcp_host(conn: libvirt.virConnect, name: str, mac: str) -> bool:
    """Stop serving the lease of ``mac`` on network ``name``; False when it served none."""
    net, current = _served(conn, name) or (None, [])
    stale = [h for h in current if h.mac == mac]
    for lease in stale:
        assert net is not None
        with _errors(f"removing {lease.vm}'s DHCP lease from libvirt network {name}"):
            net.update(libvirt.VIR_NETWORK_UPDATE_COMMAND_DELETE, libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST, -1,
                       lease.to_xml(), _LIVE_AND_CONFIG)
    return bool(stale)


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
