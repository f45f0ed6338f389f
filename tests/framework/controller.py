"""One hvctl controller as the VM tests drive it, typed: its state dir, the libvirt URI it acts on by default, a
Context over both (the in-process API) and the real CLI in a subprocess. Every VM test module builds its setting from
these instead of a dict of loosely named things."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from framework.devhost import PrivateLibvirtd
from framework.devhost.remote import RemoteStyleHost
from guest import rpc
from hvctl.context import Context
from hvctl.ops.intent import CRASH_ENV, FAIL_ENV
from hvctl.ops.lifecycle import destroy

HVCTL = [sys.executable, "-m", "hvctl.cli"]
# The default host of a controller whose every VM lives on remote-style hosts: libvirt's test driver, so that
# nothing can land on this machine by mistake.
NOWHERE = "test:///default"
T = TypeVar("T", bound=BaseModel)


def hvctl_cli(state_dir: Path | str, uri: str, *args: str, timeout: float = 180,
              crash_after: str | None = None, fail_after: str | None = None,
              stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real `hvctl` CLI in a subprocess against ``uri`` with ``state_dir``; wide, colourless output.
    ``crash_after``: KIND.STEP, after which hvctl SIGKILLs itself (``hvctl.ops.intent.CRASH_ENV``); ``fail_after``:
    KIND.STEP, after which the operation fails with an error and undoes itself (``FAIL_ENV``)."""
    env = os.environ | {"HVCTL_STATE_DIR": str(state_dir), "HVCTL_CONNECT": uri, "COLUMNS": "200", "NO_COLOR": "1"}
    env.pop(CRASH_ENV, None)
    env.pop(FAIL_ENV, None)
    if crash_after:
        env[CRASH_ENV] = crash_after
    if fail_after:
        env[FAIL_ENV] = fail_after
    return subprocess.run([*HVCTL, *args], capture_output=True, text=True, env=env, timeout=timeout,
                          input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL)


class Daemons:
    """Private libvirt daemons (``PrivateLibvirtd``) under one directory, each started on request; when the block
    ends every one is stopped, the last started first, whatever failed before, and the directory is removed. The
    session's daemon, two_local_hosts' pair and a test's own daemons all come from one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[PrivateLibvirtd] = []

    def start(self, name: str, timeout: float = 30.0, cgroups: bool = True, hide_kvm: bool = True) -> PrivateLibvirtd:
        """A daemon in ``root/name``, started (``cgroups=False`` for a second "host" on this machine: see
        ``PrivateLibvirtd.cgroups``; ``hide_kvm=False`` lets it see /dev/kvm)."""
        daemon = PrivateLibvirtd(self.root / name, cgroups=cgroups, hide_kvm=hide_kvm)
        self.started.append(daemon)
        return daemon.start(timeout=timeout)

    def __enter__(self) -> Daemons:
        return self

    def __exit__(self, *_exc: object) -> None:
        try:
            for daemon in reversed(self.started):
                with contextlib.suppress(Exception):
                    daemon.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def short_tempdir(prefix: str) -> Path:
    """A 0755 directory under /var/tmp: QEMU runs as libvirt-qemu and must traverse it, and agent socket paths
    under it must stay within the 107-byte unix socket limit (pytest's tmp_path is 0700 and deep)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    path.chmod(0o755)
    return path


@dataclass
class Controller:
    state: Path
    uri: str
    ctx: Context
    cli_timeout: float = 300

    @classmethod
    def open(cls, state: Path, uri: str, image_dir: Path, policy: str | None = None, ledger_url: str | None = None,
             cli_timeout: float = 300) -> Controller:
        """A controller over ``state`` (made 0755 if new: QEMU traverses it), sharing the test image store, with
        ``policy`` as its policy file's text when given."""
        state.mkdir(mode=0o755, exist_ok=True)
        (state / "images").symlink_to(image_dir)
        if policy is not None:
            (state / "policy.yaml").write_text(policy)
        return cls(state, uri, Context(state_dir=state, uri=uri, ledger_url=ledger_url), cli_timeout)

    def hvctl(self, *args: str, timeout: float | None = None, crash_after: str | None = None,
              fail_after: str | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return hvctl_cli(self.state, self.uri, *args, timeout=timeout or self.cli_timeout, crash_after=crash_after,
                         fail_after=fail_after, stdin=stdin)

    def agent(self, vm: str, method: str, result: type[T], params: BaseModel | None = None, timeout: float = 120) -> T:
        """``method`` of ``vm``'s agent, through its host's libvirt (as hvctl reaches it), decoded as ``result``."""
        record = self.ctx.ledger.vms.get(vm)
        assert record.agent_token, f"{vm} has no agent"
        return self.ctx.agent(record.host, vm, record.agent_token, timeout=timeout).typed(method, result, params)

    def sh(self, vm: str, script: str, timeout_s: float = 90) -> rpc.ExecResult:
        """``script`` run by sh inside ``vm``, through its agent."""
        return self.agent(vm, "exec", rpc.ExecResult, rpc.ExecParams(argv=["sh", "-c", script], timeout_s=timeout_s))

    def close(self, remove_state: bool = True) -> None:
        """Destroy every VM the ledger still has (one that refuses, say on a daemon a fault test killed, does not
        stop the others), then close the context and remove the state dir."""
        try:
            for vm in self.ctx.ledger.vms.all():
                with contextlib.suppress(Exception):
                    destroy(self.ctx, vm.name)
        finally:
            self.ctx.close()
            if remove_state:
                shutil.rmtree(self.state, ignore_errors=True)


class AroundController:
    """A test setting built around one ``Controller`` (the hosts it drives, what a module keeps beside it): its
    context, state dir, CLI and agents, as the controller's own."""

    controller: Controller

    @property
    def ctx(self) -> Context:
        return self.controller.ctx

    @property
    def state(self) -> Path:
        return self.controller.state

    def hvctl(self, *args: str, timeout: float | None = None, crash_after: str | None = None,
              fail_after: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.controller.hvctl(*args, timeout=timeout, crash_after=crash_after, fail_after=fail_after)

    def agent(self, vm: str, method: str, result: type[T], params: BaseModel | None = None, timeout: float = 120) -> T:
        return self.controller.agent(vm, method, result, params, timeout)

    def sh(self, vm: str, script: str, timeout_s: float = 90) -> rpc.ExecResult:
        return self.controller.sh(vm, script, timeout_s)


@dataclass
class TwoHosts(AroundController):
    """Two private libvirtd daemons on this machine registered as hosts h1 and h2, and a controller on h1."""

    controller: Controller
    h1: PrivateLibvirtd
    h2: PrivateLibvirtd
    root: Path


@contextlib.contextmanager
def two_local_hosts(root: Path, image_dir: Path, ledger_url: str | None = None) -> Iterator[TwoHosts]:
    """``TwoHosts`` under ``root`` (removed at the end); VMs left at the end are destroyed, then the daemons go.
    cgroups are off on both: the two would name a migrating domain's cgroup alike on this one machine.
    ``ledger_url``: the controller's ledger is there (PostgreSQL) rather than in its state dir."""
    from hvctl.ops.hosts import add_host

    with Daemons(root) as daemons:
        h1 = daemons.start("h1", cgroups=False)
        h2 = daemons.start("h2", cgroups=False)
        controller = Controller.open(root / "state", h1.uri, image_dir, ledger_url=ledger_url)
        try:
            add_host(controller.ctx, "h1", h1.uri)
            add_host(controller.ctx, "h2", h2.uri)
            yield TwoHosts(controller, h1, h2, root)
        finally:
            controller.close(remove_state=False)  # the daemons, then the whole root, go after it


@dataclass
class RemoteFleet(AroundController):
    """A controller whose own host is libvirt's test driver and remote-style hosts (``RemoteStyleHost``: libvirtd
    and sshd in their own namespaces behind a veth), which cannot see its state dir and which it reaches only over
    their networks. The hosts are started, not registered: each module adds them as its tests need."""

    controller: Controller
    hosts: dict[str, RemoteStyleHost] = field(default_factory=dict)


@contextlib.contextmanager
def remote_hosts(hosts: dict[str, int], hide: tuple[Path, ...],
                 tls: bool = False) -> Iterator[dict[str, RemoteStyleHost]]:
    """One started ``RemoteStyleHost`` per entry of ``hosts`` (name: its veth index, unique across the test session),
    none of which sees the paths in ``hide`` (the controller's state dir); ``tls``: each listens for qemu+tls too. At
    the end each one started is stopped and its directory removed, whatever failed before."""
    started: dict[str, RemoteStyleHost] = {}
    try:
        for name, index in hosts.items():
            started[name] = RemoteStyleHost(short_tempdir("hvr-"), index=index, hide=hide, tls=tls)
            started[name].start()
        yield started
    finally:
        for host in started.values():
            host.stop()
            shutil.rmtree(host.root, ignore_errors=True)


@contextlib.contextmanager
def remote_fleet(image_dir: Path, hosts: dict[str, int], policy: str | None = None, cli_timeout: float = 300,
                 tls: bool = False) -> Iterator[RemoteFleet]:
    """A ``RemoteFleet`` with one started ``RemoteStyleHost`` per entry of ``hosts`` (name: its veth index, unique
    across the test session; ``tls``: each listens for qemu+tls too). At the end every VM the ledger still has is
    destroyed, then the hosts are stopped and every directory removed, whatever failed before."""
    controller = Controller.open(short_tempdir("hvf-"), NOWHERE, image_dir, policy=policy, cli_timeout=cli_timeout)
    closed = False
    try:
        with remote_hosts(hosts, hide=(controller.state,), tls=tls) as started:
            try:
                yield RemoteFleet(controller, started)
            finally:
                closed = True
                controller.close()  # its VMs go before the hosts they run on
    finally:
        if not closed:  # a host failed to start
            controller.close()
