"""`create --gpus`, destroy, `gpu release` and `doctor --repair` against a FAKE GPU host.

No GPU, and no IOMMU, exists on these machines, so the PCI side is the fake sysfs tree and fake kernel of
tests/fakesysfs.py, and the hypervisor is libvirt's test driver (test:///default), which accepts and "runs" a domain
with hostdevs without touching hardware; its guest never boots, so a thread here writes the console's ready marker
in its place. What is real: hvctl's create path end to end, the domain XML libvirt accepted, the ledger (SQLite)
and every sysfs write the binder makes. tests/functional/test_vm_vfio.py runs the same vfio code against a real kernel.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import hvctl_cli, short_tempdir
from fakesysfs import (
    AUDIO,
    EDU,
    GPU,
    H100,
    IDLE_AUDIO,
    IDLE_GPU,
    IDLE_USB,
    NIC,
    FakeHost,
    FakeKernel,
    SimulatedCrash,
    standard_host,
)

from hvctl.context import Context, GpuEnvironment
from hvctl.ledger import Hardware, InventoryGpu, QuotaExceeded
from hvctl.ops.create import create
from hvctl.ops.doctor import repair
from hvctl.ops.incarnation import BootOptions
from hvctl.ops.lifecycle import destroy, start, stop
from hvctl.passthrough import NoGpuAvailable, gpu_keepers, release_address, stranded_gpus
from hvctl.placement import NoValidHost
from hvctl.spec import VMSpec
from vfio import BindError, DeviceNotFound, NotAGpu

POLICY = """
accelerators:
  edu: {vendor: 0x1234, device: 0x11e8}
hosts: {reserve: {memory_mib: 0}}
tenants:
  default: {quota: {vcpus: 16, memory_mib: 16384, disk_gib: 100, gpus: 8, vms: 10}}
"""


class Rig:
    def __init__(self, base: Path, ledger_url: str | None = None) -> None:
        self.fake: FakeHost = standard_host(base / "fake")
        self.kernel = FakeKernel(self.fake)
        self.state = short_tempdir("hvg-")
        (self.state / "policy.yaml").write_text(POLICY)
        stub = self.state / "images" / "stub@0000000000000000"
        stub.mkdir(parents=True)
        # A stub image: the test driver boots nothing, but create checks the files and layers an overlay on it.
        for part in ("vmlinuz", "initrd.img"):
            (stub / part).write_bytes(b"\0")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(stub / "base.qcow2"), "1G"], check=True)
        (stub / "manifest.json").write_text(json.dumps({
            "name": "stub", "content_hash": "0000000000000000", "kind": "initramfs", "directory": str(stub),
            "kernel_version": "fake", "built_at": 0, "size_bytes": 1}))
        self.ctx = Context(state_dir=self.state, uri="test:///default", ledger_url=ledger_url, gpu_env=GpuEnvironment(
            sysfs_root=self.fake.sys, dev_root=self.fake.dev, writer=self.kernel, users_of=lambda _: [],
            bind_timeout=0.2))
        self.ctx.ledger.hosts.record_facts("local", "qemu", 64, 262144)
        inventory = [(GPU, "10de:2684"), (H100, "10de:2330"), (EDU, "edu"), (IDLE_GPU, "10de:2684")]
        gpus = tuple(InventoryGpu(address, model, "") for address, model in inventory)
        self.ctx.ledger.hosts.record_hardware("local", Hardware(gpus=gpus))

    def create(self, name: str, gpus: int, model: str | None = None, host: str | None = None,
               ctx: Context | None = None) -> None:
        with self.stand_in_guest(name):
            create(ctx or self.ctx, VMSpec.parse(name=name, image="stub", gpus={"count": gpus, "model": model},
                                          host=host), options=BootOptions(timeout=10))

    def start(self, name: str) -> None:
        with self.stand_in_guest(name):
            start(self.ctx, name, boot_timeout=10)

    @contextlib.contextmanager
    def stand_in_guest(self, name: str) -> Iterator[None]:
        console = self.ctx.paths.console_log(name)
        done = threading.Event()

        def stand_in_guest() -> None:
            # The test driver's domain never prints: say "ready" for it, again and again until create has seen it
            # (create counts only what the console gains after the domain starts).
            while not done.is_set():
                if console.parent.is_dir():
                    with console.open("a") as f:
                        f.write(f"HVCTL-READY name={name}\n")
                time.sleep(0.01)

        writer = threading.Thread(target=stand_in_guest, daemon=True)
        writer.start()
        try:
            yield
        finally:
            done.set()
            writer.join()

    def bindings(self) -> dict[str, tuple[str | None, str]]:
        return {r.address: (r.vm, r.state) for r in self.ctx.ledger.gpus.bindings("local")}


def _rig(base: Path, ledger_url: str | None) -> Iterator[Rig]:
    r = Rig(base, ledger_url)
    yield r
    for vm in r.ctx.ledger.vms.all():
        destroy(r.ctx, vm.name)
    r.ctx.close()
    shutil.rmtree(r.state, ignore_errors=True)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    yield from _rig(tmp_path, None)


@pytest.fixture
def rig_on_each_ledger(tmp_path: Path, ledger_location: str) -> Iterator[Rig]:
    """The rig with its ledger on SQLite, then on PostgreSQL (a location that is not a URL is the state dir's)."""
    yield from _rig(tmp_path, ledger_location if ledger_location.startswith("postgresql://") else None)


def test_create_with_a_gpu_binds_it_writes_hostdevs_and_records_it_and_destroy_gives_it_back(rig: Rig) -> None:
    before = rig.fake.snapshot()
    rig.create("gpu-vm", 1)
    # The first passable GPU: the one on nvidia with its HDMI audio function (the H100 shares a group with a NIC).
    assert rig.fake.driver(GPU) == "vfio-pci" and rig.fake.driver(AUDIO) == "vfio-pci"
    assert rig.bindings() == {GPU: ("gpu-vm", "bound"), AUDIO: ("gpu-vm", "bound")}
    root = ET.fromstring(rig.ctx.host().guest("gpu-vm").xml())  # what libvirt accepted
    hostdevs = root.findall("devices/hostdev")
    assert [h.get("managed") for h in hostdevs] == ["no", "no"]
    addresses = {f"0000:{int(a.get('bus', '0'), 16):02x}:{int(a.get('slot', '0'), 16):02x}."
                 f"{int(a.get('function', '0'), 16)}" for a in root.iterfind("devices/hostdev/source/address")}
    assert addresses == {GPU, AUDIO}
    hole = root.find("devices/controller[@model='pcie-root']/pcihole64")
    assert hole is not None and int(hole.text or 0) >= 32 * 2**20  # a 32 GiB BAR needs more than q35's default
    assert rig.ctx.ledger.host_usage("local").gpus == 1
    destroy(rig.ctx, "gpu-vm")
    assert rig.fake.snapshot() == before and rig.bindings() == {}


def test_gpus_held_by_one_vm_are_not_given_to_another_and_the_refusal_says_why(rig: Rig) -> None:
    # Every passable one: 01:00 with its audio function, the allowlisted edu device, and the idle GPU with its
    # driverless group mates (pinned to vfio-pci too, so that no host driver can claim them under the guest).
    rig.create("first", 3)
    assert {a for a, (vm, _) in rig.bindings().items() if vm == "first"} == {GPU, AUDIO, EDU, IDLE_GPU, IDLE_AUDIO,
                                                                           IDLE_USB}
    with pytest.raises(NoGpuAvailable) as refused:
        rig.create("second", 1)
    message = refused.value.message
    assert f"{GPU} is held by VM first" in message and f"{IDLE_GPU} is held by VM first" in message
    assert H100 in message and NIC in message  # not viable: its group holds a NIC the host uses
    assert [vm.name for vm in rig.ctx.ledger.vms.all()] == ["first"]
    assert not rig.ctx.paths.vm_dir("second").exists()


def test_an_allowlisted_accelerator_is_a_gpu_model_and_an_unknown_model_is_refused(rig: Rig) -> None:
    rig.create("npu-vm", 1, model="edu")
    assert rig.fake.driver(EDU) == "vfio-pci" and rig.bindings() == {EDU: ("npu-vm", "bound")}
    with pytest.raises(NoValidHost, match="0 of model tpu-v9 free"):  # the scheduler refuses, from the inventory
        rig.create("tpu-vm", 1, model="tpu-v9")


def test_two_creates_racing_for_the_last_device_one_wins_and_the_other_is_refused_cleanly(
        rig_on_each_ledger: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both creates choose the only edu device before either claims it (a barrier after the choice, the hook that
    makes the race happen every time): the claim, one ledger transaction, lets one through and refuses the
    other, which leaves no VM, binding or domain behind."""
    from hvctl import passthrough
    from hvctl.ledger import DeviceTaken

    real_choose = passthrough.choose
    both_chose = threading.Barrier(2, timeout=30)

    def choose_then_wait(*args: object, **kwargs: object) -> object:
        chosen = real_choose(*args, **kwargs)  # type: ignore[arg-type]
        both_chose.wait()
        return chosen

    rig = rig_on_each_ledger
    monkeypatch.setattr(passthrough, "choose", choose_then_wait)
    other = Context(state_dir=rig.state, uri="test:///default", gpu_env=rig.ctx.gpu_env, ledger_url=rig.ctx.ledger_url)
    outcomes: dict[str, BaseException | None] = {}

    def race(name: str, ctx: Context) -> None:
        try:
            rig.create(name, 1, model="edu", ctx=ctx)
            outcomes[name] = None
        except BaseException as exc:  # noqa: BLE001 - examined below
            outcomes[name] = exc

    racers = [threading.Thread(target=race, args=(n, c)) for n, c in (("left", rig.ctx), ("right", other))]
    for t in racers:
        t.start()
    for t in racers:
        t.join(60)
    try:
        assert sum(exc is None for exc in outcomes.values()) == 1, outcomes
        (winner,) = [n for n, exc in outcomes.items() if exc is None]
        (loser,) = [n for n, exc in outcomes.items() if exc is not None]
        assert isinstance(outcomes[loser], DeviceTaken), outcomes[loser]
        assert f"was just claimed by VM {winner}" in str(outcomes[loser])
        assert rig.bindings() == {EDU: (winner, "bound")} and rig.fake.driver(EDU) == "vfio-pci"
        assert [vm.name for vm in rig.ctx.ledger.vms.all()] == [winner]
        assert rig.ctx.host().state(loser).value == "missing" and rig.ctx.ledger.operations.all() == []
    finally:
        other.close()


def test_a_device_whose_bind_has_begun_is_not_free_for_another_create(rig: Rig) -> None:
    """The interleaving the race above hit only now and then: VM left has claimed the device and its binder has
    journalled the first step ("original": recorded, not moved yet) when right's claim runs. That device is left's;
    taking the state for "free" once let both creates bind it. A leftover of a VM that is gone is stranded, and
    `doctor --repair` frees it."""
    from hvctl import passthrough
    from hvctl.ledger import DeviceTaken

    ledger = rig.ctx.ledger
    ledger.gpus.claim("local", "left", [EDU], passthrough.RELEASED_STATES)
    ledger.gpus.record_step("local", EDU, "left", "record", None, "original")
    with pytest.raises(DeviceTaken, match="just claimed by VM left"):
        ledger.gpus.claim("local", "right", [EDU], passthrough.RELEASED_STATES)
    assert passthrough.owners(ledger, "local") == {EDU: "left"}
    # The scheduler already counts it as held (it counted every device as free before: issue 17); placed by hand
    # on the host, the create's own choice names the holder.
    from hvctl.placement import NoValidHost

    with pytest.raises(NoValidHost, match="0 of model edu free"):
        rig.create("right", 1, model="edu")
    with pytest.raises(NoGpuAvailable, match=f"{EDU} is held by VM left"):
        rig.create("right", 1, model="edu", host="local")
    # left is not in the ledger (its create died right there): doctor calls the row stranded, the repair drops it.
    assert [r.address for r in stranded_gpus(rig.ctx)] == [EDU]
    repair(rig.ctx)
    assert rig.bindings() == {} and passthrough.owners(ledger, "local") == {}
    rig.create("right", 1, model="edu")
    assert rig.bindings() == {EDU: ("right", "bound")}


def test_a_bind_that_fails_halfway_leaves_every_device_and_the_ledger_as_they_were(rig: Rig) -> None:
    before = rig.fake.snapshot()
    rig.kernel.ignore_probe.add(AUDIO)  # vfio-pci never claims the audio function
    with pytest.raises(BindError):
        rig.create("half", 1)
    assert rig.fake.snapshot() == before
    assert rig.bindings() == {} and rig.ctx.ledger.vms.all() == []
    assert not rig.ctx.paths.vm_dir("half").exists()


def test_placement_and_admission_count_gpus_before_anything_is_bound(rig: Rig) -> None:
    before = rig.fake.snapshot()
    with pytest.raises(NoValidHost, match="gpus 5 requested, the largest limit is 4"):
        rig.create("greedy", 5)  # the host has 4 in its inventory
    with pytest.raises(QuotaExceeded, match="gpus"):
        rig.create("greedy", 5, host="local")  # no scheduler: the ledger's admission refuses
    assert rig.fake.snapshot() == before and rig.bindings() == {} and rig.ctx.ledger.vms.all() == []


def test_doctor_repair_returns_devices_a_crash_left_half_moved(rig: Rig) -> None:
    before = rig.fake.snapshot()
    rig.kernel.crash.add((AUDIO, "unbind"))  # hvctl "dies" after the GPU moved, before the audio function did
    with pytest.raises(SimulatedCrash):
        rig.create("crashy", 1)
    rig.kernel.crash.clear()
    assert rig.fake.driver(GPU) == "vfio-pci"  # the crash left it there
    assert rig.bindings()[GPU] == ("crashy", "bound")
    repaired = repair(rig.ctx)
    assert set(repaired.gpus_returned) == {GPU, AUDIO}
    assert rig.fake.snapshot() == before and rig.bindings() == {}


def test_gpu_release_refuses_what_it_must_and_returns_a_gpu_whose_vm_is_gone(rig: Rig) -> None:
    rig.create("keeper", 1)
    with pytest.raises(DeviceNotFound):
        release_address(rig.ctx, rig.ctx.gpu_env, "0000:99:00.0", "local", lambda: {"keeper"})
    with pytest.raises(NotAGpu):
        release_address(rig.ctx, rig.ctx.gpu_env, NIC, "local", lambda: {"keeper"})
    with pytest.raises(Exception, match="not bound by hvctl"):
        release_address(rig.ctx, rig.ctx.gpu_env, IDLE_GPU, "local", set)
    # Stopped (its domain gone behind hvctl's back, say), the VM still keeps its GPU: only destroy releases it.
    rig.ctx.host().guest("keeper").destroy()
    with pytest.raises(Exception, match="held by VM keeper, which keeps it while it exists, running or stopped"):
        release_address(rig.ctx, rig.ctx.gpu_env, GPU, "local", lambda: gpu_keepers(rig.ctx, "local"))
    # A VM hvctl no longer has (its ledger row lost in a crash): the GPU, still on vfio-pci, can be given back.
    rig.ctx.ledger.vms.delete("keeper", "lost")
    done = release_address(rig.ctx, rig.ctx.gpu_env, GPU, "local", lambda: gpu_keepers(rig.ctx, "local"))
    assert set(done.released) == {GPU, AUDIO} and rig.fake.driver(GPU) == "nvidia"
    assert rig.bindings() == {}


def test_a_stopped_gpu_vm_keeps_its_gpus_through_repair_and_a_host_reboot_and_starts_again(rig: Rig) -> None:
    before = rig.fake.snapshot()
    rig.create("sleeper", 1)
    stop(rig.ctx, "sleeper", timeout=5)
    assert rig.ctx.ledger.vms.get("sleeper").state == "stopped"
    assert repair(rig.ctx).gpus_returned == ()  # a stopped VM's GPUs are not stranded
    assert rig.bindings() == {GPU: ("sleeper", "bound"), AUDIO: ("sleeper", "bound")}
    assert rig.ctx.ledger.host_usage("local").gpus == 1  # still allocated to it
    # The host reboots: the devices come back on their own drivers; the ledger still gives them to the VM.
    for address in (GPU, AUDIO):
        rig.fake.link_driver(address, before[address][0])
    assert rig.fake.driver(GPU) == "nvidia"
    rig.start("sleeper")
    assert rig.fake.driver(GPU) == "vfio-pci" and rig.fake.driver(AUDIO) == "vfio-pci"
    assert rig.ctx.ledger.vms.get("sleeper").state == "running"
    assert rig.bindings() == {GPU: ("sleeper", "bound"), AUDIO: ("sleeper", "bound")}
    destroy(rig.ctx, "sleeper")
    assert rig.fake.snapshot() == before and rig.bindings() == {}


def test_doctor_repair_json_reports_what_it_repaired_with_the_checks(rig: Rig) -> None:
    result = hvctl_cli(rig.state, "test:///default", "doctor", "--repair", "--json")
    data = json.loads(result.stdout)
    assert data["repaired"] == {"gpus_returned": [], "operations": [], "gpus_revived": [], "gpus_unreachable": {},
                                "vxlan": []}
    assert {c["name"] for c in data["checks"]} >= {"ledger", "libvirtd", "gpu bindings"}
    plain = json.loads(hvctl_cli(rig.state, "test:///default", "doctor", "--json").stdout)
    assert isinstance(plain, list)  # without --repair, the shape scripts already parse


def _create_then_get_killed(rig: Rig, step: str) -> None:
    """In a forked child: create a GPU VM with the crash hook set, so that hvctl SIGKILLs this process right after
    ``step``. The fake kernel's state is the fake sysfs tree on disk and the ledger is SQLite, so what the child did
    outlives it; the test driver's domain does not (it lives in the child's memory)."""
    import os

    from hvctl.ops.intent import CRASH_ENV

    os.environ[CRASH_ENV] = f"create.{step}"
    child_ctx = Context(state_dir=rig.state, uri="test:///default", gpu_env=rig.ctx.gpu_env)
    rig.create("killed", 1, ctx=child_ctx)
    os._exit(3)  # not killed: the step was never reached


@pytest.mark.parametrize("step", ["reserved", "files", "defined", "started", "ready"])
def test_a_gpu_create_killed_after_any_step_is_rolled_back_and_its_devices_go_home(rig: Rig, step: str) -> None:
    """The GPU rows of the crash matrix: SIGKILL right after each step of `create --gpus 1` (the HVCTL_CRASH_AFTER
    hook, no timing), then `doctor --repair`: the interrupted create is rolled back, the GPU and its audio function
    are on their host drivers again, and no VM, binding, claim, operation or file is left. (The domain is not
    checked here: the test driver keeps it in the killed process; tests/functional/test_vm_crash.py kills creates of
    real guests.)"""
    import multiprocessing
    import signal

    before = rig.fake.snapshot()
    child = multiprocessing.get_context("fork").Process(target=_create_then_get_killed, args=(rig, step))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL, f"create.{step}: exit {child.exitcode}"
    if step != "reserved":  # from "files" on, the devices were claimed and bound before the step was recorded
        assert rig.fake.driver(GPU) == "vfio-pci" and rig.bindings()[GPU] == ("killed", "bound")
    repaired = repair(rig.ctx)
    (done,) = repaired.operations
    assert done.outcome == "rolled back on local", done
    assert rig.fake.snapshot() == before and rig.bindings() == {}
    assert rig.ctx.ledger.vms.all() == [] and rig.ctx.ledger.operations.all() == []
    assert not rig.ctx.paths.vm_dir("killed").exists()
    print(f"\n| create --gpus 1 (fake sysfs) | {step} | {done.outcome}, its devices back on their host drivers "
          "| gone |")


def test_a_gpu_that_stops_answering_after_release_needs_a_host_reboot_and_is_not_placed_again(rig: Rig) -> None:
    """The fake kernel's device falls off the bus when its release resets it (config space reads all ones, the
    cached vendor file does not change). A fake: no GPU can fail a reset here."""
    from hvctl.ops.doctor import repair
    from hvctl.ops.gpus import list_gpus

    rig.create("gpu-vm", 1)
    listed = {g.address: g for g in list_gpus(rig.fake.sys).gpus}
    assert listed[GPU].reset_method == ("flr", "bus") and listed[GPU].health == "ok"
    rig.fake.fall_off_the_bus(GPU)
    destroy(rig.ctx, "gpu-vm")
    health = rig.ctx.ledger.gpus.health("local")
    assert list(health) == [GPU] and health[GPU].state == "needs-host-reboot"
    assert "0xffff" in health[GPU].reason
    assert "gpu.needs-host-reboot" in [e.kind for e in rig.ctx.ledger.events.recent(None, 50)]
    from hvctl.ops.doctor import run_checks

    (check,) = [c for c in run_checks(rig.ctx) if c.name == "gpu health"]
    assert not check.ok and GPU in check.detail and "reboot the host" in (check.hint or "")
    # Neither the create path nor the scheduler's inventory counts it: the next GPU VM gets another device.
    rig.create("next", 1)
    assert rig.bindings().get(GPU) is None and GPU not in {a for a, (vm, _) in rig.bindings().items() if vm}
    shown = {g.address: g for g in list_gpus(rig.fake.sys, health=rig.ctx.ledger.gpus.health("local")).gpus}
    assert shown[GPU].health == "needs-host-reboot" and not shown[GPU].passable
    # A host reboot brings it back; doctor --repair sees it answer and places it again.
    (rig.fake.device_dir(GPU) / "config").write_bytes((0x10DE).to_bytes(2, "little") + bytes(62))
    assert repair(rig.ctx).gpus_revived == (GPU,) and rig.ctx.ledger.gpus.health("local") == {}


def test_gpus_held_by_a_vm_are_not_free_in_the_schedulers_inventory(rig: Rig) -> None:
    """The inventory rows never carried an owner, so every GPU counted as free for its model (issue 17)."""
    from hvctl.placement import inventory

    def free() -> dict[str, int]:
        return dict(inventory(rig.ctx.ledger, rig.ctx.policy, rig.ctx.ledger.hosts.get("local")).gpu_models)

    before = free()
    assert before.get("edu", 0) >= 1, before
    rig.create("holder", 1, model="edu")
    after = free()
    assert after.get("edu", 0) == before["edu"] - 1
    assert {k: v for k, v in after.items() if k != "edu"} == {k: v for k, v in before.items() if k != "edu"}
    destroy(rig.ctx, "holder")
    assert free() == before
