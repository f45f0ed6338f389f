"""Warm workload starts: a workload forked from a server that imported torch and transformers once.

Started as ``python -m guest.workloads run KIND …``, every workload imports torch and transformers before it does
anything: 4 s on a host, 45 s in a TCG guest (measured in an `ml` guest), paid again by each one. Where those
packages are installed, the agent instead has multiprocessing's forkserver (a server process it starts once, which
imports the workloads' modules in the background) fork each workload, and the child becomes exactly what the
command line would have been: a session of its own (cancel signals its process group), the workload's log as
stdout and stderr, /dev/null as stdin, the agent's workdir as cwd, SIGUSR1 ignored until the workload installs its
checkpoint handler, and the same ``guest.workloads.__main__.main`` with the same arguments.

This module is the agent's: standard library only, and it never imports torch itself (the forkserver does).
"""

from __future__ import annotations

import contextlib
import importlib.util
import multiprocessing
import multiprocessing.process
import os
import signal
import subprocess
import sys
import threading
from multiprocessing import forkserver
from multiprocessing.connection import Connection
from pathlib import Path

# What the forkserver imports once: between them, torch, transformers and every workload's own code.
PRELOAD = ("guest.workloads.train", "guest.workloads.llm", "guest.workloads.__main__")
_COMMAND_PREFIX = ("-m", "guest.workloads")


def available() -> bool:
    """Whether this machine has the workloads' packages (an `ml` image does; `minimal` and `base` do not)."""
    return importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None


def workload_args(argv: list[str]) -> list[str] | None:
    """The arguments of ``python -m guest.workloads ARGS`` (the agent's command for a workload kind); None for
    any other command, which is started as a process of its own."""
    if len(argv) >= 3 and argv[0] == sys.executable and tuple(argv[1:3]) == _COMMAND_PREFIX:
        return argv[3:]
    return None


class WarmProcess:
    """The part of ``subprocess.Popen`` the agent uses, over a workload the forkserver forked."""

    def __init__(self, process: multiprocessing.process.BaseProcess) -> None:
        self._process = process
        self.pid = int(process.pid or 0)

    def poll(self) -> int | None:
        """None while it runs; then its exit code, negative for the signal that ended it (as Popen's)."""
        return None if self._process.is_alive() else self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(f"workload {self.pid}", timeout or 0)
        return self._process.exitcode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)


class WarmStarter:
    def __init__(self, preload: tuple[str, ...] = PRELOAD) -> None:
        multiprocessing.set_forkserver_preload(list(preload))
        self._context = multiprocessing.get_context("forkserver")
        self.ready = threading.Event()  # set once the forkserver has done its imports and forks at once
        self._warming: threading.Thread | None = None

    def warm_up(self) -> None:
        """Start the forkserver in the background at the idle scheduling class, so that its imports take only CPU
        time nobody else wants, and set ``ready`` once it forks. Until then a caller starts workloads cold: a
        ``start`` before ``ready`` would wait for the imports. Calling it again does nothing."""
        if self._warming is None:
            self._warming = threading.Thread(target=self._warm, name="warm-up", daemon=True)
            self._warming.start()

    def _warm(self) -> None:
        forkserver.ensure_running()
        server = getattr(forkserver._forkserver, "_forkserver_pid", None)  # multiprocessing keeps no public handle
        if server:
            with contextlib.suppress(OSError):
                os.sched_setscheduler(server, os.SCHED_IDLE, os.sched_param(0))
        probe = self._context.Process(target=_noop, name="warm-up probe", daemon=True)  # forked after the imports
        probe.start()
        probe.join()
        self.ready.set()

    def usable(self) -> bool:
        """Whether a workload can be forked now. A forkserver that died after it was ready (killed, out of memory) is
        started again in the background, at the idle class, and until it is ready workloads start cold: a fork
        through multiprocessing would first restart it in the foreground and wait for its imports."""
        if not self.ready.is_set():
            return False
        server = getattr(forkserver._forkserver, "_forkserver_pid", None)
        try:  # WNOWAIT: the exit stays for multiprocessing to reap, which is how it knows to start the server anew
            alive = server is not None and os.waitid(os.P_PID, server, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
        except ChildProcessError:
            alive = False
        if alive:
            return True
        self.ready.clear()
        self._warming = None
        self.warm_up()
        return False

    def start(self, args: list[str], log: Path, cwd: Path) -> WarmProcess:
        """``python -m guest.workloads ARGS``, forked, writing to ``log`` (which the caller has created). Called
        before ``ready``, it waits for the forkserver's imports."""
        ready, set_up = self._context.Pipe(duplex=False)
        process = self._context.Process(target=become_workload, args=(args, str(log), str(cwd), set_up),
                                        name=f"workload {' '.join(args[:2])}")
        process.start()
        set_up.close()
        # Back only once the child is a session leader that ignores SIGUSR1, as Popen returns after the exec: a
        # cancel or a checkpoint request may come at once. (A child that dies before that ends the wait too.)
        with ready:
            while not ready.poll(0.05) and process.is_alive():
                pass
        # Not a child for multiprocessing to wait for when the agent exits: a workload outlives the agent that
        # started it, as one it ran with Popen does.
        multiprocessing.process._children.discard(process)  # type: ignore[attr-defined]
        return WarmProcess(process)


def become_workload(args: list[str], log: str, cwd: str, set_up: Connection) -> None:
    """In the forked child: the process set-up the agent's Popen made, then the workload's own entry point."""
    os.setsid()
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    with contextlib.suppress(OSError):  # back from the server's idle class to the normal one
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    set_up.send(True)
    set_up.close()
    out = os.open(log, os.O_WRONLY | os.O_APPEND)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.chdir(cwd)
    from guest.workloads.__main__ import main  # preloaded by the forkserver: nothing left to import

    sys.exit(main(args))


def _noop() -> None:
    pass
