"""hvctl network create/list/show/rm: tenant networks."""

from __future__ import annotations

from typing import Annotated

import typer

from hvctl.cli.common import JsonOpt, RichReporter, Table, ctx, emit_json, network_app, out, safe


@network_app.command("create")
def network_create(
    name: str,
    tenant: Annotated[str, typer.Option(help="The tenant whose VMs it joins (only theirs may use it).")],
    subnet: Annotated[str | None, typer.Option(help="Its IPv4 subnet, e.g. 10.96.1.0/24 (at least a /29); default: "
                                                    "the first free /24 of 10.96.0.0/12.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """A tenant network: an isolated L2 segment for one tenant's VMs, with addresses from hvctl's IPAM. Each host
    gets it (an isolated libvirt network, no host address, no routing) when a VM there first needs it."""
    from hvctl.ops.networks import create_network

    made = create_network(ctx(), name, tenant, subnet)
    if as_json:
        emit_json(made.as_dict())
    else:
        out.print(f"network [bold]{name}[/] of tenant {tenant}: {made.subnet}, {len(made.usable())} addresses for "
                  f"VMs (`hvctl create … --net {name}`)")


@network_app.command("list")
def network_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's networks.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Tenant networks, with their subnets and how many of their addresses are in use."""
    from hvctl.ops.networks import list_networks

    listed = list_networks(ctx(), tenant)
    if as_json:
        emit_json([n.as_json() for n in listed])
        return
    table = Table("NETWORK", "TENANT", "SUBNET", "VMS", "FREE", "BRIDGE")
    for n in listed:
        net = n.network
        table.add_row(net.name, net.tenant, str(net.subnet), str(len(n.vms)), str(n.free), net.bridge)
    out.print(table)


@network_app.command("show")
def network_show(name: str, as_json: JsonOpt = False) -> None:
    """One tenant network: its subnet, bridge, and each VM on it with its address and host."""
    from hvctl.ops.networks import show_network

    shown = show_network(ctx(), name)
    if as_json:
        emit_json(shown.as_json())
        return
    net = shown.network
    out.print(f"network [bold]{name}[/]: tenant {net.tenant}, subnet {net.subnet}, bridge {net.bridge} "
              f"(libvirt network {net.libvirt_name}), {shown.free} of {len(net.usable())} addresses free; "
              f"each host's DHCP server at {shown.dhcp_server}")
    for member in shown.vms:
        out.print(f"  {safe(member.vm)}  {member.address}  on {safe(member.host)}")


@network_app.command("rm")
def network_rm(name: str, as_json: JsonOpt = False) -> None:
    """Remove a tenant network no VM is on, from the ledger and from every host that has it."""
    from hvctl.ops.networks import remove_network

    with RichReporter(f"network rm {name}") as reporter:
        done = remove_network(ctx(), name, reporter)
    if as_json:
        emit_json(done.as_json())
    else:
        out.print(f"network {name} removed" + (f" (from {', '.join(done.removed_from)})" if done.removed_from else ""))
