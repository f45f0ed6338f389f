"""Tenant networks with real packets: three Debian guests on a remote-style host (its libvirtd, bridges and firewall
live in the host's own network namespace, so nothing here touches this machine's interfaces or firewall). acme's a1
and a2 are on network blue, globex's g1 on network red. Each VM's address comes from hvctl's IPAM through its seed;
what reaches whom is asked inside the guests, through their agents."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import Controller, remote_fleet
from framework.controller import AroundController
from framework.devhost.remote import RemoteStyleHost, link_hosts

from hvctl.designer import nic_mac
from images.store import ImageStore

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1500)]

POLICY = """
hosts: {cpu_overcommit: 4.0, reserve: {memory_mib: 0}}
tenants:
  acme: {quota: {vcpus: 4, memory_mib: 2048, disk_gib: 10, vms: 4}}
  globex: {quota: {vcpus: 4, memory_mib: 2048, disk_gib: 10, vms: 4}}
"""
VMS = {"a1": ("acme", "blue"), "a2": ("acme", "blue"), "g1": ("globex", "red")}


@dataclass
class Tenants(AroundController):
    """The fleet's controller and hosts, what each VM's create printed, and the checks the tests ask inside the
    guests (``sh``: through their agents)."""

    controller: Controller
    hosts: dict[str, RemoteStyleHost]
    made: dict[str, subprocess.CompletedProcess[str]] = field(default_factory=dict)

    def address(self, vm: str) -> str:
        shown = json.loads(self.hvctl("show", vm, "--json").stdout)
        return str(shown["spec"]["network"]["address"]).split("/")[0]

    def tenant_nic(self, vm: str) -> str:
        """The guest's name for its NIC on the tenant network (found by the MAC hvctl gave it)."""
        found = self.sh(vm, f"for d in /sys/class/net/*; do [ \"$(cat $d/address)\" = {nic_mac(vm)} ] && "
                             "echo ${d##*/}; done; true")
        assert found.exit_code == 0 and found.stdout.strip(), found
        return found.stdout.strip()

    def pings(self, vm: str, address: str) -> bool:
        return self.sh(vm, f"busybox ping -c 3 -W 3 {address}").exit_code == 0

    def pings_from(self, vm: str, address: str, source: str) -> bool:
        return self.sh(vm, f"busybox ping -c 3 -W 3 -I {source} {address}").exit_code == 0


@pytest.fixture(scope="module")
def tenants(image_dir: Path) -> Iterator[Tenants]:
    ImageStore(image_dir).build("base")
    with remote_fleet(image_dir, {"far": 44}, POLICY) as fleet:
        t = Tenants(fleet.controller, fleet.hosts)
        assert t.hvctl("host", "add", "far", fleet.hosts["far"].uri).returncode == 0
        assert t.hvctl("network", "create", "blue", "--tenant", "acme", "--subnet", "10.96.10.0/24").returncode == 0
        assert t.hvctl("network", "create", "red", "--tenant", "globex", "--subnet", "10.96.20.0/24").returncode == 0
        def create(vm: str) -> subprocess.CompletedProcess[str]:
            tenant, net = VMS[vm]
            return t.hvctl("create", vm, "--host", "far", "--image", "base", "--memory", "384", "--disk", "2",
                           "--tenant", tenant, "--net", net, "--boot-timeout", "300", timeout=600)

        # a1 first, for the addresses the tests expect; then a2 and g1 side by side (g1 setting up red meanwhile).
        t.made["a1"] = create("a1")
        with ThreadPoolExecutor(2) as pool:
            t.made.update(zip(("a2", "g1"), pool.map(create, ("a2", "g1")), strict=True))
        yield t


def test_each_vm_has_its_ledger_address_on_its_tenant_nic(tenants: Tenants) -> None:
    for vm, result in tenants.made.items():
        assert result.returncode == 0, (vm, result.stderr[-2000:])
    assert [tenants.address(vm) for vm in VMS] == ["10.96.10.2", "10.96.10.3", "10.96.20.2"]
    for vm in VMS:
        nic = tenants.tenant_nic(vm)
        shown = tenants.sh(vm, f"ip -o -4 addr show dev {nic}")
        assert f"inet {tenants.address(vm)}/24" in shown.stdout, shown
    listed = json.loads(tenants.hvctl("network", "show", "blue", "--json").stdout)
    assert [(v["vm"], v["address"], v["host"]) for v in listed["vms"]] == [("a1", "10.96.10.2", "far"),
                                                                          ("a2", "10.96.10.3", "far")]


def test_vms_of_one_tenant_network_reach_each_other(tenants: Tenants) -> None:
    assert tenants.pings("a1", tenants.address("a2"))
    assert tenants.pings("a2", tenants.address("a1"))


def test_another_tenants_vm_cannot_reach_them_even_with_an_address_in_their_subnet(tenants: Tenants) -> None:
    a1 = tenants.address("a1")
    assert not tenants.pings("g1", a1)  # red has no route to blue's subnet
    # g1 takes an address in blue's subnet on its own tenant NIC: the segments are apart at layer 2, so still nothing.
    nic = tenants.tenant_nic("g1")
    assert tenants.sh("g1", f"ip addr add 10.96.10.77/24 dev {nic}").exit_code == 0
    assert not tenants.pings("g1", a1)
    assert tenants.sh("g1", f"ip addr del 10.96.10.77/24 dev {nic}").exit_code == 0
    # And a1, which reaches a2 above, cannot reach g1.
    assert not tenants.pings("a1", tenants.address("g1"))


def test_the_networks_dhcp_server_gives_each_vm_its_ledger_address_and_hvctls_image_takes_it(
        tenants: Tenants) -> None:
    """hvctl's images read their address from the seed; a stock image asks DHCP. Here a1 drops its address and
    runs the DHCP client its image uses when the seed gives none (busybox udhcpc with the event script guest-init
    writes): the host's server answers through the tenant filter with the ledger's address, and no router."""
    a1, nic = tenants.address("a1"), tenants.tenant_nic("a1")
    try:
        got = tenants.sh("a1", f"ip -4 addr flush dev {nic} && busybox udhcpc -i {nic} -n -q -t 10 -T 3 "
                                f"-s /run/hvctl/udhcpc.script 2>&1; ip -o -4 addr show dev {nic}; ip -4 route")
    finally:
        tenants.sh("a1", f"ip addr replace {a1}/24 dev {nic}")
    assert got.exit_code == 0, got
    assert f"lease of {a1} obtained from 10.96.10.1" in got.stdout, got.stdout
    assert f"inet {a1}/24" in got.stdout and "via 10.96.10.1" not in got.stdout, got.stdout
    assert tenants.pings("a1", tenants.address("a2"))


def test_a_vm_cannot_send_with_an_address_or_a_mac_that_is_not_its_own(tenants: Tenants) -> None:
    a2, nic = tenants.address("a2"), tenants.tenant_nic("a1")
    assert tenants.pings("a1", a2)  # its own address and MAC: through
    # A second address, free in blue but not a1's: its packets are dropped where they leave a1 (libvirt's nwfilter).
    assert tenants.sh("a1", f"ip addr add 10.96.10.99/24 dev {nic}").exit_code == 0
    try:
        assert not tenants.pings_from("a1", a2, "10.96.10.99")
    finally:
        tenants.sh("a1", f"ip addr del 10.96.10.99/24 dev {nic}")
    assert tenants.pings("a1", a2)
    # Another MAC on the same NIC: dropped too.
    assert tenants.sh("a1", f"ip link set {nic} address 52:54:00:ee:ee:ee").exit_code == 0
    try:
        assert not tenants.pings("a1", a2)
    finally:
        tenants.sh("a1", f"ip link set {nic} address {nic_mac('a1')}")
    assert tenants.pings("a1", a2)


def test_a_vm_cannot_reach_the_hosts_own_addresses_through_its_tenant_network(tenants: Tenants) -> None:
    """The host's one address on the segment (the subnet's first, where its DHCP server listens) takes nothing
    but DHCP from a VM, and a VM that routes the host's underlay address through its tenant NIC must still get
    nothing to it. A UDP listener in the host's network namespace prints every datagram it gets until the test's
    own "done", sent from inside the host after a1 has sent its five to each address."""
    host = tenants.hosts["far"]
    inside = ["nsenter", "-t", str(host.pids()["holder"]), "-n", sys.executable, "-c"]
    listener = subprocess.Popen(
        [*inside, "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind(('0.0.0.0', 5555))\n"
                  "print('listening', flush=True)\nwhile True:\n    data, peer = s.recvfrom(100)\n"
                  "    print(data.decode(), peer[0], flush=True)\n    if data == b'done':\n        break\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "listening"
        nic = tenants.tenant_nic("a1")
        sent = tenants.sh("a1", f"ip route add {host.address}/32 dev {nic} && for i in 1 2 3 4 5; do "
                                 f"for to in {host.address} 10.96.10.1; do "
                                 f"python3 -c \"import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
                                 f".sendto(b'from-a1', ('$to', 5555))\"; done; done; "
                                 f"ip neigh show {host.address}; ip route del {host.address}/32 dev {nic}")
        assert sent.exit_code == 0, sent
        assert not tenants.pings("a1", "10.96.10.1")
        subprocess.run([*inside, "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
                                 ".sendto(b'done', ('127.0.0.1', 5555))"], check=True)
        out, _ = listener.communicate(timeout=60)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()
    assert out.strip().splitlines() == ["done 127.0.0.1"], (out, sent.stdout)


def test_a_vm_defined_with_the_first_tenant_filter_gets_the_current_one_when_it_starts(tenants: Tenants) -> None:
    """A VM made before tenant networks served DHCP names hvctl-tenant-v1, which lets anything out to its own
    subnet, the host's address on the segment included. a2 is stopped and redefined that way (as such a VM was
    defined); with it, a2 reaches the host there. hvctl start gives it the current filter, and the host is out of
    reach again while a1 still is not."""
    ctx = tenants.ctx
    assert tenants.hvctl("stop", "a2").returncode == 0
    guest = ctx.host("far").guest("a2")
    today = guest.xml(inactive=True)
    assert "hvctl-tenant-v2" in today
    guest.host.define(today.replace("hvctl-tenant-v2", "hvctl-tenant-v1"))
    guest.start()  # as hvctl did before it knew better
    token = ctx.ledger.vms.get("a2").agent_token
    assert token
    ctx.agent("far", "a2", token, timeout=120).wait_ready(600)  # a hang guard: it returns once the guest is up
    assert tenants.pings("a2", "10.96.10.1")  # the hole: the host answers on its address in blue
    guest.destroy()
    started = tenants.hvctl("start", "a2")
    assert started.returncode == 0, started.stderr
    assert "gets the current filter" in started.stderr
    assert "hvctl-tenant-v2" in ctx.host("far").guest("a2").xml(inactive=True)
    assert not tenants.pings("a2", "10.96.10.1")
    assert tenants.pings("a2", tenants.address("a1"))


def test_rm_of_a_network_in_use_is_refused_and_after_its_vms_it_leaves_the_host(tenants: Tenants) -> None:
    refused = tenants.hvctl("network", "rm", "red")
    assert refused.returncode == 2 and "in use by g1" in refused.stderr.strip().splitlines()[-1]
    assert tenants.hvctl("destroy", "g1").returncode == 0
    removed = tenants.hvctl("network", "rm", "red", "--json")
    assert removed.returncode == 0 and json.loads(removed.stdout)["removed_from"] == ["far"], removed.stderr
    # The host's own view (inside its network namespace): blue's bridge is there, red's is gone.
    bridge = tenants.ctx.ledger.networks.get("blue").bridge
    seen = links(tenants.hosts["far"])
    assert bridge in seen and "hvn-" in seen
    assert sum(1 for line in seen.splitlines() if ": hvn-" in line and "master" not in line) == 1


@pytest.fixture(scope="module")
def two_hosts(image_dir: Path) -> Iterator[tuple[Tenants, RemoteStyleHost, RemoteStyleHost]]:
    """Two remote-style hosts wired to each other (198.19.7.0/30, their underlays), each reached from here over its
    own veth: blue's a3 runs on near (until the test moves it to far), a4 and globex's g2 on far."""
    ImageStore(image_dir).build("base")
    with remote_fleet(image_dir, {"near": 45, "far": 46}, POLICY) as fleet:
        near, far = fleet.hosts["near"], fleet.hosts["far"]
        near_underlay, far_underlay = link_hosts(near, far, 7)
        t = Tenants(fleet.controller, fleet.hosts)
        assert t.hvctl("host", "add", "near", near.uri, "--underlay", near_underlay).returncode == 0
        added = t.hvctl("host", "add", "far", far.uri, "--underlay", far_underlay, "--json")
        assert added.returncode == 0 and json.loads(added.stdout)["underlay"] == far_underlay, added.stderr
        assert t.hvctl("network", "create", "blue", "--tenant", "acme", "--subnet", "10.96.30.0/24").returncode == 0
        assert t.hvctl("network", "create", "red", "--tenant", "globex", "--subnet", "10.96.40.0/24").returncode == 0
        for vm, tenant, net, host in (("a3", "acme", "blue", "near"), ("a4", "acme", "blue", "far"),
                                      ("g2", "globex", "red", "far")):
            t.made[vm] = t.hvctl("create", vm, "--host", host, "--image", "base", "--memory", "384", "--disk", "2",
                                 "--tenant", tenant, "--net", net, "--boot-timeout", "300", timeout=600)
        yield t, near, far


def test_a_tenant_network_spans_two_hosts_over_vxlan_and_another_tenant_stays_out(
        two_hosts: tuple[Tenants, RemoteStyleHost, RemoteStyleHost]) -> None:
    t, near, far = two_hosts
    for vm, result in t.made.items():
        assert result.returncode == 0, (vm, result.stderr[-2000:])
    assert "tenant network blue spans hosts far, near (VXLAN" in t.made["a4"].stderr
    a3, a4 = t.address("a3"), t.address("a4")
    assert t.pings("a4", a3) and t.pings("a3", a4)  # across the two hosts
    # The guests' NICs got the tenant MTU, which leaves room for VXLAN's header on the underlay.
    assert "mtu 1450" in t.sh("a3", f"ip link show dev {t.tenant_nic('a3')}").stdout
    # Each host has the network's VXLAN device, and its DHCP server holds every lease of the network, so a
    # DISCOVER that crosses VXLAN gets the same answer from either: a3's client gets a3's address.
    vxlan = t.ctx.ledger.networks.get("blue").vxlan
    assert all(vxlan in links(host) for host in (near, far))
    for host in ("near", "far"):
        served = {(h.vm, h.ip) for h in t.ctx.host(host).dhcp_hosts("hvctl-net-blue") or []}
        assert served == {("a3", a3), ("a4", a4)}, (host, served)
    nic = t.tenant_nic("a3")
    try:
        got = t.sh("a3", f"ip -4 addr flush dev {nic} && busybox udhcpc -i {nic} -n -q -t 10 -T 3 "
                          f"-s /run/hvctl/udhcpc.script 2>&1; ip -o -4 addr show dev {nic}")
    finally:
        t.sh("a3", f"ip addr replace {a3}/24 dev {nic}")
    assert f"lease of {a3} obtained from 10.96.30.1" in got.stdout and f"inet {a3}/24" in got.stdout, got.stdout
    # near loses its VXLAN device, as a reboot loses it (libvirt restarts the network, not the device): a3 is cut
    # off; `doctor` names the gap and `doctor --repair` sets it up again.
    subprocess.run(["nsenter", "-t", str(near.pids()["holder"]), "-n", "ip", "link", "del", vxlan], check=True)
    assert not t.pings("a3", a4)
    checks = {c["name"]: c for c in json.loads(t.hvctl("doctor", "--json").stdout)}
    assert not checks["tenant networks"]["ok"] and "host near" in checks["tenant networks"]["detail"], checks
    repaired = json.loads(t.hvctl("doctor", "--repair", "--json").stdout)
    assert repaired["repaired"]["vxlan"] == ["blue on near"], repaired
    assert t.pings("a3", a4) and vxlan in links(near)
    # a3 moves live to far, its disk copied (the hosts share no storage) over the hosts' own link: QEMU on near
    # reaches far's underlay address, which this machine does not route to. It keeps its address and MAC, and a4
    # reaches it on the same host now; its uptime shows it never stopped.
    before = float(t.sh("a3", "cut -d' ' -f1 /proc/uptime").stdout)
    moved = t.hvctl("migrate", "a3", "--to", "far", "--copy-storage", "--json", timeout=900)
    assert moved.returncode == 0, moved.stderr
    assert json.loads(t.hvctl("show", "a3", "--json").stdout)["host"] == "far" and t.address("a3") == a3
    assert float(t.sh("a3", "cut -d' ' -f1 /proc/uptime").stdout) > before
    assert f"inet {a3}/24" in t.sh("a3", f"ip -o -4 addr show dev {t.tenant_nic('a3')}").stdout
    assert t.pings("a4", a3) and t.pings("a3", a4)
    # near runs no VM of blue now, so it left blue's VXLAN, and far, the only host left, needs none either.
    assert not any(vxlan in links(host) for host in (near, far))
    # globex's g2, on far beside a4, with an address in blue's subnet: nothing reaches a3 or a4.
    nic = t.tenant_nic("g2")
    assert t.sh("g2", f"ip addr add 10.96.30.77/24 dev {nic}").exit_code == 0
    assert not t.pings("g2", a3) and not t.pings("g2", a4)
    # network rm after its VMs: its libvirt network goes from both hosts.
    for vm in ("a3", "a4"):
        assert t.hvctl("destroy", vm).returncode == 0
    removed = t.hvctl("network", "rm", "blue", "--json")
    assert removed.returncode == 0, removed.stderr
    assert sorted(json.loads(removed.stdout)["removed_from"]) == ["far", "near"]
    assert not any(vxlan in links(host) for host in (near, far))


def links(host: RemoteStyleHost) -> str:
    """The network interfaces the host has, as it sees them (inside its network namespace)."""
    return subprocess.run(["nsenter", "-t", str(host.pids()["holder"]), "-n", "ip", "-o", "link"],
                          capture_output=True, text=True, check=True).stdout
