"""What every command needs: the state dir, the ledger, the image store and a connection to the target host.

Each is opened on first use, so a command that only reads the ledger never connects to libvirt.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from hvctl.errors import HostUnreachable, ImageError, InvalidSpec
from hvctl.paths import StateDir

# What a command does not use, it does not import: libvirt, pydantic, the designer and the image store load when a
# command first reaches for them (`hvctl --version` and the CLI's start-up stay fast).
if TYPE_CHECKING:
    from hvctl.agent_client import AgentClient
    from hvctl.designer import HostCapabilities
    from hvctl.domain import Accel
    from hvctl.host import Host
    from hvctl.ledger import HostRecord, Ledger
    from hvctl.policy import Policy
    from images.store import Image, ImageStore
    from vfio import SysfsWriter
    from vfio.binding import UsersOf

DEFAULT_URI = "qemu:///system"
LOCAL_HOST = "local"


def can_limit_memory() -> bool:
    """CAP_SYS_RESOURCE (bit 24) in this process's effective set, standing in for the local libvirtd's."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> 24 & 1)
    except OSError:
        pass
    return True


def resolve_connect(ledger: Ledger, uri: str | None, default_host: str = LOCAL_HOST) -> str:
    """Which registered host ``-c URI`` means. A URI names a host; it never renames one: pointing -c at another
    daemon used to rewrite ``local``'s URI for good, after which destroy asked the wrong daemon, took "not found"
    for "gone" and deleted a running VM's disk. No -c: ``local`` as the ledger has it (made at DEFAULT_URI on first
    use)."""
    hosts = ledger.hosts.all()
    if uri is None:
        if default_host not in {h.name for h in hosts}:
            ledger.hosts.ensure(default_host, DEFAULT_URI)
        return default_host
    named = sorted((h.name for h in hosts if h.uri == uri), key=lambda n: n != default_host)
    if named:
        return named[0]
    if default_host not in {h.name for h in hosts}:
        ledger.hosts.ensure(default_host, uri)
        return default_host
    raise InvalidSpec(f"-c {uri}: no registered host has that URI (host {default_host} is "
                      f"{ledger.hosts.get(default_host).uri})",
                      hint="register it with `hvctl host add NAME URI`, then use --host NAME or -c with its URI")


@dataclass(frozen=True)
class GpuEnvironment:
    """Where this machine's PCI devices are: the real kernel by default; tests point it at a fake tree and kernel."""

    sysfs_root: Path = field(default_factory=lambda: Path(os.environ.get("HVCTL_SYSFS_ROOT", "/sys")))
    dev_root: Path = Path("/dev")
    writer: SysfsWriter | None = None  # None: write the real sysfs
    users_of: UsersOf | None = None  # None: scan /proc for processes holding the device nodes
    bind_timeout: float = 10.0


@dataclass
class Context:
    state_dir: Path
    # -c/--connect: None means the host hvctl acts on by default, `local`, at the URI the ledger has for it.
    uri: str | None = None
    host_name: str = LOCAL_HOST
    policy_path: Path | None = None
    gpu_env: GpuEnvironment = field(default_factory=GpuEnvironment)
    # --wait: how long a command waits for another command's operation on the same VM to end (0: refuse at once).
    lock_wait_s: float = 0.0
    # --ledger: a postgresql:// URL several controllers share; None: the state dir's SQLite file.
    ledger_url: str | None = None
    _hosts: dict[str, Host] = field(default_factory=dict, repr=False)
    _this_machine: dict[str, bool] = field(default_factory=dict, repr=False)

    @property
    def policy_source(self) -> Path:
        """--policy, else the state dir's policy.yaml if an admin installed one, else the shipped default."""
        installed = self.state_dir / "policy.yaml"
        from hvctl.policy import SHIPPED

        return self.policy_path or (installed if installed.is_file() else SHIPPED / "default.yaml")

    @cached_property
    def policy(self) -> Policy:
        from hvctl.policy import load_policy

        return load_policy(self.policy_source)

    @cached_property
    def paths(self) -> StateDir:
        paths = StateDir(self.state_dir)
        paths.ensure()
        return paths

    @cached_property
    def ledger(self) -> Ledger:
        from hvctl.ledger import Ledger

        ledger = Ledger(self.ledger_url or self.paths.ledger)
        self.host_name = resolve_connect(ledger, self.uri, self.host_name)
        return ledger

    @property
    def ledger_location(self) -> str:
        """Where the ledger is, as messages show it: the SQLite file, or the URL without its password."""
        if self.ledger_url is None:
            return str(StateDir(self.state_dir).ledger)
        from hvctl.ledger.postgres import redact

        return redact(self.ledger_url) if self.ledger_url.startswith(("postgresql://", "postgres://")) \
            else self.ledger_url

    @property
    def connected_uri(self) -> str:
        """The URI of the host hvctl acts on by default (``host_name``)."""
        return self.ledger.hosts.get(self.host_name).uri

    @cached_property
    def images(self) -> ImageStore:
        from images.store import ImageStore

        return ImageStore(self.paths.images)

    def host(self, name: str | None = None) -> Host:
        ledger = self.ledger  # resolves -c to a host name first
        name = name or self.host_name
        if name not in self._hosts:
            from hvctl.host import Host

            self._hosts[name] = Host(ledger.hosts.get(name).uri)
        return self._hosts[name]

    def reconnect(self, name: str) -> Host:
        """A new connection to host ``name``, for a long-running command whose connection was closed under it."""
        old = self._hosts.pop(name, None)
        if old is not None:
            with contextlib.suppress(Exception):
                old.close()
        return self.host(name)

    def is_this_machine(self, name: str | None = None) -> bool:
        """Whether host ``name`` is the machine hvctl runs on (``hvctl.host.identity``): decided once per command,
        connecting to the host only when its URI goes over a network."""
        from hvctl.host import identity

        name = name or self.host_name
        if name not in self._this_machine:
            uri = self.ledger.hosts.get(name).uri
            self._this_machine[name] = identity.needs_no_network(uri) or identity.is_this_machine(
                uri, self.host(name).conn, self.local_daemon_uuids())
        return self._this_machine[name]

    def local_daemon_uuids(self) -> list[str]:
        """Host UUIDs of the registered daemons reached over a unix socket: each is on this machine."""
        from hvctl.host import identity

        found = []
        for record in self.ledger.hosts.all():
            if identity.needs_no_network(record.uri) and not record.uri.startswith("test:"):
                try:
                    found.append(identity.host_uuid(self.host(record.name).conn))
                except HostUnreachable:
                    continue
        return found

    def agent(self, host_name: str, vm: str, token: str, timeout: float = 30.0) -> AgentClient:
        """A client for ``vm``'s agent, through its host's libvirt connection (``virDomain.openChannel``)."""
        from hvctl.agent_client import AgentClient

        return AgentClient.over_channel(self.host(host_name), vm, token, timeout)

    def capabilities(self, name: str | None = None) -> HostCapabilities:
        """Host facts with the accelerator, probed once per host and cached in the ledger."""
        ledger = self.ledger  # resolves -c to a host name first
        return self.capabilities_of(self.probed(ledger.hosts.get(name or self.host_name)))

    def probed(self, record: HostRecord) -> HostRecord:
        """``record`` with the facts a placement needs: the accelerator, CPUs and memory (a host never asked before
        is probed, which may boot a probe domain there) and the size of the storage its VMs' disks live on. What
        is measured is recorded in the ledger, so each is done once per host; the record is read again only then."""
        name = record.name
        if record.accel is None or record.cpus is None or record.memory_mib is None:
            host = self.host(name)
            facts = host.facts()
            probe_image = self._probe_image()
            if self.is_this_machine(name):
                accel = host.probe_accelerator(probe_image.kernel, probe_image.initrd, self.paths.root / "probe")
            else:
                accel = self._probe_remote(host, name, probe_image)
            self.ledger.hosts.record_facts(name, accel.value, facts.cpus, facts.memory_mib)
            record = self.ledger.hosts.get(name)
        if record.disk_gib is None:
            # VM disks live under the controller's state dir on this machine, and in the host's storage pool on
            # another: admission counts their sizes against that.
            if self.is_this_machine(name):
                disk_gib = self.paths.storage_gib()
            else:
                pool, _ = self.host(name).ensure_pool()
                disk_gib = pool.space().capacity // 2**30
            self.ledger.hosts.record_disk(name, disk_gib)
            record = self.ledger.hosts.get(name)
        return record

    def capabilities_of(self, record: HostRecord) -> HostCapabilities:
        """What the designer needs to know of a probed host (``probed``)."""
        from hvctl.designer import HostCapabilities
        from hvctl.domain import Accel

        name = record.name
        return HostCapabilities(name=name, accel=Accel(record.accel or "qemu"), cpus=record.cpus or 1,
                                memory_mib=record.memory_mib or 0,
                                memory_limits=can_limit_memory() if self.is_this_machine(name)
                                else record.memory_limits is not False)

    def _probe_remote(self, host: Host, name: str, image: Image) -> Accel:
        """The accelerator probe on a host that is not this machine: the image's kernel and initrd from the host's
        pool (uploaded once), the probe's console log in the pool, read back as a volume and deleted after."""
        from hvctl.domain import Accel

        if "kvm" not in host.facts().domain_types:
            return Accel.TCG  # nothing to boot, nothing to upload
        from hvctl.console import VolumeConsole, read_console
        from hvctl.ops.volumes import UploadLease, ensure_image

        pool, _ = host.ensure_pool()
        volumes = ensure_image(pool, image, lease=UploadLease(self.ledger.hosts, name, image))
        assert volumes.kernel is not None and volumes.initrd is not None  # the minimal recipe boots its kernel
        log = "hvctl-accel-probe.log"
        pool.delete(log, refresh=True)
        try:
            return host.probe_accelerator_with(volumes.kernel.path, volumes.initrd.path, pool.path / log,
                                               lambda: read_console(VolumeConsole(pool, log)))
        finally:
            pool.delete(log, refresh=True)

    def _probe_image(self) -> Image:
        try:
            return self.images.get("minimal")
        except ImageError as exc:
            raise ImageError("the accelerator probe boots the `minimal` image, which is not built",
                             hint="run `hvctl image build minimal`") from exc

    def close(self) -> None:
        for host in self._hosts.values():
            host.close()
        if "ledger" in self.__dict__:
            self.ledger.close()
