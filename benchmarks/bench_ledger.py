"""The ledger on SQLite against the ledger on PostgreSQL, in one run: admissions per second, and the ledger's share of
a real `hvctl create`.

1. Admissions: each is `ledger.vms.reserve` with an Admission, the transaction every create opens (the tenant's and
   the host's usage summed, the quota checked, the row inserted, an event written), into a fleet that already holds
   FLEET VMs. Once from one controller, one admission at a time; then from 8 controllers at once (8 processes, each
   its own connection). SQLite is a file under /var/tmp; PostgreSQL a throwaway local server (tests/pgserver.py:
   unix socket, fsync off, as the tests run it: a networked, durable server adds its round trips and fsyncs).
2. Create: real creates of the minimal image under a private libvirtd, with the ledger on each backend; every call
   into the ledger (each repository method and usage query) is timed, nested calls once. The issue's bar: the ledger
   stays under 2% of create's wall time.

Usage: benchmarks/bench_ledger.py [-n CREATES] [--out FILE]. The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Report, scratch_dir, share_test_images  # noqa: E402
from framework.devhost import PrivateLibvirtd  # noqa: E402
from framework.pgserver import PgServer  # noqa: E402

from hvctl.context import Context  # noqa: E402
from hvctl.ledger import Admission, Ledger, VMPaths  # noqa: E402
from hvctl.ops.create import create  # noqa: E402
from hvctl.ops.lifecycle import destroy  # noqa: E402
from hvctl.spec import VMSpec  # noqa: E402

FLEET = 200  # VMs already in the ledger when the timed admissions start
HOSTS = 8
ADMISSIONS = 200  # timed, per backend, one controller
CONTROLLERS = 8
PER_CONTROLLER = 40
LIMITS = Admission(tenant_limit={"vcpus": 1e9, "memory_mib": 1e12, "disk_gib": 1e9, "vms": 1e9},
                   host_limit={"vcpus": 1e9, "memory_mib": 1e12, "disk_gib": 1e9})


def _admit(ledger: Ledger, name: str, scratch: Path) -> None:
    vm = scratch / name
    ledger.vms.reserve(VMSpec(name=name, tenant="default"), f"h{hash(name) % HOSTS}",
                       VMPaths(vm / "b", vm / "o", vm / "s", vm / "c", vm / "a"), admission=LIMITS)


def fresh_ledger(location: str, scratch: Path) -> None:
    ledger = Ledger(location)
    for h in range(HOSTS):
        ledger.hosts.ensure(f"h{h}", f"qemu+ssh://root@198.18.0.{h + 2}/system")
    for i in range(FLEET):
        _admit(ledger, f"f{i}", scratch)
    ledger.close()


def one_at_a_time(location: str, scratch: Path) -> float:
    ledger = Ledger(location)
    started = time.perf_counter()
    for i in range(ADMISSIONS):
        _admit(ledger, f"s{i}", scratch)
    elapsed = time.perf_counter() - started
    ledger.close()
    return ADMISSIONS / elapsed


def _controller(location: str, scratch: str, index: int, barrier: Any, results: Any) -> None:
    ledger = Ledger(location)
    barrier.wait()
    for i in range(PER_CONTROLLER):
        _admit(ledger, f"c{index}-{i}", Path(scratch))
    results.put(time.perf_counter())
    ledger.close()


def concurrently(location: str, scratch: Path) -> float:
    mp = multiprocessing.get_context("fork")
    barrier, results = mp.Barrier(CONTROLLERS + 1), mp.Queue()
    workers = [mp.Process(target=_controller, args=(location, str(scratch), i, barrier, results))
               for i in range(CONTROLLERS)]
    for w in workers:
        w.start()
    barrier.wait()
    started = time.perf_counter()
    ends = [results.get(timeout=600) for _ in workers]
    for w in workers:
        w.join()
        if w.exitcode != 0:
            raise RuntimeError(f"a controller failed with {w.exitcode}")
    return CONTROLLERS * PER_CONTROLLER / (max(ends) - started)


class LedgerClock:
    """Time spent inside the ledger: every public method of every repository, and the usage queries, wrapped on the
    instance; a call made inside another timed call is counted once, by the outer one."""

    def __init__(self, ledger: Ledger) -> None:
        self.seconds, self.calls, self._depth = 0.0, 0, 0
        for repo in (ledger.hosts, ledger.vms, ledger.operations, ledger.reservations, ledger.gpus, ledger.keys,
                     ledger.events, ledger.snapshots, ledger.networks, ledger):
            for name in dir(repo):
                if not name.startswith("_") and name not in ("store", "db", "transaction", "close", "schema_version",
                                                              "hosts", "vms", "operations", "reservations", "gpus",
                                                              "keys", "events", "snapshots", "networks"):
                    attr = getattr(repo, name)
                    if callable(attr):
                        setattr(repo, name, self._timed(attr))

    def _timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._depth += 1
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds += time.perf_counter() - started
                    self.calls += 1
        return timed


def creates(daemon: PrivateLibvirtd, root: Path, label: str, ledger_url: str | None, n: int,
            say: Callable[[str], None]) -> tuple[float, float]:
    """Median create wall time and median ledger share of it (percent), over ``n`` creates."""
    ctx = Context(state_dir=root / label[:2], uri=daemon.uri, ledger_url=ledger_url)  # short: socket paths
    share_test_images(ctx)
    ctx.images.build("minimal")
    ctx.capabilities()
    create(ctx, VMSpec(name="warmup", memory_mib=128))  # cold caches, outside the measurement
    destroy(ctx, "warmup")
    walls, shares = [], []
    for i in range(n):
        clock = LedgerClock(ctx.ledger)
        started = time.perf_counter()
        create(ctx, VMSpec(name=f"{label}-{i}", memory_mib=128))
        wall = time.perf_counter() - started
        walls.append(wall)
        shares.append(100 * clock.seconds / wall)
        say(f"  {label} create {i}: {wall:.3f} s, ledger {clock.seconds * 1000:.1f} ms in {clock.calls} calls "
            f"({shares[-1]:.2f}%)")
        destroy(ctx, f"{label}-{i}")
    ctx.close()
    return statistics.median(walls), statistics.median(shares)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=3, help="creates per backend")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_ledger.txt")
    args = parser.parse_args()

    root = scratch_dir("hvb-")
    server = PgServer()
    daemon = None
    report = Report()
    say = report.say
    try:
        say(f"# bench_ledger {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()}: {platform.machine()}, "
            f"{os.cpu_count()} cores, PostgreSQL {server.bindir.parent.name} (local unix socket, fsync off), "
            f"SQLite (WAL) under /var/tmp")
        rates: dict[str, dict[str, float]] = {}
        for backend in ("sqlite", "postgresql"):
            location = str(root / "bench.sqlite3") if backend == "sqlite" else server.new_database()
            fresh_ledger(location, root)
            single = one_at_a_time(location, root)
            many = concurrently(location, root)
            rates[backend] = {"one": single, "eight": many}
            say(f"{backend}: {single:.0f} admissions/s one at a time, {many:.0f}/s from {CONTROLLERS} controllers "
                f"at once ({FLEET} VMs in the ledger at the start)")
        daemon = PrivateLibvirtd(root / "d").start()
        wall_sq, share_sq = creates(daemon, root, "sqlite", None, args.n, say)
        wall_pg, share_pg = creates(daemon, root, "pg", server.new_database(), args.n, say)
        say(f"create median: sqlite {wall_sq:.3f} s with the ledger {share_sq:.2f}% of it; "
            f"postgresql {wall_pg:.3f} s with the ledger {share_pg:.2f}% of it (the bar: under 2%)")
        one = rates["sqlite"]["one"] / rates["postgresql"]["one"]
        eight = rates["sqlite"]["eight"] / rates["postgresql"]["eight"]
        say(f"sqlite_adm_s={rates['sqlite']['one']:.0f} pg_adm_s={rates['postgresql']['one']:.0f} ratio={one:.2f} "
            f"sqlite_8x_adm_s={rates['sqlite']['eight']:.0f} pg_8x_adm_s={rates['postgresql']['eight']:.0f} "
            f"ratio_8x={eight:.2f} create_ledger_pct_sqlite={share_sq:.2f} create_ledger_pct_pg={share_pg:.2f}")
    finally:
        if daemon is not None:
            daemon.stop()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    report.save(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
