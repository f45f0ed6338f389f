"""hvctl network create/list/show/rm, and a VM's place on a tenant network: the ledger keeps the networks and their
addresses (``hvctl.ledger.networks``); each host that runs one of a network's VMs gets it as an isolated libvirt
network (``hvctl.host.networks``), made when the first VM there needs it and kept until `network rm`."""

from __future__ import annotations

from ipaddress import IPv4Network
from typing import Any

from hvctl.context import Context
from hvctl.errors import HostUnreachable, HvctlError, HypervisorError, InvalidSpec
from hvctl.ledger import NetworkRecord
from hvctl.names import check_name
from hvctl.ops import Say, quiet
from hvctl.spec import NetworkAttach, VMSpec


def create_network(ctx: Context, name: str, tenant: str, subnet: str | None) -> dict[str, Any]:
    check_name(name, "network name")
    ctx.policy.tenant(tenant)  # an unknown tenant is refused
    try:
        parsed = IPv4Network(subnet) if subnet is not None else None
    except ValueError as exc:
        raise InvalidSpec(f"--subnet {subnet}: {exc}", hint="an IPv4 network such as 10.96.1.0/24") from None
    return ctx.ledger.add_network(name, tenant, parsed).as_dict()


def show_network(ctx: Context, name: str) -> dict[str, Any]:
    network = ctx.ledger.get_network(name)
    vms = [{"vm": vm, "address": address, "host": host} for vm, address, host in ctx.ledger.network_addresses(name)]
    return network.as_dict() | {"vms": vms, "free": len(network.usable()) - len(vms)}


def list_networks(ctx: Context, tenant: str | None = None) -> list[dict[str, Any]]:
    return [show_network(ctx, n.name) for n in ctx.ledger.networks(tenant)]


def remove_network(ctx: Context, name: str, say: Say = quiet) -> dict[str, Any]:
    """Refused while a VM is on it. Otherwise its libvirt network goes from every registered host that has it; a host
    that cannot be asked stops the removal with nothing forgotten, so that a later `network rm` finishes it."""
    network = ctx.ledger.get_network(name)
    users = ctx.ledger.network_addresses(name)
    if users:
        raise InvalidSpec(f"network {name} is in use by {', '.join(vm for vm, _, _ in users)}",
                          hint="destroy those VMs first")
    removed_from = []
    for host in ctx.ledger.list_hosts():
        try:
            if ctx.host(host.name).remove_network(network.libvirt_name):
                say(f"removed libvirt network {network.libvirt_name} from host {host.name}")
                removed_from.append(host.name)
        except (HostUnreachable, HypervisorError) as exc:
            raise HvctlError(f"network {name}: host {host.name} could not be asked to remove it: {exc.message}",
                             hint="bring the host back (or `hvctl host rm` it) and run `hvctl network rm` again") \
                from None
    ctx.ledger.remove_network(name)
    return {"network": name, "removed_from": removed_from}


def tenant_attach(ctx: Context, name: str) -> NetworkAttach:
    """The NIC a VM gets on tenant network ``name``; its address is given when the VM is reserved."""
    network = ctx.ledger.get_network(name)
    return NetworkAttach(network=network.libvirt_name, tenant_network=network.name)


def check_tenant_network(ctx: Context, spec: VMSpec) -> NetworkRecord | None:
    """Before anything is written: the network exists, is the VM's tenant's and has a free address. The ledger checks
    all of it again when it gives the address, in the VM's own transaction."""
    net = spec.network
    if net is None or net.tenant_network is None:
        return None
    network = ctx.ledger.get_network(net.tenant_network)
    if network.tenant != spec.tenant:
        raise InvalidSpec(f"network {network.name} is tenant {network.tenant}'s, and {spec.name} is tenant "
                          f"{spec.tenant}'s")
    if net.address is None and len(ctx.ledger.network_addresses(network.name)) >= len(network.usable()):
        raise InvalidSpec(f"network {network.name} ({network.subnet}) has no free address: all "
                          f"{len(network.usable())} are in use", hint="a network with a larger subnet")
    return network


def ensure_on_host(ctx: Context, spec: VMSpec, host: str, say: Say = quiet) -> None:
    """The VM's tenant network, running on ``host`` (made there if it is the first of its VMs on that host)."""
    network = check_tenant_network(ctx, spec)
    if network is None:
        return
    if ctx.host(host).ensure_isolated_network(network.libvirt_name, network.bridge, network.name, network.tenant,
                                              str(network.subnet)):
        say(f"tenant network {network.name} set up on host {host} (bridge {network.bridge})")
