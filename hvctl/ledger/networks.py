"""The ledger's tenant networks and their IPAM: each network a tenant's subnet, and each VM on it one address, given in
the same transaction that records the VM and gone with the VM's row."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import TYPE_CHECKING, Any

from hvctl.errors import AlreadyExists, InvalidSpec, NotFound
from hvctl.ledger.core import Connection, Repository, Row

if TYPE_CHECKING:
    from hvctl.spec import VMSpec

# Where a network's subnet comes from when none is given: the first free /24 here.
DEFAULT_POOL = IPv4Network("10.96.0.0/12")
# QEMU's user-mode NIC, which every VM has for hvctl's SSH forward: a tenant subnet must not hide it.
USER_MODE_NET = IPv4Network("10.0.2.0/24")
# At least 8 addresses: the subnet's own, one kept for the network (a DHCP server or gateway), the broadcast, and 5.
MAX_PREFIX = 29
# VXLAN network identifiers hvctl gives, one per network, from here up.
FIRST_VNI = 10_000


@dataclass(frozen=True)
class NetworkRecord:
    name: str
    tenant: str
    subnet: IPv4Network
    bridge: str  # the Linux bridge the network has on each host, the same name everywhere
    vni: int  # its VXLAN network identifier, when it spans hosts
    created_at: float

    @property
    def vxlan(self) -> str:
        """The VXLAN device that joins its bridge to the other hosts' (a Linux interface name, at most 15 bytes)."""
        return "vx-" + self.bridge.removeprefix("hvn-")

    @property
    def libvirt_name(self) -> str:
        """The libvirt network hvctl defines for it on a host."""
        return f"hvctl-net-{self.name}"

    def usable(self) -> list[IPv4Address]:
        """The addresses VMs get, lowest first: every host address but the first, the network's own on each host
        (``hvctl.domain.devices.tenant_server``)."""
        return list(self.subnet.hosts())[1:]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "tenant": self.tenant, "subnet": str(self.subnet), "bridge": self.bridge,
                "vni": self.vni, "libvirt_network": self.libvirt_name, "capacity": len(self.usable()),
                "created_at": self.created_at}


def _record(row: Row) -> NetworkRecord:
    return NetworkRecord(row["name"], row["tenant"], IPv4Network(row["subnet"]), row["bridge"], row["vni"],
                         row["created_at"])


def check_attach(network: NetworkRecord, spec: VMSpec, used: int) -> None:
    """Refuse ``spec`` on ``network``, which has ``used`` addresses given: another tenant's, or full when the VM needs
    a new address."""
    if network.tenant != spec.tenant:
        raise InvalidSpec(f"network {network.name} is tenant {network.tenant}'s, and {spec.name} is tenant "
                          f"{spec.tenant}'s")
    if spec.network is not None and spec.network.address is None and used >= len(network.usable()):
        raise InvalidSpec(f"network {network.name} ({network.subnet}) has no free address: all "
                          f"{len(network.usable())} are in use", hint="a network with a larger subnet")


def bridge_name(network: str) -> str:
    """A Linux interface name (at most 15 bytes) for the network's bridge, derived from its name."""
    return "hvn-" + hashlib.sha256(network.encode()).hexdigest()[:10]


class Networks(Repository):
    def add(self, name: str, tenant: str, subnet: IPv4Network | None) -> NetworkRecord:
        """Record a tenant network. A subnet that overlaps another network's (or the user-mode NIC's) is refused;
        none given: the first free /24 of DEFAULT_POOL."""
        with self._store.transaction() as db:
            if db.execute("SELECT 1 FROM networks WHERE name = ?", (name,)).fetchone():
                raise AlreadyExists(f"network {name} already exists")
            taken = {r["name"]: IPv4Network(r["subnet"]) for r in db.execute("SELECT name, subnet FROM networks")}
            if subnet is None:
                subnet = next((s for s in DEFAULT_POOL.subnets(new_prefix=24)
                               if not any(s.overlaps(t) for t in taken.values())), None)
                if subnet is None:
                    raise InvalidSpec(f"every /24 of {DEFAULT_POOL} is taken", hint="give one with --subnet")
            if subnet.prefixlen > MAX_PREFIX:
                raise InvalidSpec(f"subnet {subnet} is too small: a tenant network needs at least a /{MAX_PREFIX}")
            if subnet.overlaps(USER_MODE_NET):
                raise InvalidSpec(f"subnet {subnet} overlaps {USER_MODE_NET}, the user-mode NIC every VM has")
            clash = next((f"network {n} ({s})" for n, s in sorted(taken.items()) if s.overlaps(subnet)), None)
            if clash:
                raise InvalidSpec(f"subnet {subnet} overlaps {clash}", hint="`hvctl network list` shows them all")
            bridge = bridge_name(name)
            vni = max(FIRST_VNI - 1, db.execute("SELECT COALESCE(MAX(vni), 0) FROM networks").fetchone()[0]) + 1
            db.execute("INSERT INTO networks (name, tenant, subnet, bridge, vni, created_at) VALUES (?,?,?,?,?,?)",
                       (name, tenant, str(subnet), bridge, vni, time.time()))
            self._store.event(db, None, None, "network.created", f"network {name} of tenant {tenant}: {subnet}")
        return self.get(name)

    def get(self, name: str) -> NetworkRecord:
        row = self._db.execute("SELECT * FROM networks WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no network named {name!r}", hint="`hvctl network list` shows them")
        return _record(row)

    def all(self, tenant: str | None = None) -> list[NetworkRecord]:
        rows = self._db.execute("SELECT * FROM networks ORDER BY name") if tenant is None else \
            self._db.execute("SELECT * FROM networks WHERE tenant = ? ORDER BY name", (tenant,))
        return [_record(r) for r in rows]

    def addresses(self, name: str) -> list[tuple[str, str, str]]:
        """(vm, address, host) for every VM on the network, by address."""
        rows = self._db.execute("SELECT a.vm, a.address, v.host FROM network_addresses a JOIN vms v ON v.name = a.vm "
                               "WHERE a.network = ?", (name,)).fetchall()
        return sorted(((r[0], r[1], r[2]) for r in rows), key=lambda r: IPv4Address(r[1]))

    def hosts(self, name: str) -> list[str]:
        """The hosts that run a VM on the network."""
        return sorted({host for _, _, host in self.addresses(name)})

    def set_underlay(self, host: str, address: IPv4Address) -> None:
        """The host's own address that VXLAN between hosts runs over (`hvctl host add --underlay`)."""
        with self._store.transaction() as db:
            db.execute("INSERT INTO underlays (host, address) VALUES (?,?) ON CONFLICT (host) DO UPDATE SET "
                       "address = excluded.address", (host, str(address)))

    def underlays(self) -> dict[str, IPv4Address]:
        return {r[0]: IPv4Address(r[1]) for r in self._db.execute("SELECT host, address FROM underlays")}

    def remove(self, name: str) -> None:
        """Forget a network no VM is on; one in use is refused with its VMs named."""
        with self._store.transaction() as db:
            if not db.execute("SELECT 1 FROM networks WHERE name = ?", (name,)).fetchone():
                raise NotFound(f"no network named {name!r}")
            users = [r[0] for r in db.execute("SELECT vm FROM network_addresses WHERE network = ? ORDER BY vm",
                                               (name,))]
            if users:
                raise InvalidSpec(f"network {name} is in use by {', '.join(users)}",
                                  hint="destroy those VMs, or migrate them off it, first")
            db.execute("DELETE FROM networks WHERE name = ?", (name,))
            self._store.event(db, None, None, "network.removed", f"network {name} removed")


# -- IPAM, inside the VM's own transaction (``VMs.reserve``, ``VMs.adopt``) ----------------------------------------

def assign_address(db: Connection, spec: VMSpec) -> VMSpec:
    """``spec`` with its address on its tenant network: the lowest free one when it has none (a create), or the
    one it has, checked (an adoption). Refused: an unknown network, another tenant's, or one with no room."""
    net = spec.network
    if net is None or net.tenant_network is None:
        return spec
    row = db.execute("SELECT * FROM networks WHERE name = ?", (net.tenant_network,)).fetchone()
    if row is None:
        raise NotFound(f"no network named {net.tenant_network!r}", hint="`hvctl network list` shows them")
    network = _record(row)
    used = {r[0] for r in db.execute("SELECT address FROM network_addresses WHERE network = ?", (network.name,))}
    check_attach(network, spec, len(used))
    if net.address is not None:
        if net.address.network != network.subnet or str(net.address.ip) in used:
            raise InvalidSpec(f"{net.address} is not a free address of network {network.name} ({network.subnet})")
        return spec
    free = next(a for a in network.usable() if str(a) not in used)
    address = IPv4Interface(f"{free}/{network.subnet.prefixlen}")
    return spec.model_copy(update={"network": net.model_copy(update={"address": address})})


def record_address(db: Connection, spec: VMSpec) -> None:
    net = spec.network
    if net is not None and net.tenant_network is not None and net.address is not None:
        db.execute("INSERT INTO network_addresses (network, vm, address) VALUES (?,?,?)",
                   (net.tenant_network, spec.name, str(net.address.ip)))
