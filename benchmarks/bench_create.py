"""Create → guest up: hvctl against the same domain created through raw libvirt-python, in one run.

Both sides boot the same minimal image under the same private libvirtd, the same machine (the raw side's domain XML
is written by hand here, device for device what hvctl makes, not by hvctl's designer) and the same readiness probe
(the guest's console marker). The runs alternate
between the two sides so that drift in machine load hits both equally. hvctl's side is the library call that
`hvctl create` makes, which includes the ledger transaction, the overlay, define, start and the wait; the CLI's own
interpreter start-up is reported separately.

Usage: benchmarks/bench_create.py [-n N] [--out FILE]. The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test framework
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Report, raw_domain_xml, scratch_dir  # noqa: E402
from framework.devhost import PrivateLibvirtd  # noqa: E402

from hvctl.console import wait_for_ready  # noqa: E402
from hvctl.context import Context  # noqa: E402
from hvctl.ops.create import create  # noqa: E402
from hvctl.ops.incarnation import make_overlay  # noqa: E402
from hvctl.ops.lifecycle import destroy  # noqa: E402
from hvctl.spec import VMSpec  # noqa: E402


def raw_create(conn: libvirt.virConnect, ctx: Context, name: str, port: int) -> float:
    """The same work with libvirt-python alone: overlay, define, start, wait for the same marker."""
    image = ctx.images.get("minimal")
    vm_dir = ctx.paths.vm_dir(name)
    xml = raw_domain_xml(ctx.capabilities().accel.value == "kvm", name, 128, image.kernel, image.initrd, vm_dir, port)
    started = time.perf_counter()
    vm_dir.mkdir(mode=0o755)
    make_overlay(image.base_disk, vm_dir / "disk.qcow2", 1)
    dom = conn.defineXML(xml)
    dom.create()
    wait_for_ready(name, vm_dir / "console.log", 120, lambda: bool(dom.isActive()))
    elapsed = time.perf_counter() - started
    dom.destroy()
    dom.undefine()
    shutil.rmtree(vm_dir)
    return elapsed


def hvctl_create(ctx: Context, name: str) -> float:
    started = time.perf_counter()
    create(ctx, VMSpec(name=name, memory_mib=128))
    elapsed = time.perf_counter() - started
    destroy(ctx, name)
    return elapsed


def cli_create(ctx: Context, uri: str, name: str) -> float:
    env = os.environ | {"HVCTL_STATE_DIR": str(ctx.state_dir), "HVCTL_CONNECT": uri}
    hvctl = [sys.executable, "-m", "hvctl.cli"]
    started = time.perf_counter()
    subprocess.run([*hvctl, "create", name, "--memory", "128"], check=True, env=env, capture_output=True)
    elapsed = time.perf_counter() - started
    subprocess.run([*hvctl, "destroy", name], check=True, env=env, capture_output=True)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=5, help="creates per side")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_create.txt")
    args = parser.parse_args()

    root = scratch_dir("hvb-")
    daemon = PrivateLibvirtd(root / "d").start()
    report = Report()
    say = report.say
    try:
        ctx = Context(state_dir=root / "s", uri=daemon.uri)
        ctx.images.build("minimal")
        ctx.capabilities()  # probe once, outside the timed region, for both sides
        conn = libvirt.open(daemon.uri)
        say(f"# bench_create {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()}: {platform.machine()}, "
            f"{os.cpu_count()} cores, accel={ctx.capabilities().accel.value}, libvirt {libvirt.getVersion()}")
        hv, raw, cli = [], [], []
        # Warm-up outside the measurement: the first QEMU start pays for cold page cache on both sides.
        raw_create(conn, ctx, "warmup", 22990)
        for i in range(args.n):
            hv.append(hvctl_create(ctx, f"hv-{i}"))
            raw.append(raw_create(conn, ctx, f"raw-{i}", 22980))
            say(f"run {i}: hvctl {hv[-1]:.3f} s  raw {raw[-1]:.3f} s")
        for i in range(min(3, args.n)):
            cli.append(cli_create(ctx, daemon.uri, f"cli-{i}"))
        hv_med, raw_med = statistics.median(hv), statistics.median(raw)
        say(f"hvctl create→ready median {hv_med:.3f} s (min {min(hv):.3f}, max {max(hv):.3f})")
        say(f"raw libvirt create→ready median {raw_med:.3f} s (min {min(raw):.3f}, max {max(raw):.3f})")
        say(f"`hvctl create` CLI median {statistics.median(cli):.3f} s (includes interpreter start-up)")
        say(f"hvctl_s={hv_med:.3f} raw_s={raw_med:.3f} ratio={hv_med / raw_med:.3f}")
        conn.close()
        ctx.close()
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)
    report.save(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
