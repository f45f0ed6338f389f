"""Tenant networks: the ledger's networks and IPAM (SQLite, real), and `create --net` end to end on libvirt's test
driver, which defines and "starts" the isolated network and the domain without touching the host's interfaces or
firewall (no guest boots; the GPU tests' stand-in writes the console's ready marker). The real packets are in
tests/functional/test_vm_networks.py, on a host in its own network namespace."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path

import libvirt
import pytest
from conftest import hvctl_cli
from test_gpu_create import Rig

from hvctl.context import Context
from hvctl.designer import nic_mac
from hvctl.errors import AlreadyExists, HvctlError, InvalidSpec, NotFound
from hvctl.host.networks import ensure_network, isolated_network_xml
from hvctl.ledger import Ledger
from hvctl.ops.create import create
from hvctl.ops.incarnation import BootOptions
from hvctl.ops.lifecycle import destroy
from hvctl.ops.networks import create_network, remove_network, show_network, tenant_attach
from hvctl.spec import VMSpec

POLICY = """
hosts: {reserve: {memory_mib: 0}}
tenants:
  acme: {quota: {vcpus: 16, memory_mib: 16384, disk_gib: 100, vms: 10}}
  globex: {quota: {vcpus: 16, memory_mib: 16384, disk_gib: 100, vms: 10}}
"""


def test_subnets_never_overlap_and_a_default_one_is_the_next_free_24(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    try:
        first = ledger.networks.add("blue", "acme", None)
        assert first.subnet == IPv4Network("10.96.0.0/24") and first.libvirt_name == "hvctl-net-blue"
        assert len(first.bridge) <= 15 and first.usable()[0].compressed == "10.96.0.2"  # .1 kept for the network
        ledger.networks.add("red", "globex", IPv4Network("10.96.1.0/25"))
        assert ledger.networks.add("green", "acme", None).subnet == IPv4Network("10.96.2.0/24")
        for subnet, problem in ((IPv4Network("10.96.1.64/26"), "overlaps network red (10.96.1.0/25)"),
                                (IPv4Network("10.96.0.0/16"), "overlaps network blue (10.96.0.0/24)"),
                                (IPv4Network("10.0.0.0/16"), "user-mode NIC"),
                                (IPv4Network("10.99.0.0/30"), "too small")):
            with pytest.raises(InvalidSpec, match=problem.replace("(", r"\(").replace(")", r"\)")):
                ledger.networks.add("bad", "acme", subnet)
        with pytest.raises(AlreadyExists):
            ledger.networks.add("blue", "acme", IPv4Network("10.99.0.0/24"))
        assert [n.name for n in ledger.networks.all()] == ["blue", "green", "red"]
        assert [n.name for n in ledger.networks.all("globex")] == ["red"]
    finally:
        ledger.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    (r.state / "policy.yaml").write_text(POLICY)
    env = r.ctx.gpu_env
    r.ctx.close()
    r.ctx = Context(state_dir=r.state, uri="test:///default", gpu_env=env)
    yield r
    for vm in r.ctx.ledger.vms.all():
        destroy(r.ctx, vm.name)
    for network in r.ctx.ledger.networks.all():
        remove_network(r.ctx, network.name)
    r.ctx.close()
    shutil.rmtree(r.state, ignore_errors=True)


def make(rig: Rig, name: str, tenant: str, net: str) -> None:
    with rig.stand_in_guest(name):
        create(rig.ctx, VMSpec.parse(name=name, image="stub", tenant=tenant, network=tenant_attach(rig.ctx, net)),
               options=BootOptions(timeout=10))


def libvirt_networks() -> dict[str, bool]:
    conn = libvirt.open("test:///default")
    try:
        return {n.name(): bool(n.isActive()) for n in conn.listAllNetworks(0)}
    finally:
        conn.close()


def dhcp_leases(network: str = "hvctl-net-blue") -> list[tuple[str, str, str]]:
    conn = libvirt.open("test:///default")
    try:
        ip = ET.fromstring(conn.networkLookupByName(network).XMLDesc(0)).find("ip")
    finally:
        conn.close()
    assert ip is not None
    return [(h.get("mac", ""), h.get("ip", ""), h.get("name", "")) for h in ip.iterfind("dhcp/host")]


def test_a_vm_on_a_tenant_network_gets_an_address_a_nic_on_its_isolated_network_and_gives_both_back(rig: Rig) -> None:
    create_network(rig.ctx, "blue", "acme", "10.96.7.0/29")
    make(rig, "a1", "acme", "blue")
    make(rig, "a2", "acme", "blue")
    spec = rig.ctx.ledger.vms.get("a1").spec
    assert spec.network is not None and spec.network.tenant_network == "blue"
    assert str(spec.network.address) == "10.96.7.2/29"
    assert str(rig.ctx.ledger.vms.get("a2").spec.network.address) == "10.96.7.3/29"  # type: ignore[union-attr]
    # The host got the network once: isolated (no <forward>), its own address the subnet's first, where DHCP
    # serves each VM's ledger address to its MAC and nothing else (no DNS, no range for unknown MACs).
    assert libvirt_networks()["hvctl-net-blue"] is True
    conn = libvirt.open("test:///default")
    try:
        net = ET.fromstring(conn.networkLookupByName("hvctl-net-blue").XMLDesc(0))
        domain = ET.fromstring(conn.lookupByName("a1").XMLDesc(0))
    finally:
        conn.close()
    assert net.find("forward") is None and net.find("dns").get("enable") == "no"  # type: ignore[union-attr]
    assert net.find("ip").attrib == {"address": "10.96.7.1", "prefix": "29"}  # type: ignore[union-attr]
    assert net.find("ip/dhcp/range") is None
    assert dhcp_leases() == [(nic_mac("a1"), "10.96.7.2", "a1"), (nic_mac("a2"), "10.96.7.3", "a2")]
    assert net.find("bridge").get("name") == rig.ctx.ledger.networks.get("blue").bridge  # type: ignore[union-attr]
    nics = [i for i in domain.iterfind("devices/interface") if i.get("type") == "network"]
    assert [n.find("source").get("network") for n in nics] == ["hvctl-net-blue"]  # type: ignore[union-attr]
    as_shown = hvctl_cli(rig.state, "test:///default", "show", "a1")
    assert as_shown.returncode == 0 and "tenant network blue, 10.96.7.2/29" in as_shown.stdout, as_shown.stderr
    shown = show_network(rig.ctx, "blue")
    assert shown.dhcp_server == "10.96.7.1"
    assert [(v.vm, v.address, v.host) for v in shown.vms] == [("a1", "10.96.7.2", "local"),
                                                              ("a2", "10.96.7.3", "local")]
    assert shown.free == 3 and shown.as_json()["vms"][0] == {"vm": "a1", "address": "10.96.7.2", "host": "local"}
    # In use: not removed. Its VMs gone: their addresses are free again, and rm takes it off the host.
    with pytest.raises(InvalidSpec, match="in use by a1, a2"):
        remove_network(rig.ctx, "blue")
    destroy(rig.ctx, "a1")
    assert dhcp_leases() == [(nic_mac("a2"), "10.96.7.3", "a2")]
    make(rig, "a3", "acme", "blue")
    assert str(rig.ctx.ledger.vms.get("a3").spec.network.address) == "10.96.7.2/29"  # type: ignore[union-attr]
    assert dhcp_leases() == [(nic_mac("a2"), "10.96.7.3", "a2"), (nic_mac("a3"), "10.96.7.2", "a3")]
    destroy(rig.ctx, "a2")
    destroy(rig.ctx, "a3")
    assert remove_network(rig.ctx, "blue").as_json() == {"network": "blue", "removed_from": ["local"]}
    assert "hvctl-net-blue" not in libvirt_networks()
    with pytest.raises(NotFound):
        rig.ctx.ledger.networks.get("blue")


def test_a_create_that_fails_after_its_address_was_given_withdraws_its_dhcp_lease(rig: Rig) -> None:
    create_network(rig.ctx, "blue", "acme", "10.96.7.0/29")
    make(rig, "a1", "acme", "blue")
    # No stand-in guest: the test driver's domain never says it is ready, so the create fails after the reservation.
    with pytest.raises(HvctlError, match="a2"):
        create(rig.ctx, VMSpec.parse(name="a2", image="stub", tenant="acme", network=tenant_attach(rig.ctx, "blue")),
               options=BootOptions(timeout=0.2))
    assert [v.name for v in rig.ctx.ledger.vms.all()] == ["a1"]
    assert dhcp_leases() == [(nic_mac("a1"), "10.96.7.2", "a1")]


def test_a_create_killed_after_its_lease_was_given_is_rolled_back_lease_and_all(rig: Rig) -> None:
    """hvctl died right after publishing a2's lease (a dead holder's intent row, as `kill -9` leaves it): `doctor
    --repair` rolls the create back, and the host's DHCP server no longer holds a2's address."""
    from test_intent import dead_holder

    from hvctl.ledger import VMPaths
    from hvctl.ops.doctor import repair
    from hvctl.ops.networks import publish_lease

    create_network(rig.ctx, "blue", "acme", "10.96.7.0/29")
    make(rig, "a1", "acme", "blue")
    vm = rig.ctx.paths.root / "vms" / "a2"
    spec = VMSpec.parse(name="a2", image="stub", tenant="acme", network=tenant_attach(rig.ctx, "blue"))
    record = rig.ctx.ledger.vms.reserve(spec, "local", VMPaths(vm / "b", vm / "o", vm / "s", vm / "c", vm / "a"))
    rig.ctx.ledger.operations.begin("a2", "create", dead_holder(), None, "local", {})
    assert publish_lease(rig.ctx, record.spec.model_copy(update={"host": "local"})) == ["local"]
    assert [ip for _, ip, _ in dhcp_leases()] == ["10.96.7.2", "10.96.7.3"]
    repaired = repair(rig.ctx).operations
    assert [r.outcome for r in repaired] == ["rolled back on local"]
    assert dhcp_leases() == [(nic_mac("a1"), "10.96.7.2", "a1")]
    assert [v.name for v in rig.ctx.ledger.vms.all()] == ["a1"]


def test_a_network_an_older_hvctl_defined_without_dhcp_gets_it_once_no_nic_is_on_it(rig: Rig) -> None:
    create_network(rig.ctx, "blue", "acme", "10.96.7.0/29")
    record = rig.ctx.ledger.networks.get("blue")
    old = ET.fromstring(isolated_network_xml(record.libvirt_name, record.bridge, "blue", "acme", "10.96.7.0/29"))
    for element in (old.find("ip"), old.find("dns")):
        assert element is not None
        old.remove(element)
    conn = libvirt.open("test:///default")
    try:
        conn.networkDefineXML(ET.tostring(old, encoding="unicode")).create()
    finally:
        conn.close()
    make(rig, "a1", "acme", "blue")
    assert dhcp_leases() == [(nic_mac("a1"), "10.96.7.2", "a1")]


class LookedUpTooEarly:
    """A connection whose first look-up of a network finds none: as a create sees it that looked before another
    create defined and started the network. The race itself, pinned to one order (libvirt's test driver)."""

    def __init__(self, conn: libvirt.virConnect) -> None:
        self.conn, self.missed = conn, False

    def networkLookupByName(self, name: str) -> libvirt.virNetwork:
        if not self.missed:
            self.missed = True
            name = "hvctl-no-such-network"  # libvirt's own "no network" error
        return self.conn.networkLookupByName(name)

    def __getattr__(self, attr: str) -> object:
        return getattr(self.conn, attr)


def test_a_network_another_create_set_up_meanwhile_is_taken_and_a_real_failure_is_not() -> None:
    conn = libvirt.open("test:///default")
    xml = isolated_network_xml("hvctl-net-race", "hvb-race", "race", "acme", "10.96.9.0/24")
    try:
        assert ensure_network(conn, xml)  # the create that won
        loser = LookedUpTooEarly(conn)
        assert not ensure_network(loser, xml)  # type: ignore[arg-type]
        assert loser.missed and conn.networkLookupByName("hvctl-net-race").isActive()
        bad = "<network><name>hvctl-net-bad</name><ip address='10.96.9.1' prefix='99'/></network>"
        with pytest.raises(HvctlError, match="defining libvirt network hvctl-net-bad"):
            ensure_network(conn, bad)
    finally:
        net = conn.networkLookupByName("hvctl-net-race")
        net.destroy()
        net.undefine()
        conn.close()


def test_a_full_network_and_another_tenants_network_are_refused_before_anything_is_written(rig: Rig) -> None:
    create_network(rig.ctx, "tiny", "acme", "10.96.9.0/29")
    for i in range(5):
        make(rig, f"t{i}", "acme", "tiny")
    before = sorted(p.name for p in (rig.state / "vms").iterdir())
    with pytest.raises(InvalidSpec, match=r"network tiny \(10.96.9.0/29\) has no free address: all 5 are in use"):
        make(rig, "t5", "acme", "tiny")
    with pytest.raises(InvalidSpec, match="network tiny is tenant acme's, and g1 is tenant globex's"):
        make(rig, "g1", "globex", "tiny")
    assert sorted(p.name for p in (rig.state / "vms").iterdir()) == before
    assert {v.name for v in rig.ctx.ledger.vms.all()} == {f"t{i}" for i in range(5)}
    assert len(rig.ctx.ledger.networks.addresses("tiny")) == 5


def test_the_cli_refuses_bad_network_requests_in_one_line_and_leaves_nothing(rig: Rig) -> None:
    state = rig.state
    assert hvctl_cli(state, "test:///default", "network", "create", "blue", "--tenant", "acme").returncode == 0
    for args, code, message in (
        (("network", "create", "red", "--tenant", "globex", "--subnet", "10.96.0.0/16"), 2,
         "subnet 10.96.0.0/16 overlaps network blue (10.96.0.0/24)"),
        (("network", "create", "red", "--tenant", "nobody"), 2, "unknown tenant 'nobody'"),
        (("network", "create", "red", "--tenant", "globex", "--subnet", "10.96.300.0/24"), 2, "--subnet"),
        (("network", "rm", "nope"), 3, "no network named 'nope'"),
        (("create", "g1", "--image", "stub", "--tenant", "globex", "--net", "blue"), 2,
         "network blue is tenant acme's, and g1 is tenant globex's"),
        (("create", "g1", "--image", "stub", "--tenant", "globex", "--net", "nope"), 3, "no network named 'nope'"),
        (("create", "g1", "--image", "stub", "--net", "blue", "--bridge", "br0"), 2, "give one of them"),
    ):
        result = hvctl_cli(state, "test:///default", *args)
        assert result.returncode == code, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert message in lines[-1] and "Traceback" not in result.stderr, (args, result.stderr)
    listed = json.loads(hvctl_cli(state, "test:///default", "network", "list", "--json").stdout)
    assert [(n["name"], n["vms"]) for n in listed] == [("blue", [])]
    assert rig.ctx.ledger.vms.all() == [] and not (state / "vms" / "g1").exists()


def test_a_network_that_would_span_a_host_without_an_underlay_is_refused_before_anything_is_made(rig: Rig) -> None:
    from hvctl.ops.networks import ensure_on_host

    create_network(rig.ctx, "blue", "acme", "10.96.8.0/24")
    make(rig, "a1", "acme", "blue")
    rig.ctx.ledger.hosts.ensure("h2", "test:///default")
    spec = VMSpec.parse(name="a2", image="stub", tenant="acme", host="h2", network=tenant_attach(rig.ctx, "blue"))
    with pytest.raises(InvalidSpec, match="network blue would span hosts h2, local, and host h2 has no underlay"):
        ensure_on_host(rig.ctx, spec, "h2")
    bad = hvctl_cli(rig.state, "test:///default", "host", "add", "h3", "test:///default", "--underlay", "10.1.2")
    assert bad.returncode == 2 and "--underlay 10.1.2: not an IPv4 address" in bad.stderr.strip().splitlines()[-1]
    assert "h3" not in {h.name for h in rig.ctx.ledger.hosts.all()}
