"""The operator's lifecycle verbs on a real Debian guest under TCG: exec through the agent, pause and resume,
restart, wait, and create --no-wait. Each check is about what the guest itself did (its boot id, a ticker it
ran, its hostname), not only what libvirt reports."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import hvctl_cli, short_tempdir

from hvctl.context import Context
from hvctl.devhost import PrivateLibvirtd
from hvctl.host import DomainState
from hvctl.ops.lifecycle import destroy
from images.store import ImageStore

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def env(libvirtd: PrivateLibvirtd, image_dir: Path) -> Iterator[dict[str, object]]:
    ImageStore(image_dir).build("base")
    state = short_tempdir("hvo-")
    (state / "images").symlink_to(image_dir)
    ctx = Context(state_dir=state, uri=libvirtd.uri)
    yield {"ctx": ctx, "state": state, "uri": libvirtd.uri}
    for leftover in ctx.ledger.list_vms():
        destroy(ctx, leftover.name)
    ctx.close()
    shutil.rmtree(state, ignore_errors=True)


def hvctl(env: dict[str, object], *args: str, timeout: float = 240,
          stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return hvctl_cli(str(env["state"]), str(env["uri"]), *args, timeout=timeout, stdin=stdin)


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stderr + result.stdout
    return result


def guest_out(env: dict[str, object], vm: str, *argv: str) -> str:
    return ok(hvctl(env, "exec", vm, "--agent", "--", *argv)).stdout.strip()


def listed(env: dict[str, object], vm: str) -> dict[str, object]:
    (view,) = [v for v in json.loads(ok(hvctl(env, "list", "--json")).stdout)["vms"] if v["name"] == vm]
    return view


@pytest.fixture(scope="module")
def vm(env: dict[str, object]) -> str:
    ok(hvctl(env, "create", "op1", "--image", "base", "--memory", "512", "--disk", "2", "--boot-timeout", "180"))
    return "op1"


def test_exec_through_the_agent_needs_no_network_and_keeps_exit_codes_input_and_timeouts(
        env: dict[str, object], vm: str) -> None:
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


def guest_clock(env: dict[str, object], vm: str) -> tuple[float, float, float]:
    """The guest's wall clock, with the host's clock just before and just after asking for it."""
    before = time.time()
    guest = float(guest_out(env, vm, "date", "+%s.%N"))
    return before, guest, time.time()


def test_pause_freezes_the_guest_and_resume_lets_it_run(env: dict[str, object], vm: str) -> None:
    a1, g1, _ = guest_clock(env, vm)
    paused = json.loads(ok(hvctl(env, "pause", vm, "--json")).stdout)
    assert paused == {"name": vm, "state": "paused"}
    ctx = env["ctx"]
    assert isinstance(ctx, Context) and ctx.host().state(vm) is DomainState.PAUSED
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


def test_restart_boots_a_new_kernel_and_wait_for_ssh(env: dict[str, object], vm: str) -> None:
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


def test_create_no_wait_then_wait_and_exec_falls_back_to_the_agent(env: dict[str, object]) -> None:
    # Without the operator key hvctl has no SSH path into this VM, so exec goes through the agent by itself.
    made = json.loads(ok(hvctl(env, "create", "op2", "--image", "base", "--memory", "384", "--disk", "2",
                               "--no-operator-key", "--no-wait", "--json")).stdout)
    assert made["waited"] is False and made["state"] == "running"
    ok(hvctl(env, "wait", "op2", "--for", "agent", "--timeout", "180"))
    plain = hvctl(env, "exec", "op2", "--", "sh", "-c", "hostname; echo ${SSH_CONNECTION:-no-ssh}")
    assert plain.returncode == 0 and plain.stdout.split() == ["op2", "no-ssh"]
    # The guest powers off behind hvctl's back; `wait --for stopped` sees it and the ledger follows.
    ctx = env["ctx"]
    assert isinstance(ctx, Context)
    ctx.host().guest("op2").shutdown()
    stopped = json.loads(ok(hvctl(env, "wait", "op2", "--for", "stopped", "--timeout", "120", "--json")).stdout)
    assert stopped["for"] == "stopped"
    view = listed(env, "op2")
    assert (view["state"], view["actual"], view["drift"]) == ("stopped", "shutoff", None)
    ok(hvctl(env, "destroy", "op2"))
