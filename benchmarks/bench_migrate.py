"""Live migration: hvctl against raw libvirt-python with the same flags, and precopy vs auto-converge vs postcopy
on a guest that keeps dirtying memory. Two private libvirtd daemons on this machine act as two hosts.

hvctl's side is `hvctl.ops.migrate.migrate` (prechecks, ledger reservation, job-stat polling, ledger commit); the
raw side calls migrate3 with the same flags, params and destination XML. Runs alternate between the sides and
between directions (h1 → h2 → h1). Usage: benchmarks/bench_migrate.py [-n N]. The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test framework
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Report, scratch_dir  # noqa: E402
from framework.devhost import PrivateLibvirtd  # noqa: E402

from hvctl.context import Context  # noqa: E402
from hvctl.domain.model import retarget_ssh_forward  # noqa: E402
from hvctl.ops.create import create  # noqa: E402
from hvctl.ops.hosts import add_host  # noqa: E402
from hvctl.ops.incarnation import BootOptions  # noqa: E402
from hvctl.ops.lifecycle import destroy  # noqa: E402
from hvctl.ops.migrate import MigrateOptions, MigrationFailed, migrate  # noqa: E402
from hvctl.spec import VMSpec  # noqa: E402

MAX_DOWNTIME_MS = 300
FLAGS = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
         | libvirt.VIR_MIGRATE_UNSAFE)


def raw_migrate(src_uri: str, dst_uri: str, name: str, port: int) -> tuple[float, dict[str, object]]:
    src, dst = libvirt.open(src_uri), libvirt.open(dst_uri)
    dom = src.lookupByName(name)
    xml = retarget_ssh_forward(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_SECURE), port)
    dom.migrateSetMaxDowntime(MAX_DOWNTIME_MS, 0)
    started = time.perf_counter()
    dom.migrate3(dst, {libvirt.VIR_MIGRATE_PARAM_DEST_XML: xml, libvirt.VIR_MIGRATE_PARAM_URI: "tcp://127.0.0.1"},
                 FLAGS)
    elapsed = time.perf_counter() - started
    stats = dst.lookupByName(name).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    src.close()
    dst.close()
    return elapsed, stats


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=3, help="migrations per side")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_migrate.txt")
    args = parser.parse_args()
    root = scratch_dir("hvbm-")
    h1 = PrivateLibvirtd(root / "h1", cgroups=False).start()
    h2 = PrivateLibvirtd(root / "h2", cgroups=False).start()
    report = Report()
    say = report.say
    try:
        ctx = Context(state_dir=root / "s", uri=str(h1.uri))
        ctx.images.build("minimal")
        uris = {"h1": str(h1.uri), "h2": str(h2.uri)}
        for name, uri in uris.items():
            add_host(ctx, name, uri)
        say(f"# bench_migrate {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()}: {platform.machine()}, "
            f"{os.cpu_count()} cores, TCG guests of 128 MiB, two private libvirtd on loopback, "
            f"max downtime {MAX_DOWNTIME_MS} ms")
        create(ctx, VMSpec(name="hv", memory_mib=128, host="h1"), options=BootOptions(extra_cmdline=("hvctl.tick=1",)))
        create(ctx, VMSpec(name="raw", memory_mib=128, host="h1"), options=BootOptions(extra_cmdline=("hvctl.tick=1",)))
        opts = MigrateOptions(max_downtime_ms=MAX_DOWNTIME_MS)
        hv_t, raw_t, downs, sizes = [], [], [], []
        raw_where, raw_port = "h1", 22950
        for i in range(args.n):
            target = "h2" if ctx.ledger.vms.get("hv").host == "h1" else "h1"
            started = time.perf_counter()
            stats = migrate(ctx, "hv", target, opts)
            hv_t.append(time.perf_counter() - started)
            downs.append(float(stats.downtime_ms or 0))
            sizes.append(int(stats.bytes or 0))
            raw_target = "h2" if raw_where == "h1" else "h1"
            raw_port += 1
            elapsed, raw_stats = raw_migrate(uris[raw_where], uris[raw_target], "raw", raw_port)
            raw_t.append(elapsed)
            raw_where = raw_target
            say(f"run {i}: hvctl {hv_t[-1]:.2f} s (downtime {downs[-1]:.0f} ms, {sizes[-1] / 2**20:.1f} MiB) | "
                f"raw {raw_t[-1]:.2f} s (downtime {raw_stats.get('downtime')} ms)")
        # The raw side moved its VM behind the ledger's back; put it where the ledger says before cleaning up.
        if raw_where != "h1":
            raw_migrate(uris[raw_where], uris["h1"], "raw", raw_port + 1)

        say("-- a guest rewriting 48 MiB of RAM in a loop, bandwidth capped at 16 MiB/s, 60 s limit:")
        for label, mode_opts in (
            ("precopy", MigrateOptions(bandwidth_mib_s=16, timeout_s=60, max_downtime_ms=MAX_DOWNTIME_MS)),
            ("auto-converge", MigrateOptions(bandwidth_mib_s=16, auto_converge=True, timeout_s=60,
                                             max_downtime_ms=MAX_DOWNTIME_MS)),
            ("postcopy", MigrateOptions(mode="postcopy", bandwidth_mib_s=16, timeout_s=5, timeout_action="postcopy",
                                        max_downtime_ms=MAX_DOWNTIME_MS)),
        ):
            name = f"dirty-{label.replace('-', '')}"
            create(ctx, VMSpec(name=name, memory_mib=128, host="h1"),
                   options=BootOptions(extra_cmdline=("hvctl.dirty=48",)))
            time.sleep(3)
            started = time.perf_counter()
            try:
                stats = migrate(ctx, name, "h2", mode_opts)
                say(f"{label}: {time.perf_counter() - started:.1f} s, downtime {stats.downtime_ms} ms, "
                    f"{(stats.bytes or 0) / 2**20:.1f} MiB, {stats.memory_iterations} iterations"
                    + (", switched to post-copy" if stats.switched_to_postcopy else ""))
            except MigrationFailed as exc:
                say(f"{label}: did not complete within the limit ({time.perf_counter() - started:.1f} s): "
                    f"{exc.message[-300:]}")
            destroy(ctx, name)

        hv_med, raw_med = statistics.median(hv_t), statistics.median(raw_t)
        down_med = statistics.median(downs)
        say(f"hvctl median {hv_med:.3f} s, raw libvirt median {raw_med:.3f} s, ratio {hv_med / raw_med:.3f} "
            f"(goal <= 1.1); downtime {down_med:.0f} ms / max {MAX_DOWNTIME_MS} ms = {down_med / MAX_DOWNTIME_MS:.2f} "
            f"(goal <= 1.0); {statistics.median(sizes) / 2**20:.1f} MiB per migration")
        say(f"hvctl_s={hv_med:.3f} raw_s={raw_med:.3f} ratio={hv_med / raw_med:.3f} downtime_ms={down_med:.0f} "
            f"max_downtime_ms={MAX_DOWNTIME_MS}")
        for vm in ctx.ledger.vms.all():
            destroy(ctx, vm.name)
        ctx.close()
    finally:
        h1.stop()
        h2.stop()
        shutil.rmtree(root, ignore_errors=True)
    report.save(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
