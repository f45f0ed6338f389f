"""hvctl adopt: take an orphan back into the ledger, as it is.

An orphan is a domain that carries hvctl's metadata on some host while no VM in the ledger is it: a ledger restored
from an older backup, a row deleted by hand, a state dir that was lost. Everything the ledger keeps about a VM can
be read back from what hvctl left on the host: the request (the domain's hvctl metadata holds the whole spec), the
domain's UUID, its SSH forward port (the QEMU command line), its files (the domain's disks, console log and agent
channel, and the overlay's backing file), and, from its seed, the agent token and the VM's SSH host key. Nothing on
the host is changed; the one write is the ledger row, admitted against the tenant's quota and the host's capacity as
a create is. A domain with passthrough GPUs is refused: which devices the VM may keep cannot be proven from the
domain alone.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from pydantic import ValidationError

from guest.validation import describe
from hvctl.context import Context
from hvctl.domain import Disk, Domain, PciHostdev, SerialConsole, UnixChannel
from hvctl.errors import AlreadyExists, HvctlError, NotFound
from hvctl.host import DomainState, Pool
from hvctl.ledger import VMPaths, VMRecord
from hvctl.ops import Say, pooled, quiet
from hvctl.ops.intent import operation
from hvctl.placement import admission_for
from hvctl.seed import read_seed_file
from hvctl.spec import VMSpec

_STATES = {DomainState.RUNNING: "running", DomainState.SHUTOFF: "stopped", DomainState.CRASHED: "stopped"}


def adopt(ctx: Context, name: str, host_name: str, say: Say = quiet) -> VMRecord:
    if name in {vm.name for vm in ctx.ledger.vms.all()}:
        raise AlreadyExists(f"{name} is already in the ledger, so it is not an orphan")
    with operation(ctx, name, "adopt", target=host_name, say=say):
        host = ctx.host(host_name)
        guest = host.find_guest(name)
        if guest is None:
            raise NotFound(f"host {host_name} has no domain {name!r}", hint="`hvctl list` shows orphans")
        if not guest.made_by_hvctl():
            raise HvctlError(f"the domain {name} on host {host_name} was not made by hvctl (no hvctl metadata); "
                             "hvctl does not adopt it")
        state = _STATES.get(guest.state())
        if state is None:
            raise HvctlError(f"the domain {name} on host {host_name} is {guest.state().value}; adopt it when it is "
                             "running or shut off")
        say("reading the domain")
        domain = Domain.from_xml(guest.xml())
        spec = _spec_of(domain, host_name)
        if any(isinstance(d, PciHostdev) for d in domain.devices):
            raise HvctlError(f"{name} has passthrough devices; adopting a GPU VM is not supported (hvctl cannot tell "
                             "from the domain which devices are still its own)",
                             hint=f"`hvctl destroy {name} --orphan --host {host_name}` removes it")
        if domain.network is None:
            raise HvctlError(f"the domain {name} has no hvctl SSH forward in its QEMU command line")
        # Where its files are: this machine's state dir, or (any other host) that host's hvctl pool.
        pool = None if ctx.is_this_machine(host_name) else pooled.open_files(host, name).pool
        paths = _paths_of(domain, pool)
        say("reading the agent token and the host key from the seed")
        token, pubkey = _secrets_of(paths.seed, pool)
        policy = ctx.policy
        ctx.capabilities(host_name)  # the host's capacity, probed (cached) for the admission below
        admission = admission_for(ctx.ledger, policy, spec.tenant, host_name)
        say("recording it in the ledger")
        return ctx.ledger.vms.adopt(spec, host_name, paths, ssh_port=domain.network.ssh_port, state=state,
                                   domain_uuid=guest.uuid, agent_token=token, host_pubkey=pubkey,
                                   admission=admission)


def _spec_of(domain: Domain, host_name: str) -> VMSpec:
    meta = dict(domain.metadata)
    if "spec" not in meta:
        raise HvctlError(f"the domain {domain.name}'s hvctl metadata has no spec (made by an hvctl too old to adopt)")
    try:
        spec = VMSpec.model_validate(json.loads(meta["spec"]))
    except ValueError as exc:  # not JSON, or a spec pydantic refuses (a ValidationError is a ValueError)
        why = describe(exc) if isinstance(exc, ValidationError) else str(exc).splitlines()[0]
        raise HvctlError(f"the domain {domain.name}'s hvctl metadata holds no valid spec: {why}") from None
    if spec.name != domain.name:
        raise HvctlError(f"the domain {domain.name}'s hvctl metadata describes a VM named {spec.name!r}")
    return spec.model_copy(update={"host": host_name})


def _paths_of(domain: Domain, pool: Pool | None) -> VMPaths:
    disks = [d for d in domain.devices if isinstance(d, Disk)]
    overlays = [d.source for d in disks if not d.readonly and d.fmt == "qcow2"]
    seeds = [d.source for d in disks if d.readonly]
    consoles = [d.path for d in domain.devices if isinstance(d, SerialConsole)]
    channels = [d.path for d in domain.devices if isinstance(d, UnixChannel)]
    if len(overlays) != 1 or len(seeds) != 1 or not consoles or not channels:
        raise HvctlError(f"the domain {domain.name} does not have the devices hvctl gives a VM (one overlay disk, "
                         "a seed, a console log, an agent channel)")
    overlay = overlays[0]
    if pool is None:
        info = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(overlay)], capture_output=True,
                              text=True)
        if info.returncode != 0:
            raise HvctlError(f"cannot read the disk {overlay}: {info.stderr.strip()}")
        found = json.loads(info.stdout)
        backing = found.get("full-backing-filename") or found.get("backing-filename")
    else:
        pool.refresh()
        backing_path = pool.backing(overlay.name)
        backing = str(backing_path) if backing_path else None
    if not backing:
        raise HvctlError(f"the disk {overlay} has no backing image; hvctl made none like that")
    return VMPaths(base_disk=Path(backing), overlay=overlay, seed=seeds[0], console_log=consoles[0],
                   agent_socket=channels[0])


def _secrets_of(seed: Path, pool: Pool | None) -> tuple[str, str]:
    """The agent token and the VM's SSH host public key, from its seed: on this machine the file, on another host
    the seed volume downloaded through libvirt into a private temporary file."""
    if pool is None:
        return _read_secrets(seed)
    with tempfile.TemporaryDirectory(prefix="hvctl-adopt-") as tmp:
        local = Path(tmp) / "seed.iso"
        with open(local, "wb") as sink:
            pool.download(seed.name, sink)
        return _read_secrets(local)


def _read_secrets(seed: Path) -> tuple[str, str]:
    return (read_seed_file(seed, "hvctl/agent_token").decode().strip(),
            read_seed_file(seed, "hvctl/ssh_host_ed25519_key.pub").decode().strip())
