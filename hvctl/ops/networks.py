"""hvctl network create/list/show/rm, and a VM's place on a tenant network: the ledger keeps the networks and their
addresses (``hvctl.ledger.networks``); each host that runs one of a network's VMs gets it as an isolated libvirt
network (``hvctl.host.networks``), made when the first VM there needs it and kept until `network rm`, whose DHCP
server gives each VM of the network its IPAM address (``publish_lease``).

A network whose VMs run on several hosts is one segment through VXLAN, one VNI per network, over the hosts' own
underlay addresses (`hvctl host add --underlay`). libvirt cannot make a VXLAN device, so hvctl makes it on each host
over the ssh of the host's qemu+ssh URI (``access.host_command``): a ``vx-…`` device on the network's bridge, with a
flood entry per peer host (head-end replication; unicast MACs are learnt)."""

from __future__ import annotations

import subprocess
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from hvctl.access import AccessError, host_command
from hvctl.context import Context
from hvctl.designer import nic_mac
from hvctl.domain.devices import tenant_server
from hvctl.domain.model import retarget_tenant_filter
from hvctl.errors import HostUnreachable, HvctlError, HypervisorError, InvalidSpec, NotFound
from hvctl.host.guest import Guest
from hvctl.host.networks import DhcpHost
from hvctl.ledger import NetworkRecord, VMRecord
from hvctl.ledger.networks import check_attach
from hvctl.names import check_name
from hvctl.ops import Say, quiet
from hvctl.spec import NetworkAttach, VMSpec

# What asking a host to do something can fail with: it is down, it refused (a failed command or libvirt call), or it
# has no ssh to run commands over (reached by qemu+tls).
_HOST_FAILURES = (HostUnreachable, HypervisorError, AccessError)


@dataclass(frozen=True)
class NetworkMember:
    vm: str
    address: str
    host: str


@dataclass(frozen=True)
class NetworkView:
    """`hvctl network show`: the network, the VMs on it, how many addresses are left, and its DHCP server's address
    (the same on every host)."""

    network: NetworkRecord
    vms: tuple[NetworkMember, ...]

    @property
    def free(self) -> int:
        return len(self.network.usable()) - len(self.vms)

    @property
    def dhcp_server(self) -> str:
        return str(tenant_server(self.network.subnet))

    def as_json(self) -> dict[str, Any]:
        return self.network.as_dict() | {"vms": [asdict(m) for m in self.vms], "free": self.free,
                                         "dhcp_server": self.dhcp_server}


@dataclass(frozen=True)
class NetworkRemoved:
    network: str
    removed_from: tuple[str, ...]  # the hosts whose libvirt network went

    def as_json(self) -> dict[str, Any]:
        return {"network": self.network, "removed_from": list(self.removed_from)}


def create_network(ctx: Context, name: str, tenant: str, subnet: str | None) -> NetworkRecord:
    check_name(name, "network name")
    ctx.policy.tenant(tenant)  # an unknown tenant is refused
    try:
        parsed = IPv4Network(subnet) if subnet is not None else None
    except ValueError as exc:
        raise InvalidSpec(f"--subnet {subnet}: {exc}", hint="an IPv4 network such as 10.96.1.0/24") from None
    return ctx.ledger.networks.add(name, tenant, parsed)


def show_network(ctx: Context, name: str) -> NetworkView:
    return NetworkView(ctx.ledger.networks.get(name),
                       tuple(NetworkMember(*member) for member in ctx.ledger.networks.addresses(name)))


def list_networks(ctx: Context, tenant: str | None = None) -> list[NetworkView]:
    return [show_network(ctx, n.name) for n in ctx.ledger.networks.all(tenant)]


def remove_network(ctx: Context, name: str, say: Say = quiet) -> NetworkRemoved:
    """Refused while a VM is on it. Otherwise its libvirt network goes from every registered host that has it; a host
    that cannot be asked stops the removal with nothing forgotten, so that a later `network rm` finishes it."""
    network = ctx.ledger.networks.get(name)
    users = ctx.ledger.networks.addresses(name)
    if users:
        raise InvalidSpec(f"network {name} is in use by {', '.join(vm for vm, _, _ in users)}",
                          hint="destroy those VMs first")
    removed_from = []
    underlays = ctx.ledger.networks.underlays()
    for host in ctx.ledger.hosts.all():
        try:
            if ctx.host(host.name).remove_network(network.libvirt_name):
                say(f"removed libvirt network {network.libvirt_name} from host {host.name}")
                removed_from.append(host.name)
            if host.name in underlays:  # a host that may have carried it over VXLAN
                _on_host(ctx, host.name, f"ip link del {network.vxlan} 2>/dev/null || true")
        except (HostUnreachable, HypervisorError) as exc:
            raise HvctlError(f"network {name}: host {host.name} could not be asked to remove it: {exc.message}",
                             hint="bring the host back (or `hvctl host rm` it) and run `hvctl network rm` again") \
                from None
    ctx.ledger.networks.remove(name)
    return NetworkRemoved(name, tuple(removed_from))


def tenant_attach(ctx: Context, name: str) -> NetworkAttach:
    """The NIC a VM gets on tenant network ``name``; its address is given when the VM is reserved."""
    network = ctx.ledger.networks.get(name)
    return NetworkAttach(network=network.libvirt_name, tenant_network=network.name)


def check_tenant_network(ctx: Context, spec: VMSpec) -> NetworkRecord | None:
    """Before anything is written: the network exists, is the VM's tenant's and has a free address. The ledger checks
    all of it again when it gives the address, in the VM's own transaction."""
    net = spec.network
    if net is None or net.tenant_network is None:
        return None
    network = ctx.ledger.networks.get(net.tenant_network)
    check_attach(network, spec, len(ctx.ledger.networks.addresses(network.name)))
    return network


def ensure_on_host(ctx: Context, spec: VMSpec, host: str, say: Say = quiet) -> None:
    """The VM's tenant network, running on ``host`` (made there if it is the first of its VMs on that host), and
    joined by VXLAN to the other hosts that run its VMs."""
    network = check_tenant_network(ctx, spec)
    if network is None:
        return
    hosts = sorted({*ctx.ledger.networks.hosts(network.name), host})
    if len(hosts) > 1:
        underlays = ctx.ledger.networks.underlays()
        missing = [h for h in hosts if h not in underlays]
        if missing:
            raise InvalidSpec(f"network {network.name} would span hosts {', '.join(hosts)}, and host "
                              f"{missing[0]} has no underlay address for VXLAN",
                              hint=f"`hvctl host add {missing[0]} URI --underlay ADDRESS` (the host's own address "
                                   "that the other hosts reach)")
    if ctx.host(host).ensure_isolated_network(network.libvirt_name, network.bridge, network.name, network.tenant,
                                              str(network.subnet), leases(ctx, network.name)):
        say(f"tenant network {network.name} set up on host {host} (bridge {network.bridge})")
    if spec.network is not None and spec.network.address is not None:  # a VM that has its address: a migration
        ctx.host(host).set_dhcp_host(network.libvirt_name, _lease(spec.name, str(spec.network.address.ip)))
    if len(hosts) > 1:
        _join_vxlan(ctx, network, hosts, say)


def with_current_filter(ctx: Context, record: VMRecord, guest: Guest, say: Say = quiet) -> Guest:
    """A stopped VM whose tenant NIC names an earlier tenant filter (``retarget_tenant_filter``), redefined with
    today's before it starts; its network set up on the host first (which defines the filter there, and gives the
    network DHCP if it has none and no NIC uses it). Returns the guest to start: ``guest`` when nothing changed."""
    xml = guest.xml(inactive=True)
    current = retarget_tenant_filter(xml)
    if current == xml:
        return guest
    ensure_on_host(ctx, record.spec, record.host, say)
    say(f"{record.name}'s tenant NIC gets the current filter (its own was from before the network's DHCP server, "
        "and let it reach the host there)")
    return guest.host.define(current)


def _join_vxlan(ctx: Context, network: NetworkRecord, hosts: list[str], say: Say) -> None:
    """The network's VXLAN device on each of ``hosts``, with a flood entry for each of the others (idempotent)."""
    underlays = ctx.ledger.networks.underlays()
    for each in hosts:
        peers = [str(underlays[h]) for h in hosts if h != each]
        _on_host(ctx, each, _vxlan_script(network, underlays[each], peers))
    say(f"tenant network {network.name} spans hosts {', '.join(hosts)} (VXLAN {network.vni})")


def leases(ctx: Context, name: str) -> list[DhcpHost]:
    """The static DHCP leases of network ``name``: one per VM on it, its IPAM address for its NIC's MAC."""
    return [_lease(vm, address) for vm, address, _ in ctx.ledger.networks.addresses(name)]


def _lease(vm: str, address: str) -> DhcpHost:
    return DhcpHost(mac=nic_mac(vm), ip=address, vm=vm)


def publish_lease(ctx: Context, spec: VMSpec, say: Say = quiet) -> list[str]:
    """Once the ledger gave ``spec`` its address: its DHCP lease on every host that carries its network (each host's
    server answers for every VM of the network, so a VM that moves between hosts, or a DISCOVER that crosses
    VXLAN, gets the same answer everywhere). Returns the hosts that serve it. Its own host failing raises; another
    host failing is said and skipped (that host's server then stays silent for this VM)."""
    net = spec.network
    if net is None or net.tenant_network is None or net.address is None:
        return []
    network = ctx.ledger.networks.get(net.tenant_network)
    served = []
    for host in sorted({*ctx.ledger.networks.hosts(network.name), *([spec.host] if spec.host else [])}):
        try:
            if ctx.host(host).set_dhcp_host(network.libvirt_name, _lease(spec.name, str(net.address.ip))):
                served.append(host)
        except _HOST_FAILURES as exc:
            if host == spec.host:
                raise
            say(f"warning: host {host} could not be given {spec.name}'s DHCP lease: {exc.message}")
    return served


def withdraw_lease(ctx: Context, network_name: str, vm: str, hosts: list[str], say: Say = quiet) -> None:
    """``vm``'s DHCP lease off network ``network_name`` on ``hosts``, as far as they can be asked: a lease left
    behind only holds an address for a MAC no VM has, and a later VM of that name or address replaces it."""
    try:
        libvirt_name = ctx.ledger.networks.get(network_name).libvirt_name
    except NotFound:
        return
    for host in hosts:
        try:
            ctx.host(host).remove_dhcp_host(libvirt_name, nic_mac(vm))
        except (*_HOST_FAILURES, NotFound) as exc:
            say(f"warning: host {host} still serves {vm}'s DHCP lease on {network_name}: {exc.message}")


def withdraw_vm_lease(ctx: Context, record: VMRecord, say: Say = quiet) -> None:
    """A VM that is going (destroy, a rolled-back create): its lease off every host of its tenant network."""
    net = record.spec.network
    if net is not None and net.tenant_network is not None:
        withdraw_lease(ctx, net.tenant_network, record.name,
                       sorted({*ctx.ledger.networks.hosts(net.tenant_network), record.host}), say)


def leave_if_unused(ctx: Context, network_name: str, host: str, say: Say = quiet) -> None:
    """``host`` ran a VM of the network and runs none now (a destroy, a migration away): it leaves the network's
    VXLAN (its ``vx-`` device goes; its libvirt network stays until `network rm`), and the hosts still running its
    VMs drop their flood entry for it, or their own device when no peer is left. As far as the hosts can be asked:
    a host that cannot be is said and skipped (a flood entry left for a host that is gone only costs a copy of each
    broadcast)."""
    remaining = ctx.ledger.networks.hosts(network_name)
    underlays = ctx.ledger.networks.underlays()
    if host in remaining or host not in underlays:
        return
    vx = ctx.ledger.networks.get(network_name).vxlan
    scripts = {host: f"ip link del {vx} 2>/dev/null || true"}
    for other in remaining:
        scripts[other] = (f"ip link del {vx} 2>/dev/null || true" if len(remaining) == 1 else
                          f"bridge fdb del 00:00:00:00:00:00 dev {vx} dst {underlays[host]} 2>/dev/null || true")
    for each, script in scripts.items():
        try:
            _on_host(ctx, each, script)
        except _HOST_FAILURES as exc:
            say(f"warning: host {each} could not be asked to leave or prune network {network_name}'s VXLAN: "
                f"{exc.message}")
    say(f"host {host} left network {network_name}'s VXLAN")


def vxlan_gaps(ctx: Context) -> list[tuple[NetworkRecord, str]]:
    """(network, host) for each host that runs VMs of a network spanning hosts and has no VXLAN device for it (a
    host reboot: libvirt restarts the network but knows nothing of the device). A host that cannot be asked is
    not counted here: the doctor's hosts check names one that is down, and one reached over qemu+tls has no ssh."""
    gaps = []
    for network in ctx.ledger.networks.all():
        hosts = ctx.ledger.networks.hosts(network.name)
        for host in hosts if len(hosts) > 1 else []:
            try:
                _on_host(ctx, host, f"ip link show {network.vxlan} >/dev/null 2>&1")
            except HypervisorError:  # the command ran and found no device
                gaps.append((network, host))
            except (HostUnreachable, AccessError):  # down, or no ssh to it (qemu+tls): an admin's to check
                continue
    return gaps


def repair_vxlan(ctx: Context, say: Say = quiet) -> list[str]:
    """`doctor --repair`: each gap ``vxlan_gaps`` finds is set up again as a create would (the device, its flood
    entries, and the peers' entries for it). Returns "NETWORK on HOST" for each."""
    gaps: dict[str, tuple[NetworkRecord, list[str]]] = {}
    for network, host in vxlan_gaps(ctx):
        gaps.setdefault(network.name, (network, []))[1].append(host)
    repaired = []
    for network, hosts in gaps.values():  # one join per network sets up every host of it that lacks its device
        try:
            _join_vxlan(ctx, network, ctx.ledger.networks.hosts(network.name), say)
        except _HOST_FAILURES as exc:  # another of its hosts: the other networks go on
            say(f"warning: network {network.name}'s VXLAN could not be set up again: {exc.message}")
            continue
        repaired += [f"{network.name} on {host}" for host in hosts]
    return repaired


def _vxlan_script(network: NetworkRecord, local: IPv4Address, peers: list[str]) -> str:
    """Idempotent: the network's VXLAN device on its bridge, up, with a flood entry for each peer host."""
    vx = network.vxlan
    return (f"set -e; ip link show {vx} >/dev/null 2>&1 || ip link add {vx} type vxlan id {network.vni} "
            f"local {local} dstport 4789; ip link set {vx} master {network.bridge}; ip link set {vx} up; "
            f"for peer in {' '.join(peers)}; do bridge fdb show dev {vx} | grep -q \"dst $peer \" || "
            f"bridge fdb append 00:00:00:00:00:00 dev {vx} dst $peer; done")


def _on_host(ctx: Context, host: str, script: str) -> None:
    """Run ``script`` on ``host``: here, or over its URI's ssh."""
    argv = ("sh", "-c", script) if ctx.is_this_machine(host) else \
        host_command(ctx.ledger.hosts.get(host).uri, script)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HostUnreachable(f"host {host}: {exc}") from None
    if done.returncode != 0:
        raise HypervisorError(f"host {host}: setting up VXLAN failed: "
                              f"{(done.stderr.strip().splitlines() or ['exit ' + str(done.returncode)])[-1]}")
