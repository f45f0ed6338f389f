"""Real guests under a private libvirtd: the full path from `hvctl create` to a guest that says it is up, and back.

Every assertion about a guest is about what the guest itself did (its console), never only what libvirt reports.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import hvctl_cli, short_tempdir
from framework.devhost import PrivateLibvirtd

from hvctl.context import Context
from hvctl.errors import AlreadyExists, GuestTimeout, HvctlError, HypervisorError
from hvctl.host import DomainState
from hvctl.ledger import VMRecord
from hvctl.ops.create import create
from hvctl.ops.incarnation import BootOptions
from hvctl.ops.lifecycle import destroy
from hvctl.spec import VMSpec

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

Run = Callable[..., subprocess.CompletedProcess[str]]


def assert_nothing_left(ctx: Context, name: str) -> None:
    """No domain, no VM directory or overlay, no ledger row."""
    assert ctx.host().state(name) is DomainState.MISSING
    assert not ctx.paths.vm_dir(name).exists()
    assert name not in {r.name for r in ctx.ledger.vms.all()}


def test_create_list_show_console_destroy_through_the_cli(run_hvctl: Run, ctx: Context) -> None:
    made = run_hvctl("create", "smoke", "--memory", "128", "--json")
    assert made.returncode == 0, made.stderr
    record = json.loads(made.stdout)
    assert record["state"] == "running" and record["ssh_port"] >= 22200

    # The guest itself reports its name, kernel, CPU count and that it mounted its own overlay disk.
    console = run_hvctl("console-log", "smoke").stdout
    ready = next(line for line in console.splitlines() if line.startswith("HVCTL-READY"))
    assert "name=smoke" in ready and "cpus=1" in ready and "disk=minimal@" in ready
    assert ctx.host().state("smoke") is DomainState.RUNNING
    # QEMU is a real process with our disk open.
    assert subprocess.run(["pgrep", "-f", "guest=smoke"], capture_output=True).returncode == 0

    listing = json.loads(run_hvctl("list", "--json").stdout)
    assert [(v["name"], v["state"], v["actual"], v["drift"]) for v in listing["vms"]] == [
        ("smoke", "running", "running", None)]
    table = run_hvctl("list").stdout
    assert "smoke" in table and "running" in table
    shown = json.loads(run_hvctl("show", "smoke", "--json").stdout)
    assert shown["overlay"].endswith("vms/smoke/disk.qcow2") and shown["events"][-1]["kind"] == "state.running"

    doctor = run_hvctl("doctor", "--json")
    assert doctor.returncode == 0, doctor.stdout
    assert {c["name"]: c["ok"] for c in json.loads(doctor.stdout)}["drift"] is True

    gone = run_hvctl("destroy", "smoke")
    assert gone.returncode == 0, gone.stderr
    assert_nothing_left(ctx, "smoke")


def test_graceful_stop_and_start_boots_again(make_vm: Callable[..., VMRecord], run_hvctl: Run,
                                            ctx: Context) -> None:
    vm = make_vm("cycle")
    stopped = run_hvctl("stop", "cycle", "--timeout", "30", "--json")
    assert stopped.returncode == 0, stopped.stderr
    # The guest powered itself off in response to the ACPI button rather than being destroyed.
    assert json.loads(stopped.stdout)["how"] == "graceful"
    assert "reboot: Power down" in vm.console_log.read_text(errors="replace")
    assert ctx.host().state("cycle") is DomainState.SHUTOFF
    started = run_hvctl("start", "cycle")
    assert started.returncode == 0, started.stderr
    assert ctx.host().state("cycle") is DomainState.RUNNING
    assert "HVCTL-READY name=cycle" in vm.console_log.read_text(errors="replace")
    check = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(vm.overlay)], capture_output=True, text=True)
    assert json.loads(check.stdout)["backing-filename"].endswith("base.qcow2")


def test_guest_that_powers_itself_off_is_reported_as_drift(make_vm: Callable[..., VMRecord], run_hvctl: Run,
                                                          ctx: Context) -> None:
    make_vm("lonely")
    # Pressing the power button behind hvctl's back: the guest's own acpid powers it off.
    ctx.host().guest("lonely").shutdown()
    deadline = time.monotonic() + 30
    while ctx.host().state("lonely") is not DomainState.SHUTOFF and time.monotonic() < deadline:
        time.sleep(0.2)
    listing = json.loads(run_hvctl("list", "--json").stdout)
    (vm,) = listing["vms"]
    assert vm["state"] == "running" and vm["actual"] == "shutoff"
    assert "powered off" in vm["drift"]
    assert "powered off" in json.loads(run_hvctl("show", "lonely", "--json").stdout)["drift"]
    doctor = run_hvctl("doctor")
    assert doctor.returncode == 1 and "lonely" in doctor.stdout


def test_duplicate_name_is_refused_and_the_first_vm_is_untouched(make_vm: Callable[..., VMRecord], run_hvctl: Run,
                                                                ctx: Context) -> None:
    first = make_vm("twin")
    again = run_hvctl("create", "twin", "--memory", "128")
    assert again.returncode == 4
    assert "already exists" in again.stderr and "Traceback" not in again.stderr
    assert ctx.host().state("twin") is DomainState.RUNNING and first.overlay.exists()
    assert len(ctx.ledger.vms.all()) == 1


def test_existing_disk_path_is_refused_and_left_alone(run_hvctl: Run, ctx: Context) -> None:
    vm_dir = ctx.paths.vm_dir("squatter")
    vm_dir.mkdir(parents=True)
    ctx.paths.overlay("squatter").write_text("somebody's data")
    result = run_hvctl("create", "squatter", "--memory", "128")
    assert result.returncode == 4 and "disk path" in result.stderr and "already exists" in result.stderr
    assert ctx.paths.overlay("squatter").read_text() == "somebody's data"
    assert ctx.host().state("squatter") is DomainState.MISSING
    assert ctx.ledger.vms.all() == []


def _broken_image(ctx: Context, kernel_bytes: bytes | None = None, **manifest_changes: object) -> str:
    """A copy of the minimal image with a replaced kernel, registered in this test's own image store."""
    real = ctx.images.get("minimal")
    store = ctx.paths.root / "images-broken"
    target = store / f"broken@{real.content_hash}"
    shutil.copytree(real.directory, target)
    if kernel_bytes is not None:
        (target / "vmlinuz").write_bytes(kernel_bytes)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest.update(name="broken", directory=str(target), **manifest_changes)
    (target / "manifest.json").write_text(json.dumps(manifest))
    # The test's images dir is a symlink to the shared session store; give this test a private store instead.
    images = ctx.paths.images
    images.unlink()
    images.mkdir()
    (images / real.directory.name).symlink_to(real.directory)
    (images / target.name).symlink_to(target)
    return "broken"


def test_start_failure_halfway_through_create_leaves_nothing(run_hvctl: Run, ctx: Context) -> None:
    # QEMU itself refuses to start: the "kernel" is not a bootable image. The domain is already defined and the
    # overlay already made by then, so this exercises every undo step of create.
    _broken_image(ctx, b"\x00not a kernel" * 64)
    result = run_hvctl("create", "halfway", "--memory", "128", "--image", "broken")
    assert result.returncode == HypervisorError.exit_code, result.stderr
    assert "Traceback" not in result.stderr
    # Progress lines come first; the error itself is exactly one line, and the step that failed is marked.
    errors = [line for line in result.stderr.splitlines() if line.startswith("hvctl: error:")]
    assert len(errors) == 1 and "start of halfway failed" in errors[0]
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    assert "✗ starting" in result.stderr
    assert_nothing_left(ctx, "halfway")
    assert [e.kind for e in ctx.ledger.events.recent("halfway")] == ["create.requested", "vm.deleted"]


def test_disk_smaller_than_the_image_is_refused_before_anything_is_made(run_hvctl: Run, ctx: Context) -> None:
    _broken_image(ctx, disk_virtual_bytes=5 * 2**30)
    result = run_hvctl("create", "small", "--image", "broken", "--disk", "2")
    assert result.returncode == 2
    assert "image broken needs a disk of at least 5 GiB; 2 GiB requested" in result.stderr
    assert_nothing_left(ctx, "small")


def test_guest_that_never_reports_ready_times_out_with_console_and_is_cleaned_up(ctx: Context) -> None:
    # A real kernel that boots but whose init never runs: the kernel panics looking for a missing init.
    spec = VMSpec.parse(name="mute", memory_mib=128)
    with pytest.raises(GuestTimeout) as exc:
        create(ctx, spec, options=BootOptions(timeout=20, extra_cmdline=("rdinit=/no-such-init", "panic=0")))
    assert "Kernel panic" in exc.value.console_tail or "No working init" in exc.value.console_tail
    assert_nothing_left(ctx, "mute")


def test_unknown_image_is_refused_before_anything_is_made(run_hvctl: Run, ctx: Context) -> None:
    result = run_hvctl("create", "ghost", "--image", "no-such-image")
    assert result.returncode == 8 and "unknown image 'no-such-image'" in result.stderr
    assert_nothing_left(ctx, "ghost")


def test_libvirtd_not_running_and_unreachable_uri(run_hvctl: Run, ctx: Context, image_dir: Path) -> None:
    fresh = short_tempdir("hvs-")
    (fresh / "images").symlink_to(image_dir)
    try:
        dead = hvctl_cli(fresh, "qemu:///system?socket=/var/tmp/hvctl-no-such/libvirt-sock", "create", "nohost")
        assert dead.returncode == 5 and "cannot reach libvirt" in dead.stderr and "Traceback" not in dead.stderr
        assert not (fresh / "vms" / "nohost").exists()
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
    fresh = short_tempdir("hvs-")
    try:
        # Port 1 on loopback: nothing listens there, so the TCP transport is refused at once.
        unreachable = hvctl_cli(fresh, "qemu+tcp://127.0.0.1:1/system", "list")
        assert unreachable.returncode == 5 and "cannot reach libvirt" in unreachable.stderr
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
    # On a state dir whose host `local` is this test's daemon, another URI names no host: refused, nothing renamed.
    assert ctx.ledger.hosts.get("local").uri == ctx.uri
    other = run_hvctl("create", "nohost", uri="qemu:///system?socket=/var/tmp/hvctl-no-such/libvirt-sock")
    assert other.returncode == 2 and "no registered host has that URI" in other.stderr
    assert ctx.ledger.hosts.get("local").uri == ctx.uri
    assert ctx.ledger.vms.all() == []
    assert not ctx.paths.vm_dir("nohost").exists()


def test_create_refuses_a_domain_defined_outside_hvctl(ctx: Context) -> None:
    # Another tool owns a domain of that name; hvctl must not adopt or overwrite it.
    image = ctx.images.get("minimal")
    foreign = (f"<domain type='qemu'><name>foreign</name><memory unit='MiB'>64</memory><os><type>hvm</type>"
               f"<kernel>{image.kernel}</kernel></os></domain>")
    ctx.host().define(foreign)
    try:
        with pytest.raises(AlreadyExists, match="domain named 'foreign'"):
            create(ctx, VMSpec.parse(name="foreign", memory_mib=128))
        assert ctx.ledger.vms.all() == []
    finally:
        ctx.host().guest("foreign").undefine()


def test_accelerator_probe_answers_tcg_on_a_daemon_without_kvm(ctx: Context) -> None:
    caps = ctx.capabilities()
    assert caps.accel.value == "qemu"
    assert ctx.ledger.hosts.get("local").accel == "qemu"  # cached per host


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run a command as an unprivileged local user with no supplementary groups: a tenant with a host account."""
    return subprocess.run(list(argv), user="nobody", group="nogroup", extra_groups=[], capture_output=True,
                          text=True, timeout=30)


def test_no_other_local_user_can_read_a_vms_files(ctx: Context, make_vm: Callable[..., VMRecord]) -> None:
    """QEMU still reaches the disk, seed, console and socket (the guest booted and printed its ready line), and a
    local user who is neither root nor QEMU can read none of them, nor the ledger, nor list the state dir."""
    vm = make_vm("perm")
    vm_dir = Path(vm.overlay).parent
    qemu_gid = ctx.host().qemu_gid()
    assert qemu_gid is not None, "the private daemon runs QEMU as libvirt-qemu: its DAC label must be found"
    assert (vm_dir.stat().st_mode & 0o777, vm_dir.stat().st_gid) == (0o750, qemu_gid)
    assert Path(vm.overlay).stat().st_mode & 0o077 == 0
    assert vm.seed is not None and Path(vm.seed).stat().st_mode & 0o777 == 0o640
    assert ctx.paths.ledger.stat().st_mode & 0o777 == 0o600
    for secret in (vm.overlay, vm.seed, vm.console_log, ctx.paths.ledger):
        read = as_nobody("cat", str(secret))
        assert read.returncode != 0 and "Permission denied" in read.stderr, secret
    for listing in (vm_dir, ctx.paths.root, ctx.paths.root / "vms"):
        assert as_nobody("ls", str(listing)).returncode != 0, listing
    # The system's python: the test's own interpreter may live where nobody cannot reach it.
    connect = as_nobody("/usr/bin/python3", "-c", "import socket, sys; socket.socket(socket.AF_UNIX)"
                        ".connect(sys.argv[1])", str(vm.agent_socket))
    assert connect.returncode != 0 and "PermissionError" in connect.stderr
    assert "HVCTL-READY" in ctx.paths.console_log("perm").read_text(errors="replace")


def test_cpu_cap_is_enforced_by_the_cgroup_and_holds_under_a_hog(ctx: Context, run_hvctl: Run) -> None:
    """A guest spinning a CPU hog, capped at half a host CPU: the QEMU process's measured CPU use over a window
    must be 0.95-1.05 of the cap, and the cgroup must carry exactly the configured quota."""
    from hvctl.enforcement import QemuCgroups, find_qemu_pid

    create(ctx, VMSpec.parse(name="hog", memory_mib=128, cpu_limit=0.5),
           options=BootOptions(extra_cmdline=("hvctl.hog=1",)))
    try:
        deadline = time.monotonic() + 10
        while "HVCTL-HOG started" not in ctx.paths.console_log("hog").read_text(errors="replace"):
            assert time.monotonic() < deadline, "the guest never started its CPU hog"
            time.sleep(0.1)
        shown = json.loads(run_hvctl("show", "hog", "--json").stdout)["enforcement"]
        assert shown["configured"]["global_quota_us"] == 50_000
        assert (shown["enforced"]["cpu_quota_us"], shown["enforced"]["cpu_period_us"]) == (50_000, 100_000)
        # The same through libvirt (schedulerParameters and the rest), as on a host whose cgroups are not ours.
        assert (shown["libvirt"]["global_quota_us"], shown["libvirt"]["global_period_us"]) == (50_000, 100_000)
        assert shown["mismatches"] == [], shown
        pid = find_qemu_pid("hog")
        assert pid is not None
        time.sleep(2)  # let the boot's burst drain from the CFS accounting
        fraction, source = QemuCgroups(pid).cpu_fraction(10.0)
        ratio = fraction / 0.5
        print(f"CPU cap 0.5: measured {fraction:.3f} CPUs over 10 s from {source}, ratio {ratio:.3f}")
        assert 0.95 <= ratio <= 1.05, f"measured {fraction:.3f} CPUs against a 0.5 cap ({source})"
    finally:
        destroy(ctx, "hog")


def test_a_squatted_ssh_port_moves_and_the_vm_still_starts(ctx: Context, make_vm: Callable[..., VMRecord],
                                                           run_hvctl: Run) -> None:
    """Any local user can bind a stopped VM's forward port. Start moves the forward to a free port and says so."""
    vm = make_vm("squat")
    stopped = run_hvctl("stop", "squat", "--timeout", "1")
    assert stopped.returncode == 0, stopped.stderr
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", vm.ssh_port))
        squatter.listen()
        started = run_hvctl("start", "squat")
        assert started.returncode == 0, started.stderr
    moved = ctx.ledger.vms.get("squat")
    assert moved.ssh_port != vm.ssh_port
    assert f"127.0.0.1:{moved.ssh_port}-:22" in ctx.host().guest("squat").xml()
    event = ctx.ledger.events.last_data("squat", "port.moved")
    assert event == {"from": vm.ssh_port, "to": moved.ssh_port}
    assert "HVCTL-READY" in ctx.paths.console_log("squat").read_text(errors="replace")


def test_the_private_daemon_answers_root_only(libvirtd: PrivateLibvirtd) -> None:
    """Its socket is 0700, and it listens on nothing else: a local user who is not root gets nothing from it."""
    assert subprocess.run(["virsh", "-c", libvirtd.uri, "list"], capture_output=True, timeout=30).returncode == 0
    refused = as_nobody("virsh", "-c", libvirtd.uri, "list")
    assert refused.returncode != 0 and "Permission denied" in refused.stderr
    assert libvirtd.socket.stat().st_mode & 0o777 == 0o700
    readonly = libvirtd.socket.with_name("libvirt-sock-ro")
    assert not readonly.exists() or readonly.stat().st_mode & 0o777 == 0o700


def test_the_console_log_is_written_by_virtlogd_so_it_is_capped(libvirtd: PrivateLibvirtd, ctx: Context,
                                                                 make_vm: Callable[..., VMRecord]) -> None:
    """A guest can print without end. virtlogd (not QEMU) holds its console file, and rotates it at max_size
    (2 MiB, 3 backups by default), so a guest cannot fill the host's disk through its console."""
    from hvctl.enforcement import find_qemu_pid

    vm = make_vm("chatty")
    console = str(Path(vm.console_log).resolve())

    def holds(pid: int) -> bool:
        fds = Path(f"/proc/{pid}/fd")
        return any(os.readlink(fd) == console for fd in fds.iterdir() if fd.is_symlink())

    virtlogd = int(libvirtd.virtlogd_pidfile.read_text())
    qemu = find_qemu_pid("chatty")
    assert qemu is not None
    assert holds(virtlogd) and not holds(qemu)


def test_destroy_refuses_a_domain_of_the_same_name_that_hvctl_did_not_make(
        ctx: Context, make_vm: Callable[..., VMRecord]) -> None:
    """A VM's domain was replaced behind hvctl's back by another tool's domain of the same name: destroy must touch
    neither that domain nor the VM's files, and say so in one line."""
    vm = make_vm("swapped")
    ctx.host().guest("swapped").destroy()
    ctx.host().guest("swapped").undefine()
    image = ctx.images.get("minimal")
    ctx.host().define(f"<domain type='qemu'><name>swapped</name><memory unit='MiB'>64</memory><os><type>hvm</type>"
                      f"<kernel>{image.kernel}</kernel></os></domain>")
    try:
        with pytest.raises(HvctlError, match="is not the one hvctl made for this VM .no hvctl metadata."):
            destroy(ctx, "swapped")
        assert ctx.host().state("swapped") is DomainState.SHUTOFF
        assert Path(vm.overlay).exists() and ctx.ledger.vms.get("swapped").state == "running"
    finally:
        ctx.host().guest("swapped").undefine()
    destroy(ctx, "swapped")  # the foreign domain gone, destroy finishes the job
    assert_nothing_left(ctx, "swapped")
