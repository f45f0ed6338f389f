"""Policy files, accounting, admission under real concurrency, reservations, placement refusals and `hvctl plan`,
on real SQLite ledgers (no hypervisor needed: hosts' capacity is recorded as `hvctl host add` would)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import short_tempdir

from hvctl.accounting import Usage, host_footprint, tenant_charge
from hvctl.designer import qemu_overhead_mib
from hvctl.ledger import Admission, Hardware, Ledger, NumaCell, QuotaExceeded, VMPaths
from hvctl.placement import NoValidHost, choose_host, host_limit
from hvctl.policy import SHIPPED, PolicyError, load_policy, parse_policy
from hvctl.spec import VMSpec

POLICY = """\
placement: {mode: pack}
hosts: {cpu_overcommit: 2.0, mem_overcommit: 1.0, reserve: {memory_mib: 1024}}
flavors:
  small: {vcpus: 1, memory_mib: 512, disk_gib: 2}
tenants:
  acme: {weight: 2, quota: {vcpus: 8, memory_mib: 2048, disk_gib: 100, gpus: 0, vms: 6}}
  globex: {weight: 1, quota: {vcpus: 4, memory_mib: 4096, disk_gib: 100, gpus: 0, vms: 10}}
"""


@pytest.fixture
def state() -> Iterator[Path]:
    path = short_tempdir("hvp-")
    (path / "policy.yaml").write_text(POLICY)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def add_host(ledger: Ledger, name: str, cpus: int, memory_mib: int) -> None:
    ledger.hosts.ensure(name, f"test:///{name}")
    ledger.hosts.record_facts(name, "qemu", cpus, memory_mib)
    ledger.hosts.record_hardware(name, Hardware(numa_cells=(NumaCell(cpus, memory_mib),)))


def admit(ledger: Ledger, spec: VMSpec, host: str, tmp: Path) -> None:
    policy = parse_policy(POLICY, "policy.yaml")
    admission = Admission(policy.tenant(spec.tenant).quota.model_dump(),
                          host_limit(policy, ledger.hosts.get(host), 0))
    vm = tmp / spec.name
    ledger.vms.reserve(spec, host, VMPaths(tmp / "base", vm / "disk", vm / "seed", vm / "console", vm / "agent"),
                      admission=admission,
                      port_range=(23000, 23999))


def test_shipped_policies_are_valid() -> None:
    assert load_policy(None).tenants["default"].quota.vms > 0
    two = load_policy(SHIPPED / "two-tenants.yaml")
    assert set(two.tenants) == {"acme", "globex"} and two.tenants["acme"].weight == 2


def test_policy_errors_name_file_line_and_field() -> None:
    bad = POLICY.replace("vcpus: 8", "vcpus: -8").replace("small: {vcpus: 1", "small: {vcpus: 1, colour: red")
    with pytest.raises(PolicyError) as exc:
        parse_policy(bad, "site.yaml")
    assert "site.yaml:4: flavors.small.colour 'red': Extra inputs are not permitted" in exc.value.problems
    assert "site.yaml:6: tenants.acme.quota.vcpus -8: Input should be greater than or equal to 0" in exc.value.problems
    with pytest.raises(PolicyError, match=r"site.yaml:3: not valid YAML"):
        parse_policy("tenants:\n  - [unclosed\n", "site.yaml")
    with pytest.raises(PolicyError, match="tenants: Field required"):
        parse_policy("flavors: {}\n", "site.yaml")


def test_policy_check_cli(state: Path) -> None:
    bad = state / "bad.yaml"
    bad.write_text(POLICY.replace("weight: 2", "weight: -2"))
    env = os.environ | {"HVCTL_STATE_DIR": str(state), "NO_COLOR": "1", "COLUMNS": "200"}
    result = subprocess.run([sys.executable, "-m", "hvctl.cli", "policy", "check", str(bad)], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 2
    assert f"{bad}:6: tenants.acme.weight -2: Input should be greater than 0" in result.stderr
    ok = subprocess.run([sys.executable, "-m", "hvctl.cli", "policy", "check", "--json"], capture_output=True,
                        text=True, env=env)
    assert ok.returncode == 0 and json.loads(ok.stdout)["tenants"] == ["acme", "globex"]


def test_unknown_tenant_or_flavor_is_refused_and_writes_nothing(state: Path) -> None:
    env = os.environ | {"HVCTL_STATE_DIR": str(state), "HVCTL_CONNECT": "qemu:///system?socket=/nonexistent",
                        "NO_COLOR": "1"}
    for args, needle in ((["--tenant", "initech"], "unknown tenant 'initech'"),
                         (["--flavor", "huge"], "unknown flavor 'huge'; the policy defines: small")):
        result = subprocess.run([sys.executable, "-m", "hvctl.cli", "create", "x", *args], capture_output=True,
                                text=True, env=env)
        assert result.returncode == 2 and needle in result.stderr
    assert sorted(p.name for p in state.iterdir()) == ["policy.yaml"]


def test_footprint_counts_qemu_overhead_against_the_host_only() -> None:
    spec = VMSpec(name="a", tenant="acme", vcpus=2, memory_mib=1024, disk_gib=3)
    assert tenant_charge(spec) == Usage(2, 1024, 3, 0, 1)
    assert host_footprint(spec) == Usage(2, 1024 + qemu_overhead_mib(spec), 3, 0, 1)


def test_a_vm_sized_exactly_to_the_quota_is_admitted_and_the_next_is_refused(tmp_path: Path,
                                                                              ledger_location: str) -> None:
    ledger = Ledger(ledger_location)
    add_host(ledger, "h1", cpus=8, memory_mib=16384)
    admit(ledger, VMSpec(name="exact", tenant="acme", memory_mib=2048), "h1", tmp_path)
    with pytest.raises(QuotaExceeded) as exc:
        admit(ledger, VMSpec(name="more", tenant="acme", memory_mib=64), "h1", tmp_path)
    assert exc.value.message == "tenant acme: memory 64 MiB requested, 2048 of 2048 MiB in use"
    assert [v.name for v in ledger.vms.all()] == ["exact"]
    assert ledger.events.recent("more")[-1].kind == "admission.refused"


def test_disk_is_admitted_against_the_hosts_storage(tmp_path: Path, ledger_location: str) -> None:
    """One tenant cannot fill a host's disk: virtual disk sizes count against the storage VM disks live on."""
    ledger = Ledger(ledger_location)
    add_host(ledger, "h1", cpus=8, memory_mib=16384)
    ledger.hosts.record_disk("h1", 10)
    admit(ledger, VMSpec(name="a", tenant="acme", disk_gib=6), "h1", tmp_path)
    with pytest.raises(QuotaExceeded, match=r"^host h1: disk 6 GiB requested, 6 of 10 GiB in use$"):
        admit(ledger, VMSpec(name="b", tenant="globex", disk_gib=6), "h1", tmp_path)
    assert [v.name for v in ledger.vms.all()] == ["a"]
    policy = parse_policy(POLICY.replace("cpu_overcommit: 2.0,", "cpu_overcommit: 2.0, disk_overcommit: 2.0,")
                          .replace("reserve: {memory_mib: 1024}", "reserve: {memory_mib: 1024, disk_gib: 2}"),
                          "policy.yaml")
    assert host_limit(policy, ledger.hosts.get("h1"), 0)["disk_gib"] == 16.0
    with pytest.raises(NoValidHost, match="disk"):
        choose_host(ledger, parse_policy(POLICY, "policy.yaml"), VMSpec(name="c", tenant="globex", disk_gib=6))


def test_a_hosts_storage_is_measured_once_with_its_other_facts() -> None:
    from hvctl.context import Context

    state = short_tempdir("hvd-")
    try:
        ctx = Context(state_dir=state, uri="test:///default")
        ctx.ledger.hosts.record_facts("local", "qemu", 8, 16384)
        assert ctx.ledger.hosts.get("local").disk_gib is None
        ctx.capabilities("local")
        st = os.statvfs(state / "vms")
        assert ctx.ledger.hosts.get("local").disk_gib == st.f_blocks * st.f_frsize // 2**30
        ctx.close()
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_host_capacity_includes_overhead_and_reserve(tmp_path: Path, ledger_location: str) -> None:
    ledger = Ledger(ledger_location)
    add_host(ledger, "small-host", cpus=2, memory_mib=3072)
    # 3072 MiB - 1024 reserved = 2048 allocatable; a 2000 MiB guest needs 2000 + 256 + 40 with QEMU's overhead.
    with pytest.raises(QuotaExceeded, match=r"host small-host: memory 2296 MiB requested, 0 of 2048 MiB in use"):
        admit(ledger, VMSpec(name="big", tenant="globex", memory_mib=2000), "small-host", tmp_path)
    assert ledger.vms.all() == []


def test_twenty_concurrent_creates_never_overshoot_quota_or_host(tmp_path: Path, ledger_location: str) -> None:
    """Twenty threads, each with its own connection to the ledger (SQLite, then PostgreSQL), race to admit 512 MiB
    VMs for acme (quota 2048 MiB, 6 VMs) and globex onto one host; admission and insert share a transaction, so
    exactly the quota gets in."""
    Ledger(ledger_location)
    add_host(Ledger(ledger_location), "h1", cpus=4, memory_mib=8192)
    admitted: list[str] = []
    refused: list[str] = []
    barrier = threading.Barrier(20)

    def worker(i: int) -> None:
        ledger = Ledger(ledger_location)
        tenant = "acme" if i % 2 == 0 else "globex"
        barrier.wait()
        try:
            admit(ledger, VMSpec(name=f"vm-{i}", tenant=tenant, memory_mib=512), "h1", tmp_path)
            admitted.append(tenant)
        except QuotaExceeded as exc:
            refused.append(exc.message)
        finally:
            ledger.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ledger = Ledger(ledger_location)
    assert admitted.count("acme") == 4  # 4 x 512 MiB = the 2048 MiB quota
    acme = ledger.tenant_usage("acme")
    assert acme.memory_mib <= 2048 and acme.vms == 4
    # globex is bounded by the host: 8 vCPUs allocatable (4 x 2.0), of which acme holds 4.
    assert ledger.host_usage("h1").vcpus <= 8 and admitted.count("globex") == 4
    assert len(admitted) + len(refused) == 20
    assert all("in use" in r for r in refused)


def test_migration_reservations_hold_the_host_not_the_tenant(tmp_path: Path, ledger_location: str) -> None:
    ledger = Ledger(ledger_location)
    add_host(ledger, "h1", cpus=8, memory_mib=16384)
    add_host(ledger, "h2", cpus=8, memory_mib=4096)
    admit(ledger, VMSpec(name="full", tenant="acme", memory_mib=2048), "h1", tmp_path)
    spec = ledger.vms.get("full").spec
    policy = parse_policy(POLICY, "policy.yaml")
    # The tenant is at its full quota, yet its VM's migration target can be reserved (kubevirt#9238).
    rid = ledger.reservations.hold("h2", "acme", host_footprint(spec), "migration", vm="full",
                         host_limit=host_limit(policy, ledger.hosts.get("h2"), 0))
    assert ledger.host_usage("h2").memory_mib == host_footprint(spec).memory_mib
    assert ledger.tenant_usage("acme").memory_mib == 2048
    with pytest.raises(QuotaExceeded, match="host h2: memory"):
        ledger.reservations.hold("h2", "acme", host_footprint(spec), "migration", vm="full",
                       host_limit=host_limit(policy, ledger.hosts.get("h2"), 0))
    ledger.reservations.release(rid)
    assert ledger.host_usage("h2").memory_mib == 0 and ledger.reservations.all() == []


def test_placement_refuses_a_request_bigger_than_any_host(tmp_path: Path, ledger_location: str) -> None:
    ledger = Ledger(ledger_location)
    add_host(ledger, "h1", cpus=4, memory_mib=8192)
    add_host(ledger, "h2", cpus=8, memory_mib=4096)
    policy = parse_policy(POLICY, "policy.yaml")
    with pytest.raises(NoValidHost, match="no host can take giant"):
        choose_host(ledger, policy, VMSpec(name="giant", tenant="globex", memory_mib=10000))
    # Pack: the request goes to the host where it fits.
    assert choose_host(ledger, policy, VMSpec(name="fits", tenant="globex", memory_mib=5000)) == "h1"
    assert ledger.vms.all() == []


def test_anti_affinity_group_members_never_share_a_host(tmp_path: Path, ledger_location: str) -> None:
    ledger = Ledger(ledger_location)
    add_host(ledger, "h1", cpus=8, memory_mib=16384)
    add_host(ledger, "h2", cpus=8, memory_mib=16384)
    policy = parse_policy(POLICY, "policy.yaml")
    first = VMSpec(name="web-1", tenant="globex", anti_affinity="web")
    chosen = choose_host(ledger, policy, first)
    admit(ledger, first.model_copy(update={"host": chosen}), chosen, tmp_path)
    second = choose_host(ledger, policy, VMSpec(name="web-2", tenant="globex", anti_affinity="web"))
    assert second != chosen  # pack alone would have put it next to web-1
    assert choose_host(ledger, policy, VMSpec(name="db-1", tenant="globex")) == chosen
    admit(ledger, VMSpec(name="web-2", tenant="globex", anti_affinity="web", host=second), second, tmp_path)
    with pytest.raises(NoValidHost, match="web-3"):
        choose_host(ledger, policy, VMSpec(name="web-3", tenant="globex", anti_affinity="web"))


def test_host_add_with_an_unreachable_uri_writes_nothing(state: Path) -> None:
    env = os.environ | {"HVCTL_STATE_DIR": str(state), "NO_COLOR": "1"}
    result = subprocess.run([sys.executable, "-m", "hvctl.cli", "host", "add", "far", "qemu+tcp://127.0.0.1:1/system"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 5 and "cannot reach libvirt at qemu+tcp://127.0.0.1:1/system" in result.stderr
    assert "far" not in {h.name for h in Ledger(state / "ledger.sqlite3").hosts.all()}


def test_plan_orders_tenants_by_weighted_drf_and_names_refusals(state: Path) -> None:
    from hvctl.context import Context
    from hvctl.ops.plan import load_requests, plan

    ctx = Context(state_dir=state, uri="test:///default")
    add_host(ctx.ledger, "h1", cpus=3, memory_mib=16384)
    requests = state / "requests.yaml"
    requests.write_text("requests:\n  - {name: a, tenant: acme, flavor: small, count: 6}\n"
                        "  - {name: g, tenant: globex, flavor: small, count: 6}\n")
    result = plan(ctx, load_requests(ctx, requests)).as_json()
    decided = {r["name"]: r for r in result["requests"]}
    placed = [r for r in result["requests"] if r["host"]]
    # acme's quota (2048 MiB) stops it at 4 VMs; the host (3 CPUs x 2.0 overcommit = 6 vCPUs) takes 6 in all.
    assert sum(1 for r in placed if r["tenant"] == "acme") == 4
    assert decided["a-5"]["reason"] == "tenant acme: memory 512 MiB requested, 2048 of 2048 MiB in use"
    assert len(placed) == 6 and all(r["host"] == "h1" for r in placed)
    assert "vcpus" in decided["g-3"]["reason"] and "host h1" in decided["g-3"]["reason"]
    # Weighted DRF: with weight 2, acme is picked twice for each globex pick while both have demand.
    first_three = sorted(result["requests"], key=lambda r: r["order"])[:3]
    assert [r["tenant"] for r in first_three].count("acme") == 2
    assert ctx.ledger.vms.all() == []  # a dry run writes nothing
    ctx.close()
    # The command prints the same plan: as JSON, and as tables.
    env = os.environ | {"HVCTL_STATE_DIR": str(state), "HVCTL_CONNECT": "test:///h1", "NO_COLOR": "1",
                        "COLUMNS": "200"}
    cli = [sys.executable, "-m", "hvctl.cli", "plan", str(requests)]
    as_json = subprocess.run([*cli, "--json"], capture_output=True, text=True, env=env, timeout=60)
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["requests"] == result["requests"]
    table = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=60).stdout
    assert "tenant acme: memory 512 MiB requested" in table and "h1" in table and "acme" in table


BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 10) + "]\n" for i in range(8))


@pytest.mark.parametrize("verb", [["plan"], ["policy", "check"]])
def test_a_yaml_alias_bomb_is_refused_in_one_line(state: Path, verb: list[str]) -> None:
    """~600 bytes that expand to 10**9 list items if anything walks them: refused before anything does."""
    assert len(BOMB) < 700
    bomb = state / "bomb.yaml"
    bomb.write_text(BOMB)
    env = os.environ | {"HVCTL_STATE_DIR": str(state), "HVCTL_CONNECT": "qemu:///system?socket=/nonexistent",
                        "NO_COLOR": "1", "COLUMNS": "200"}
    result = subprocess.run([sys.executable, "-m", "hvctl.cli", *verb, str(bomb)], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 2 and "aliases (*name) are not allowed" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_yaml_files_are_capped_in_size(state: Path) -> None:
    from hvctl import yamlfile

    huge = state / "huge.yaml"
    huge.write_text("# " + "x" * yamlfile.MAX_YAML_BYTES + "\nflavors: {}\n")
    with pytest.raises(PolicyError, match="over 1048576 bytes"):
        load_policy(huge)


def test_create_and_plan_size_requests_the_same_way() -> None:
    from hvctl.policy import load_policy

    policy = load_policy(Path(__file__).resolve().parents[2] / "policies" / "default.yaml")
    assert policy.sizes() == {"vcpus": 1, "memory_mib": 256, "disk_gib": 1, "gpus": {"count": 0}}
    assert policy.sizes("gpu-1", memory_mib=4096) == {"vcpus": 8, "memory_mib": 4096, "disk_gib": 100,
                                                      "gpus": {"count": 1}}
    assert policy.sizes("small", gpus=0, vcpus=2) == {"vcpus": 2, "memory_mib": 512, "disk_gib": 2,
                                                      "gpus": {"count": 0}}
