"""One incarnation of a VM on one host: the object every boot path (create, checkpoint-migration) builds once.

An incarnation is a spec on a host, with its files somewhere that host can read them (``Storage``), the secrets
its seed carries (``GuestSecrets``), an SSH forward port and maybe GPUs. ``boot`` makes its files, defines and
starts the domain, and waits until the guest (and its agent) says it is up, every step pushed on the caller's undo.

Two kinds of storage:
- ``LocalStorage``: files in this machine's state dir, for a host that shares this machine's filesystem;
- ``pooled.PoolStorage``: volumes in the host's storage pool, made and read through libvirt alone.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from hvctl.agent_client import AgentClient, AgentError
from hvctl.console import ConsoleSource, console_size, console_tail, wait_for_ready
from hvctl.context import Context
from hvctl.designer import BootArtifacts, VMAllocation, design, nic_mac
from hvctl.errors import AlreadyExists, GuestTimeout, HypervisorError, ImageError
from hvctl.host import DomainState, Guest
from hvctl.ledger import VMPaths
from hvctl.ops import Say, Undo
from hvctl.ops.target import Target
from hvctl.passthrough import GpuAllocation
from hvctl.paths import VMFiles, make_private_dir
from hvctl.seed import KeyPair, build_seed, generate_ed25519, new_agent_token, operator_key, public_key_of
from hvctl.spec import VMSpec
from images.store import Image

DEFAULT_BOOT_TIMEOUT = 120.0
_NO_MEMLOCK = "cannot limit locked memory"
# What QEMU says when its user-mode network cannot bind a hostfwd port (QEMU 7.2's net/slirp.c).
HOSTFWD_REFUSED = "Could not set up host forwarding rule"
PORT_ATTEMPTS = 5


@dataclass(frozen=True)
class GuestSecrets:
    """What a new incarnation's seed tells it: who may log in as root, its own SSH host key, its agent token."""

    authorized: tuple[str, ...]
    host_key: KeyPair
    token: str

    @classmethod
    def fresh(cls, ctx: Context, spec: VMSpec) -> GuestSecrets:
        return cls(tuple(authorized_keys_for(ctx, spec)), generate_ed25519(f"hvctl-host-{spec.name}"),
                   new_agent_token())

    def write_seed(self, path: Path, spec: VMSpec) -> None:
        build_seed(path, spec.name, list(self.authorized), self.host_key, self.token,
                   (nic_mac(spec.name), spec.network) if spec.network else None)


def authorized_keys_for(ctx: Context, spec: VMSpec) -> list[str]:
    """The keys a VM's root account accepts: its tenant's, and hvctl's operator key unless the spec declines it."""
    operator = [public_key_of(operator_key(ctx.paths.keys))] if spec.operator_key else []
    return operator + [k for _, k in ctx.ledger.keys.all(spec.tenant)]


@dataclass(frozen=True)
class BootOptions:
    timeout: float = DEFAULT_BOOT_TIMEOUT
    extra_cmdline: tuple[str, ...] = ()
    extra_qemu_args: tuple[str, ...] = ()
    # False (create --no-wait): return once QEMU runs, without waiting for the guest or its agent.
    wait: bool = True


class Storage(Protocol):
    """Where one incarnation's files live, named as paths on the VM's host, and how they are made there."""

    @property
    def paths(self) -> VMPaths: ...

    def artifacts(self, image: Image) -> BootArtifacts: ...

    def console(self) -> Path | ConsoleSource: ...

    def make(self, spec: VMSpec, secrets: GuestSecrets, undo: Undo, say: Say) -> None:
        """The overlay disk and the seed, each pushed on ``undo``."""


@dataclass(frozen=True)
class LocalStorage:
    """An incarnation's files in this machine's state dir: a private directory with the overlay (backed by the
    image's base disk in the image store), the seed, the console log and the agent socket."""

    files: VMFiles
    image: Image
    qemu_gid: int | None

    @property
    def paths(self) -> VMPaths:
        f = self.files
        return VMPaths(base_disk=self.image.base_disk, overlay=f.overlay, seed=f.seed, console_log=f.console_log,
                       agent_socket=f.agent_socket)

    def artifacts(self, image: Image) -> BootArtifacts:
        return BootArtifacts(kernel=image.kernel, initrd=image.initrd, root_on_disk=image.kind.value != "initramfs",
                             firmware=image.firmware)

    def console(self) -> Path:
        return self.files.console_log

    def make(self, spec: VMSpec, secrets: GuestSecrets, undo: Undo, say: Say) -> None:
        files, image = self.files, self.image
        if files.overlay.exists():
            raise AlreadyExists(f"disk path {files.overlay} already exists", hint="remove it or pick another name")
        made_dir = not files.dir.exists()
        make_private_dir(files.dir, self.qemu_gid, exist_ok=True)
        if made_dir:
            undo.push("remove the VM directory", lambda: shutil.rmtree(files.dir, ignore_errors=True))
        say(f"creating {spec.disk_gib} GiB overlay on {image.name}@{image.content_hash[:8]}")
        make_overlay(image.base_disk, files.overlay, spec.disk_gib)
        undo.push("remove the overlay disk", lambda: files.overlay.unlink(missing_ok=True))
        say("writing the seed: hostname, SSH keys, the VM's own host key, agent token")
        secrets.write_seed(files.seed, spec)
        undo.push("remove the seed", lambda: files.seed.unlink(missing_ok=True))


@dataclass(frozen=True)
class Incarnation:
    """One incarnation of ``spec``, booted from ``image`` on ``target``. The caller holds its capacity (a ledger
    row, or a migration's reservation) and its port."""

    spec: VMSpec
    image: Image
    target: Target
    storage: Storage
    ssh_port: int
    secrets: GuestSecrets
    gpus: GpuAllocation | None = None

    def ledger_columns(self) -> dict[str, str]:
        """What a migration that gives the VM this incarnation changes in its ledger row."""
        p = self.storage.paths
        return {"overlay": str(p.overlay), "console_log": str(p.console_log), "agent_socket": str(p.agent_socket),
                "seed": str(p.seed), "agent_token": self.secrets.token,
                "host_pubkey": self.secrets.host_key.public_line}


def boot(ctx: Context, inc: Incarnation, options: BootOptions, undo: Undo, say: Say,
         move_port: Callable[[int], int] | None = None, step: Callable[..., None] | None = None) -> str:
    """Files, seed, domain, boot, readiness, agent: every step pushed on ``undo``. Returns how it went.

    ``step`` (an operation's ``Operation.step``) records "files", "defined" with the domain's UUID (again if the
    domain is defined again) and "started", so that a crash can be rolled back by what was made.

    ``move_port``: when QEMU cannot bind the SSH forward port on the host (something there holds it), it is called
    with that port and returns another, already recorded; the domain is defined again with it. Without it, a taken
    port fails the boot."""
    spec, storage, where = inc.spec, inc.storage, inc.target.name
    record = step or (lambda *_a, **_k: None)
    storage.make(spec, inc.secrets, undo, say)
    record("files")

    say(f"defining domain on {where} ({inc.target.caps.accel.value}, q35, {spec.vcpus} vCPU, "
        f"{spec.memory_mib} MiB)")
    domain = _Domain(inc, options, record)
    # The latest definition, not the first: if this boot defines the domain again, the undo acts on that one.
    undo.push("undefine the domain", lambda: domain.guest.undefine())
    say("starting")
    console = storage.console()
    offset = console_size(console)  # the log is appended to: only what this boot prints counts
    domain.start(ctx, move_port, say)
    guest = domain.guest
    undo.push("destroy the domain", guest.destroy)
    record("started")
    if not options.wait:
        return f"started; not waited for (--no-wait){domain.note}"

    say("waiting for the guest to report ready")
    started = time.monotonic()
    # A console read through libvirt costs a round trip: poll it less often than a local file.
    poll = 0.05 if isinstance(console, Path) else 0.5
    line, waited = wait_for_ready(spec.name, console, options.timeout,
                                  lambda: guest.state() is DomainState.RUNNING, poll=poll, offset=offset)
    message = f"guest up after {waited:.2f} s: {line}{domain.note}"
    if inc.image.agent:
        say("waiting for the agent")
        wait_for_agent(ctx.agent(where, spec.name, inc.secrets.token), spec.name, console,
                       options.timeout - (time.monotonic() - started))
        message += f"; agent ready after {time.monotonic() - started:.2f} s"
    return message


class _Domain:
    """An incarnation's domain as one boot defines it, and defines again with what a refused start taught: a host
    that cannot set memory hard limits, an SSH forward port something there holds."""

    def __init__(self, inc: Incarnation, options: BootOptions, record: Callable[..., None]) -> None:
        self.inc, self.options, self.record = inc, options, record
        self.caps = inc.target.caps
        self.port = inc.ssh_port
        self.note = ""  # what the boot's message adds about how it started
        self.guest = self._define()

    def _define(self) -> Guest:
        inc, paths = self.inc, self.inc.storage.paths
        domain = design(
            inc.spec, self.caps, inc.storage.artifacts(inc.image),
            VMAllocation(overlay=paths.overlay, console_log=paths.console_log, agent_socket=paths.agent_socket,
                         ssh_port=self.port, ssh_bind_address=str(inc.spec.ssh_bind), seed=paths.seed,
                         hostdevs=inc.gpus.hostdevs if inc.gpus else (),
                         pcihole64_kib=inc.gpus.pcihole64_kib if inc.gpus else None),
            self.options.extra_cmdline,
            self.options.extra_qemu_args,
        )
        defined = inc.target.host.define(domain.to_xml())
        self.record("defined", uuid=defined.uuid)
        return defined

    def start(self, ctx: Context, move_port: Callable[[int], int] | None, say: Say) -> None:
        where = self.inc.target.name
        for _ in range(PORT_ATTEMPTS + 1):
            try:
                self.guest.start()
                return
            except HypervisorError as exc:
                if _NO_MEMLOCK in exc.message and self.caps.memory_limits:
                    # A libvirtd without CAP_SYS_RESOURCE cannot raise QEMU's locked-memory limit, and refuses every
                    # domain with a memory hard limit. This machine's is checked before designing; another host's
                    # only tells here.
                    say(f"host {where} cannot set memory hard limits; starting without one")
                    ctx.ledger.hosts.record_no_memory_limits(where)  # the next boot there knows it from the start
                    self.caps = dataclasses.replace(self.caps, memory_limits=False)
                    self.note = f"; no memory hard limit (host {where}'s libvirtd may not set one)"
                elif HOSTFWD_REFUSED in exc.message and move_port is not None:
                    refused, self.port = self.port, move_port(self.port)
                    say(f"port {refused} is taken on host {where}; moving the SSH forward to {self.port}")
                else:
                    raise
            self.guest.undefine()
            self.guest = self._define()
        raise HypervisorError(f"{self.inc.spec.name} could not bind an SSH forward port on host {where} in "
                              f"{PORT_ATTEMPTS} tries", hint="something there is binding ports in hvctl's range")


def wait_for_agent(agent: AgentClient, name: str, console_log: Path | ConsoleSource, timeout: float) -> None:
    """Agent-ready: the agent answered a ping with this VM's token. A timeout carries the console tail."""
    try:
        agent.wait_ready(max(timeout, 1.0))
    except AgentError as exc:
        raise GuestTimeout(f"the agent of {name} never answered: {exc.message}",
                           console_tail=console_tail(console_log)) from None


def make_overlay(base: Path, overlay: Path, size_gib: int) -> None:
    # umask 077: the overlay is born 0600; libvirt's DAC driver hands it to QEMU's user while the VM runs.
    result = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay), f"{size_gib}G"],
        capture_output=True, text=True, umask=0o077,
    )
    if result.returncode != 0:
        overlay.unlink(missing_ok=True)
        raise ImageError(f"cannot create overlay {overlay}: {result.stderr.strip()}")
