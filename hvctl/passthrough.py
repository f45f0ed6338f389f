"""Whole GPUs for VMs: choose passable devices on a host, bind them to vfio-pci with the ledger as the binder's
journal, and give them back.

hvctl binds devices itself (hostdev ``managed='no'``) so that every step is journaled before it is attempted and a
crash at any point can be finished or undone by ``hvctl doctor --repair``. On the machine hvctl runs on
(``Context.is_this_machine``) devices are read and moved through sysfs (vfio's ``PciSysfs`` and ``VfioBinder``);
on any other host through that host's libvirt node-device API (``hvctl.host.devices``). Both give the same
inventory to the same choice and viability rules, and both binders keep the same journal in the ledger.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from hvctl.context import Context, GpuEnvironment
from hvctl.domain import PciAddress, PciHostdev
from hvctl.errors import HvctlError, InvalidSpec
from hvctl.ledger import GpuBinding, InventoryGpu, Ledger
from hvctl.ops import Undo
from hvctl.ops.gpus import unpassable
from hvctl.spec import VMSpec
from vfio import (
    Bar,
    Binding,
    BoundDevice,
    Gpu,
    JournalEntry,
    PciDevice,
    PciInventory,
    PciSysfs,
    VfioBinder,
    pcihole64_kib,
)
from vfio.binding import TERMINAL_STATES, DeviceBinder
from vfio.sysfs import IORESOURCE_MEM, IORESOURCE_MEM_64, IORESOURCE_PREFETCH

# Binding-journal states in which a device belongs to no VM: given back. "original" is terminal for the device (it
# is on its host driver) but not free: the binder writes it as a bind begins, before the device moves, and a
# concurrent create that took it for free would claim and bind the same device a second time.
RELEASED_STATES = TERMINAL_STATES - {"original"}


class NoGpuAvailable(HvctlError):
    exit_code = 19


@dataclass(frozen=True)
class GpuAllocation:
    binding: Binding
    gpus: tuple[str, ...]  # primary addresses
    hostdevs: tuple[PciHostdev, ...]
    pcihole64_kib: int | None
    # Models whose BAR sizes neither the host (libvirt does not report them) nor the policy (mmio64_gib) gave: the
    # guest gets QEMU's default 64-bit hole, and create says so.
    unsized: tuple[str, ...] = ()


class LedgerJournal:
    """The vfio binder's journal, persisted in the ledger: one row per device, its last transition."""

    def __init__(self, ledger: Ledger, host: str, vm: str | None) -> None:
        self.ledger, self.host, self.vm = ledger, host, vm

    def record(self, address: str, step: str, original_driver: str | None, state: str) -> None:
        self.ledger.gpus.record_step(self.host, address, self.vm, step, original_driver, state)


def accelerator_allowlist(ctx: Context) -> tuple[tuple[int, int], ...]:
    return tuple((a.vendor, a.device) for a in ctx.policy.accelerators.values())


def inventory_rows(ctx: Context, devices: PciInventory) -> tuple[InventoryGpu, ...]:
    """A host's GPUs (and allowlisted accelerators) as the ledger records them at `host add`: address, model, ids."""
    return tuple(InventoryGpu(g.address, ctx.policy.gpu_model(g.primary.vendor, g.primary.device), g.primary.ids)
                 for g in devices.gpus(accelerator_allowlist=accelerator_allowlist(ctx)))


def inventory(ctx: Context, env: GpuEnvironment, host: str) -> PciInventory:
    """``host``'s PCI devices now: this machine's sysfs, or the host's libvirt node devices."""
    if ctx.is_this_machine(host):
        return PciSysfs(env.sysfs_root)
    return ctx.host(host).pci_devices()


def owners(ledger: Ledger, host: str) -> dict[str, str]:
    """Device address → the VM holding it: every device claimed or bound by a VM and not yet given back."""
    return {r.address: r.vm for r in ledger.gpus.bindings(host) if r.state not in RELEASED_STATES and r.vm is not None}


def binder(ctx: Context, env: GpuEnvironment, host: str, vm: str | None) -> DeviceBinder:
    held = owners(ctx.ledger, host)
    journal = LedgerJournal(ctx.ledger, host, vm)

    def owner_of(address: str) -> str | None:
        return held.get(address) if held.get(address) != vm else None

    if not ctx.is_this_machine(host):
        return ctx.host(host).device_binder(journal, owner_of)
    return VfioBinder(PciSysfs(env.sysfs_root), writer=env.writer, journal=journal, users_of=env.users_of,
                      owner_of=owner_of, dev_root=env.dev_root, bind_timeout=env.bind_timeout)


def _matches(ctx: Context, gpu: Gpu, model: str | None) -> bool:
    return model is None or model.lower() == ctx.policy.gpu_model(gpu.primary.vendor, gpu.primary.device)


def choose(ctx: Context, env: GpuEnvironment, spec: VMSpec, host: str) -> list[tuple[Gpu, list[str]]]:
    """``spec.gpus.count`` passable GPUs of the requested model, each with the addresses its bind moves; or a
    refusal that says, GPU by GPU, why none of the others would do."""
    pci = inventory(ctx, env, host)
    held = owners(ctx.ledger, host)
    unhealthy = ctx.ledger.gpus.health(host)
    chosen: list[tuple[Gpu, list[str]]] = []
    why_not: list[str] = []
    allowlist = accelerator_allowlist(ctx)
    for gpu in pci.gpus(accelerator_allowlist=allowlist):
        if len(chosen) == spec.gpus.count:
            break
        if not _matches(ctx, gpu, spec.gpus.model):
            continue
        owner = next((held[d.address] for d in gpu.functions if d.address in held), None)
        if owner is not None:
            why_not.append(f"{gpu.address} is held by VM {owner}")
            continue
        why, functions = unpassable(pci, gpu, allowlist, unhealthy)
        if why is not None:
            why_not.append(f"{gpu.address}: {why}")
            continue
        chosen.append((gpu, [d.address for d in functions]))
    if len(chosen) < spec.gpus.count:
        model = f" of model {spec.gpus.model}" if spec.gpus.model else ""
        raise NoGpuAvailable(f"{spec.gpus.count} GPU(s){model} requested on host {host}, {len(chosen)} passable "
                             f"and free" + (f": {'; '.join(why_not)}" if why_not else ""),
                             hint="`hvctl gpu list` shows every GPU and why it is not passable")
    return chosen


def allocate(ctx: Context, env: GpuEnvironment, spec: VMSpec, host: str, undo: Undo) -> GpuAllocation | None:
    """Bind ``spec``'s GPUs for a VM on ``host``, registering their release on ``undo``. A bind that fails is
    rolled back by the binder and leaves no ledger rows."""
    if not spec.gpus.count:
        return None
    chosen = choose(ctx, env, spec, host)
    addresses = [a for _, plan in chosen for a in plan]
    # Claimed in one ledger transaction first: a concurrent create that chose the same device is refused here.
    ctx.ledger.gpus.claim(host, spec.name, addresses, RELEASED_STATES)
    vfio = binder(ctx, env, host, spec.name)
    try:
        binding = vfio.bind(addresses)
    except BaseException:
        ctx.ledger.gpus.unclaim(host, spec.name)  # devices the bind never reached
        _forget_settled(ctx.ledger, host, addresses)  # rolled back: every device is where it started
        raise
    undo.push("give the GPUs back to their host drivers", lambda: release_binding(ctx, env, host, binding))
    functions = [d for gpu, _ in chosen for d in gpu.functions]
    sized = [sized_by_policy(ctx, d) for d in functions]
    return GpuAllocation(
        binding=binding,
        gpus=tuple(gpu.address for gpu, _ in chosen),
        hostdevs=tuple(PciHostdev(PciAddress.parse(d.address)) for d in functions),
        pcihole64_kib=pcihole64_kib(sized),
        unsized=tuple(sorted({ctx.policy.gpu_model(gpu.primary.vendor, gpu.primary.device) for gpu, _ in chosen
                              if not any(d.bars for d in sized if d.slot == gpu.primary.slot)})),
    )


_MEM64_PREFETCH = IORESOURCE_MEM | IORESOURCE_MEM_64 | IORESOURCE_PREFETCH


def sized_by_policy(ctx: Context, device: PciDevice) -> PciDevice:
    """A device as the 64-bit hole is sized from it. sysfs gives every BAR; libvirt's node-device XML gives none,
    so a remote device's window is the policy's ``mmio64_gib`` for its model (one BAR of that size), and with no
    such fact the hole stays at QEMU's default."""
    if device.bars:
        return device
    model = ctx.policy.accelerator(device.vendor, device.device)
    if model is None or model.mmio64_gib is None:
        return device
    return dataclasses.replace(device, bars=(Bar(0, 0, model.mmio64_gib << 30, _MEM64_PREFETCH),))


NEEDS_HOST_REBOOT = "needs-host-reboot"


def release_binding(ctx: Context, env: GpuEnvironment, host: str, binding: Binding) -> None:
    binder(ctx, env, host, None).release(binding)
    _forget_settled(ctx.ledger, host, binding.addresses)
    check_answers(ctx, env, host, binding.addresses)


def check_answers(ctx: Context, env: GpuEnvironment, host: str, addresses: Iterable[str]) -> list[str]:
    """After a release: each device must still answer on the bus. One whose config space reads 0xffff (it fell off
    after a failed reset, the classic case being a GPU without a working FLR) is marked needs-host-reboot in the
    ledger, and neither the scheduler nor a create will place it until it answers again. Returns the dead ones."""
    pci = inventory(ctx, env, host)
    dead = []
    for address in addresses:
        if pci.live_vendor_id(address) == 0xFFFF:
            methods = " ".join(pci.device(address).reset_method) or "none the kernel reports"
            ctx.ledger.gpus.mark_unhealthy(host, address, NEEDS_HOST_REBOOT,
                                          "its config space reads 0xffff after it was released (reset methods: "
                                          f"{methods}); it is not placed again until a host reboot brings it back")
            dead.append(address)
    return dead


def revive(ctx: Context, env: GpuEnvironment, host: str) -> list[str]:
    """``doctor --repair``: devices marked needs-host-reboot that answer again (the host was rebooted) are placed
    again. Returns them."""
    pci = inventory(ctx, env, host)
    back = []
    for address in ctx.ledger.gpus.health(host):
        vendor = pci.live_vendor_id(address)
        if vendor is not None and vendor != 0xFFFF:
            ctx.ledger.gpus.clear_health(host, address, "it answers on the bus again")
            back.append(address)
    return back


def release_vm(ctx: Context, env: GpuEnvironment, vm: str, host: str) -> list[str]:
    """After the VM's domain is gone: every device it held back to its original driver. Returns the addresses."""
    ctx.ledger.gpus.unclaim(host, vm)  # claimed, never moved: nothing to give back
    rows = ctx.ledger.gpus.bindings(host, vm)
    if not rows:
        return []
    pci = inventory(ctx, env, host)
    binding = Binding(devices=tuple(BoundDevice(r.address, pci.device(r.address).iommu_group or -1,
                                                r.original_driver, None) for r in rows))
    release_binding(ctx, env, host, binding)
    return [r.address for r in rows]


def rebind_vm(ctx: Context, env: GpuEnvironment, vm: str, host: str) -> list[str]:
    """Before a stopped VM starts: the devices it holds that are no longer on vfio-pci (a host reboot gave them
    back to their drivers) are bound again. Returns the addresses that moved; a bind that fails leaves them all
    where they were and raises."""
    rows = ctx.ledger.gpus.bindings(host, vm)
    pci = inventory(ctx, env, host)
    stray = [r.address for r in rows if pci.device(r.address).driver != "vfio-pci"]
    if stray:
        binder(ctx, env, host, vm).bind([r.address for r in rows])
    return stray


@dataclass(frozen=True)
class Released:
    """What `hvctl gpu release` gave back: the GPU, every function moved back to its host driver, the VMs that
    had held them, and the functions that no longer answer (``needs_host_reboot``)."""

    gpu: str
    released: tuple[str, ...]
    vms: tuple[str, ...]
    needs_host_reboot: tuple[str, ...]

    def as_json(self) -> dict[str, Any]:
        return {"gpu": self.gpu, "released": list(self.released), "vms": list(self.vms),
                "needs_host_reboot": list(self.needs_host_reboot)}


def release_address(ctx: Context, env: GpuEnvironment, address: str, host: str,
                    running: Callable[[], set[str]]) -> Released:
    """``hvctl gpu release ADDR``: give back a GPU (all its functions) whose VM hvctl no longer has (its ledger row
    is gone, as after a crash). ``running`` names the VMs that keep their GPUs, the host's VMs in the ledger,
    running or stopped: only destroy releases theirs. It is asked only once the address is known to be bound."""
    pci = inventory(ctx, env, host)
    gpu = pci.gpu(address, accelerator_allowlist=accelerator_allowlist(ctx))  # unknown, or not a GPU: refused
    rows = {r.address: r for r in ctx.ledger.gpus.bindings(host)}
    held = [rows[d.address] for d in gpu.functions if d.address in rows]
    if not held:
        raise InvalidSpec(f"{gpu.address} is not bound by hvctl; nothing to release")
    vms = {r.vm for r in held if r.vm}
    busy = sorted(vms & running())
    if busy:
        raise InvalidSpec(f"{gpu.address} is held by VM {busy[0]}, which keeps it while it exists, running or "
                          "stopped", hint=f"hvctl destroy {busy[0]} releases it")
    # Driverless group mates pinned with it belong to the same VM's bind.
    extra = [r for r in rows.values() if r.vm in vms and r.address not in {h.address for h in held}]
    entries = [JournalEntry(r.address, r.step, r.original_driver, "bound") for r in (*held, *extra)]
    done = binder(ctx, env, host, None).recover(entries)
    _forget_settled(ctx.ledger, host, [e.address for e in entries])
    dead = check_answers(ctx, env, host, done)
    return Released(gpu.address, tuple(done), tuple(sorted(vms)), tuple(dead))


def repair(ctx: Context, env: GpuEnvironment, host: str, running: set[str]) -> list[str]:
    """``hvctl doctor --repair``: finish what a crash interrupted. Devices of VMs hvctl no longer has (``running``:
    the host's VMs in the ledger, which keep theirs even when stopped), in any state short of
    back-with-their-driver, are returned; rows that say "back" are dropped."""
    for vm in {r.vm for r in ctx.ledger.gpus.bindings(host) if r.vm is not None and r.vm not in running}:
        ctx.ledger.gpus.unclaim(host, vm)  # claims of a create that never bound: the devices never moved
    rows = ctx.ledger.gpus.bindings(host)
    pending = [r for r in rows if r.state not in TERMINAL_STATES and r.vm not in running]
    done = binder(ctx, env, host, None).recover(
        JournalEntry(r.address, r.step, r.original_driver, r.state) for r in pending)
    _forget_settled(ctx.ledger, host, [r.address for r in rows if r.vm not in running])
    check_answers(ctx, env, host, done)
    return done


def _forget_settled(ledger: Ledger, host: str, addresses: Iterable[str]) -> None:
    wanted = set(addresses)
    for row in ledger.gpus.bindings(host):
        if row.address in wanted and row.state in TERMINAL_STATES:
            ledger.gpus.forget(host, row.address)


def gpu_keepers(ctx: Context, host: str) -> set[str]:
    """The VMs on ``host`` that keep their GPUs: every one the ledger has, running or stopped. Only destroy
    releases a VM's GPUs; a stopped VM's are rebound at its start if a host reboot gave them back."""
    return {vm.name for vm in ctx.ledger.vms.all(host=host)}


def stranded_gpus(ctx: Context) -> list[GpuBinding]:
    """Devices hvctl moved (or began to move) for a VM it no longer has: left by a crash or a failed release."""
    stranded = []
    for host in sorted({r.host for r in ctx.ledger.gpus.bindings()}):
        keepers = gpu_keepers(ctx, host)
        stranded += [r for r in ctx.ledger.gpus.bindings(host)
                     if r.state not in RELEASED_STATES and r.vm not in keepers]
    return stranded
