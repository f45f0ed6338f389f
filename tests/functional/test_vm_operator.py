"""The operator's lifecycle verbs on a real Debian guest under TCG: exec through the agent, pause and resume,
restart, wait, and create --no-wait. Each check is about what the guest itself did (its boot id, a ticker it
ran, its hostname), not only what libvirt reports."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import HVCTL, Controller, short_tempdir
from framework.devhost import PrivateLibvirtd

from hvctl.host import DomainState
from images.store import ImageStore

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def env(libvirtd: PrivateLibvirtd, image_dir: Path) -> Iterator[Controller]:
    ImageStore(image_dir).build("base")
    # A disk quota that one memory snapshot of op1 fits in and a second does not.
    controller = Controller.open(short_tempdir("hvo-"), libvirtd.uri, image_dir, policy=(
        "tenants:\n  default: {quota: {vcpus: 8, memory_mib: 8192, disk_gib: 6, vms: 10}}\n"))
    yield controller
    controller.close()


def hvctl(env: Controller, *args: str, timeout: float = 240,
          stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return env.hvctl(*args, timeout=timeout, stdin=stdin)


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stderr + result.stdout
    return result


def guest_out(env: Controller, vm: str, *argv: str) -> str:
    return ok(hvctl(env, "exec", vm, "--agent", "--", *argv)).stdout.strip()


def listed(env: Controller, vm: str) -> dict[str, object]:
    (view,) = [v for v in json.loads(ok(hvctl(env, "list", "--json")).stdout)["vms"] if v["name"] == vm]
    return view


@pytest.fixture(scope="module")
def vm(env: Controller) -> str:
    ok(hvctl(env, "create", "op1", "--image", "base", "--memory", "512", "--disk", "2", "--boot-timeout", "180"))
    return "op1"


def test_exec_through_the_agent_needs_no_network_and_keeps_exit_codes_input_and_timeouts(
        env: Controller, vm: str) -> None:
    both = hvctl(env, "exec", vm, "--agent", "--", "sh", "-c", "hostname; echo oops >&2; exit 3")
    assert both.returncode == 3 and both.stdout == "op1\n" and both.stderr == "oops\n"
    fed = hvctl(env, "exec", vm, "--agent", "--input", "-", "--", "sh", "-c", "tr a-z A-Z", stdin="from the host\n")
    assert fed.returncode == 0 and fed.stdout == "FROM THE HOST\n"
    killed = hvctl(env, "exec", vm, "--agent", "--timeout", "1", "--", "sleep", "60")
    assert killed.returncode == 124 and "the agent killed it" in killed.stderr
    # The agent runs as root, so SSH-only options are refused rather than ignored.
    assert hvctl(env, "exec", vm, "--agent", "--user", "nobody", "--", "id").returncode == 2
    missing = hvctl(env, "exec", vm, "--agent", "--", "/no/such/program")
    assert missing.returncode == 10 and "cannot run '/no/such/program'" in missing.stderr


def guest_clock(env: Controller, vm: str) -> tuple[float, float, float]:
    """The guest's wall clock, with the host's clock just before and just after asking for it."""
    before = time.time()
    guest = float(guest_out(env, vm, "date", "+%s.%N"))
    return before, guest, time.time()


def test_pause_freezes_the_guest_and_resume_lets_it_run(env: Controller, vm: str) -> None:
    a1, g1, _ = guest_clock(env, vm)
    paused = json.loads(ok(hvctl(env, "pause", vm, "--json")).stdout)
    assert paused == {"name": vm, "state": "paused"}
    ctx = env.ctx
    assert ctx.host().state(vm) is DomainState.PAUSED
    view = listed(env, vm)
    assert (view["state"], view["actual"], view["drift"]) == ("paused", "paused", None)
    # Frozen vCPUs: the agent cannot answer at all.
    assert hvctl(env, "wait", vm, "--for", "agent", "--timeout", "2").returncode == 7
    again = hvctl(env, "pause", vm)
    assert again.returncode == 1 and "already paused" in again.stderr
    start = hvctl(env, "start", vm)
    assert start.returncode == 1 and "paused, not stopped" in start.stderr
    frozen_at = time.monotonic()
    while time.monotonic() - frozen_at < 6:
        time.sleep(0.5)
    ok(hvctl(env, "resume", vm))
    _, g2, b2 = guest_clock(env, vm)
    # QEMU stops the guest's clock with its vCPUs (kvmclock is saved at stop and restored at continue), so the
    # guest saw at least 6 s fewer than the host did; 2 s of margin for clock-rate differences.
    assert g2 - g1 <= (b2 - a1) - 4, f"guest advanced {g2 - g1:.2f} s while the host advanced {b2 - a1:.2f} s"
    assert listed(env, vm)["state"] == "running"
    assert hvctl(env, "resume", vm).returncode == 1


def test_events_follow_shows_what_hvctl_did_and_what_libvirt_saw(env: Controller, vm: str) -> None:
    environ = os.environ | {"HVCTL_STATE_DIR": str(env.state), "HVCTL_CONNECT": str(env.uri)}
    follower = subprocess.Popen([*HVCTL, "events", "--follow", "--json", "--vm", vm, "-n", "1"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ)
    seen: list[dict[str, object]] = []
    reader = threading.Thread(target=lambda: seen.extend(json.loads(line) for line in follower.stdout or ()),
                              daemon=True)
    reader.start()
    try:
        wanted = [("libvirt", "libvirt.suspended"), ("ledger", "state.paused"), ("libvirt", "libvirt.resumed"),
                  ("ledger", "state.running")]
        # The follower subscribes to libvirt before it prints the history: once the one past event is out, it
        # is watching.
        deadline = time.monotonic() + 60
        while not seen and time.monotonic() < deadline:
            time.sleep(0.1)
        assert seen, follower.stderr.read() if follower.poll() is not None and follower.stderr else "no history line"
        ok(hvctl(env, "pause", vm))
        ok(hvctl(env, "resume", vm))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(
                any((e["source"], e["kind"]) == w for e in seen) for w in wanted):
            time.sleep(0.2)
    finally:
        follower.terminate()
        follower.wait(timeout=30)
    kinds = [(e["source"], e["kind"]) for e in seen]
    for w in wanted:
        assert w in kinds, f"{w} not followed; saw {kinds}"
    assert all(e["vm"] == vm for e in seen)
    past = json.loads(ok(hvctl(env, "events", "--vm", vm, "--json")).stdout)
    assert [e["kind"] for e in past][-2:] == ["state.paused", "state.running"]


def test_list_filters_and_output_formats(env: Controller, vm: str) -> None:
    import yaml

    assert ok(hvctl(env, "list", "-o", "name")).stdout == f"{vm}\n"
    assert ok(hvctl(env, "list", "-o", "name", "--tenant", "default", "--state", "running", "--host", "local"))\
        .stdout == f"{vm}\n"
    assert ok(hvctl(env, "list", "-o", "name", "--tenant", "acme")).stdout == ""
    assert ok(hvctl(env, "list", "-o", "name", "--state", "stopped")).stdout == ""
    as_yaml = yaml.safe_load(ok(hvctl(env, "list", "-o", "yaml")).stdout)
    assert [v["name"] for v in as_yaml["vms"]] == [vm]
    assert yaml.safe_load(ok(hvctl(env, "show", vm, "-o", "yaml")).stdout)["name"] == vm
    # --quiet: the result on stdout, no progress on stderr.
    quiet = ok(hvctl(env, "--quiet", "restart", vm, "--boot-timeout", "180"))
    assert quiet.stderr == "" and f"{vm} restarted" in quiet.stdout


def test_restart_boots_a_new_kernel_and_wait_for_ssh(env: Controller, vm: str) -> None:
    before = guest_out(env, vm, "cat", "/proc/sys/kernel/random/boot_id")
    restarted = json.loads(ok(hvctl(env, "restart", vm, "--json", "--boot-timeout", "180")).stdout)
    assert restarted["stop"] == "graceful" and restarted["state"] == "running"
    waited = json.loads(ok(hvctl(env, "wait", vm, "--for", "agent", "--json")).stdout)
    assert waited["for"] == "agent"
    after = guest_out(env, vm, "cat", "/proc/sys/kernel/random/boot_id")
    assert len(after) == 36 and after != before
    ok(hvctl(env, "wait", vm, "--for", "ssh", "--timeout", "180"))
    # With an SSH path, plain exec goes over SSH: the SSH session's own variable is set.
    assert "SSH_CONNECTION=" in ok(hvctl(env, "exec", vm, "--", "env")).stdout
    assert listed(env, vm)["state"] == "running"
    # A VM that is running does not stop within half a second: exit 7, the guest's timeout code.
    assert hvctl(env, "wait", vm, "--for", "stopped", "--timeout", "0.5").returncode == 7


def test_create_no_wait_then_wait_and_exec_falls_back_to_the_agent(env: Controller) -> None:
    # Without the operator key hvctl has no SSH path into this VM, so exec goes through the agent by itself.
    made = json.loads(ok(hvctl(env, "create", "op2", "--image", "base", "--memory", "384", "--disk", "2",
                               "--no-operator-key", "--no-wait", "--json")).stdout)
    assert made["waited"] is False and made["state"] == "running"
    ok(hvctl(env, "wait", "op2", "--for", "agent", "--timeout", "180"))
    plain = hvctl(env, "exec", "op2", "--", "sh", "-c", "hostname; echo ${SSH_CONNECTION:-no-ssh}")
    assert plain.returncode == 0 and plain.stdout.split() == ["op2", "no-ssh"]
    # The guest powers off behind hvctl's back; `wait --for stopped` sees it and the ledger follows.
    ctx = env.ctx
    ctx.host().guest("op2").shutdown()
    stopped = json.loads(ok(hvctl(env, "wait", "op2", "--for", "stopped", "--timeout", "120", "--json")).stdout)
    assert stopped["for"] == "stopped"
    view = listed(env, "op2")
    assert (view["state"], view["actual"], view["drift"]) == ("stopped", "shutoff", None)
    ok(hvctl(env, "destroy", "op2"))


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def vm_sample(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, vm: str,
              **extra: str) -> float:
    (value,) = [v for (n, labels), v in samples.items()
                if n == name and ("vm", vm) in labels and all((k, x) in labels for k, x in extra.items())]
    return value


def test_metrics_report_what_the_guest_really_did(env: Controller, vm: str, tmp_path: Path) -> None:
    before = scrape(ok(hvctl(env, "metrics")).stdout)
    labels = (("host", "local"), ("tenant", "default"), ("vm", vm))
    assert before[("hvctl_vm_running", labels)] == 1 and before[("hvctl_host_up", (("host", "local"),))] == 1
    assert before[("hvctl_tenant_disk_bytes_quota", (("tenant", "default"),))] == 6 * 2**30
    assert before[("hvctl_tenant_vms_used", (("tenant", "default"),))] == 1
    assert before[("hvctl_vm_memory_bytes", labels)] == 512 * 2**20
    # The guest burns CPU and writes 8 MiB to its disk; the counters grow by at least that.
    guest_out(env, vm, "sh", "-c", "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done; "
              "dd if=/dev/urandom of=/root/blob bs=1M count=8 conv=fsync 2>/dev/null; rm /root/blob; sync")
    after = scrape(ok(hvctl(env, "metrics")).stdout)
    cpu = "hvctl_vm_cpu_seconds_total"
    assert after[(cpu, labels)] > before[(cpu, labels)] > 0
    written = vm_sample(after, "hvctl_vm_disk_write_bytes_total", vm, device="vda") - \
        vm_sample(before, "hvctl_vm_disk_write_bytes_total", vm, device="vda")
    assert written >= 8 * 2**20
    # Its only NIC is the user-mode one (SSH forward): libvirt reads NIC counters from tap devices, and
    # user-mode networking has none, so no network series is made up for it.
    assert not [k for k in after if k[0].startswith("hvctl_vm_network") and ("vm", vm) in k[1]]
    # node_exporter's textfile collector, and a scrape over HTTP.
    textfile = tmp_path / "hvctl.prom"
    ok(hvctl(env, "metrics", "--textfile", str(textfile)))
    assert scrape(textfile.read_text())[("hvctl_vm_running", labels)] == 1
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environ = os.environ | {"HVCTL_STATE_DIR": str(env.state), "HVCTL_CONNECT": str(env.uri)}
    server = subprocess.Popen([*HVCTL, "metrics", "--listen", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env=environ)
    try:
        deadline, body = time.monotonic() + 60, ""
        while not body and time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
                    body = response.read().decode()
            except OSError:
                time.sleep(0.2)
        assert body, server.stderr.read() if server.poll() is not None and server.stderr else "no answer"
        assert scrape(body)[("hvctl_vm_running", labels)] == 1
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_snapshots_revert_the_disk_and_memory_count_against_the_quota_and_go_with_the_vm(
        env: Controller, vm: str) -> None:
    ctx = env.ctx
    boot_id = guest_out(env, vm, "cat", "/proc/sys/kernel/random/boot_id")
    guest_out(env, vm, "sh", "-c", "echo kept > /root/before; sync")
    refused = hvctl(env, "snapshot", "create", vm, "hot")
    assert refused.returncode == 1 and "must hold its memory too" in refused.stderr
    taken = json.loads(ok(hvctl(env, "snapshot", "create", vm, "warm", "--memory", "--json")).stdout)
    # 2 GiB of disk and 512 MiB of memory, rounded up: 3 GiB of the tenant's 6, with the VM's own 2.
    assert (taken["name"], taken["memory"], taken["disk_gib"], taken["state"]) == ("warm", True, 3, "ready")
    guest_out(env, vm, "sh", "-c", "echo lost > /root/after; sync")

    over = hvctl(env, "snapshot", "create", vm, "second", "--memory")
    assert over.returncode == 13 and "disk 3 GiB requested, 5 of 6 GiB in use" in over.stderr, over.stderr
    assert ctx.host().guest(vm).snapshot_names() == ["warm"]
    assert [s["name"] for s in json.loads(ok(hvctl(env, "snapshot", "list", vm, "--json")).stdout)] == ["warm"]

    reverted = json.loads(ok(hvctl(env, "snapshot", "revert", vm, "warm", "--json")).stdout)
    assert reverted["state"] == "running"
    # The same boot, back at the moment of the snapshot: the later file is gone, the earlier one is there.
    assert guest_out(env, vm, "cat", "/proc/sys/kernel/random/boot_id") == boot_id
    assert guest_out(env, vm, "sh", "-c", "ls /root/before /root/after 2>/dev/null; true") == "/root/before"
    ok(hvctl(env, "snapshot", "rm", vm, "warm"))
    assert ctx.host().guest(vm).snapshot_names() == [] and ctx.ledger.snapshots.all(vm) == []

    # A disk snapshot of the stopped VM; what is written after it is gone once it is reverted.
    ok(hvctl(env, "stop", vm))
    cold = json.loads(ok(hvctl(env, "snapshot", "create", vm, "cold", "--json")).stdout)
    assert (cold["memory"], cold["disk_gib"]) == (False, 2)
    ok(hvctl(env, "start", vm, "--json"))
    guest_out(env, vm, "sh", "-c", "echo late > /root/late; sync")
    busy = hvctl(env, "snapshot", "revert", vm, "cold")
    assert busy.returncode == 1 and "hvctl stop" in busy.stderr
    ok(hvctl(env, "stop", vm))
    assert json.loads(ok(hvctl(env, "snapshot", "revert", vm, "cold", "--json")).stdout)["state"] == "stopped"
    ok(hvctl(env, "start", vm))
    assert guest_out(env, vm, "sh", "-c", "ls /root/late 2>/dev/null; cat /root/before") == "kept"
    shown = json.loads(ok(hvctl(env, "show", vm, "--json")).stdout)
    assert [s["name"] for s in shown["snapshots"]] == ["cold"]

    # Destroy takes the snapshot's metadata and its ledger charge with the VM.
    ok(hvctl(env, "destroy", vm))
    assert ctx.ledger.snapshots.all() == [] and ctx.host().state(vm) is DomainState.MISSING


def test_resize_grows_the_disk_and_filesystem_live_and_cpus_and_memory_at_the_next_boot(
        env: Controller) -> None:
    ok(hvctl(env, "create", "op3", "--image", "base", "--memory", "384", "--disk", "2", "--boot-timeout", "180"))
    grown = json.loads(ok(hvctl(env, "resize", "op3", "--disk", "3", "--json")).stdout)
    assert grown["disk"] == "grown live" and grown["filesystem"].startswith("grown to")
    # The guest itself sees a 3 GiB disk, and a root filesystem that grew onto it without a reboot.
    assert guest_out(env, "op3", "blockdev", "--getsize64", "/dev/vda") == str(3 * 2**30)
    assert int(guest_out(env, "op3", "df", "-B1", "--output=size", "/").split()[-1]) > int(2.5 * 2**30)
    sized = json.loads(ok(hvctl(env, "resize", "op3", "--vcpus", "2", "--memory", "512", "--json")).stdout)
    assert sized["cpu_memory"] == "at the next boot"
    assert guest_out(env, "op3", "nproc") == "1"
    ok(hvctl(env, "restart", "op3", "--boot-timeout", "180"))
    assert guest_out(env, "op3", "nproc") == "2"
    mem_kib = int(guest_out(env, "op3", "sh", "-c", "grep MemTotal /proc/meminfo").split()[1])
    assert 400 * 1024 < mem_kib <= 512 * 1024
    shrink = hvctl(env, "resize", "op3", "--disk", "1")
    assert shrink.returncode == 2 and "disks only grow" in shrink.stderr
    greedy = hvctl(env, "resize", "op3", "--memory", "9000")
    assert greedy.returncode == 13 and "resize of op3: tenant default: memory" in greedy.stderr
    view = json.loads(ok(hvctl(env, "show", "op3", "--json")).stdout)
    assert (view["vcpus"], view["memory_mib"], view["disk_gib"]) == (2, 512, 3)
    ok(hvctl(env, "destroy", "op3"))
