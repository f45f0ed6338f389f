"""One hvctl controller as the VM tests drive it, typed: its state dir, the libvirt URI it acts on by default, a
Context over both (the in-process API) and the real CLI in a subprocess. Every VM test module builds its setting from
these instead of a dict of loosely named things."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from framework.devhost import PrivateLibvirtd
from hvctl.context import Context
from hvctl.ops.intent import CRASH_ENV, FAIL_ENV
from hvctl.ops.lifecycle import destroy

HVCTL = [sys.executable, "-m", "hvctl.cli"]


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


@dataclass
class TwoHosts:
    """Two private libvirtd daemons on this machine registered as hosts h1 and h2, and a controller on h1."""

    controller: Controller
    h1: PrivateLibvirtd
    h2: PrivateLibvirtd
    root: Path

    @property
    def ctx(self) -> Context:
        return self.controller.ctx

    @property
    def state(self) -> Path:
        return self.controller.state

    def hvctl(self, *args: str, timeout: float | None = None,
              crash_after: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.controller.hvctl(*args, timeout=timeout, crash_after=crash_after)


@contextlib.contextmanager
def two_local_hosts(root: Path, image_dir: Path, ledger_url: str | None = None) -> Iterator[TwoHosts]:
    """``TwoHosts`` under ``root`` (removed at the end); VMs left at the end are destroyed, then the daemons go.
    cgroups are off on both: the two would name a migrating domain's cgroup alike on this one machine.
    ``ledger_url``: the controller's ledger is there (PostgreSQL) rather than in its state dir."""
    from hvctl.ops.hosts import add_host

    h1 = PrivateLibvirtd(root / "h1", cgroups=False).start()
    h2 = PrivateLibvirtd(root / "h2", cgroups=False)
    try:
        h2.start()
        controller = Controller.open(root / "state", h1.uri, image_dir, ledger_url=ledger_url)
        add_host(controller.ctx, "h1", h1.uri)
        add_host(controller.ctx, "h2", h2.uri)
        yield TwoHosts(controller, h1, h2, root)
        controller.close(remove_state=False)
    finally:
        h1.stop()
        h2.stop()
        shutil.rmtree(root, ignore_errors=True)
