"""How fast the hvctl CLI answers, against the raw alternatives, in one run.

- `hvctl --version` against `virsh version` (the smallest thing each CLI does);
- `hvctl list --json` with 100 defined domains (not started) against a libvirt-python loop, run the same way in a
  fresh interpreter, that lists the domains and reads each one's XML.

Both sides are fresh processes each time (what a user at a shell pays), against one private libvirtd with the same
100 domains, which hvctl's designer wrote and hvctl's ledger records as stopped VMs. Python writes and reuses its
bytecode cache, as an installed hvctl does (PYTHONDONTWRITEBYTECODE is cleared for the children). Runs alternate
between the sides; medians are reported.

Goals (issue 16): `hvctl --version` <= 150 ms; `hvctl list --json` <= 2x the raw loop.
Usage: benchmarks/bench_cli.py [-n RUNS] [--domains N]. The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import json
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

from common import Report, scratch_dir, share_test_images  # noqa: E402
from framework.devhost import PrivateLibvirtd  # noqa: E402

from hvctl.context import Context  # noqa: E402
from hvctl.designer import BootArtifacts, VMAllocation, design  # noqa: E402
from hvctl.ledger import VMPaths  # noqa: E402
from hvctl.spec import VMSpec  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HVCTL = [str(ROOT / ".venv/bin/hvctl")]
RAW_LOOP = """
import json, sys, libvirt
conn = libvirt.open(sys.argv[1])
out = []
for dom in conn.listAllDomains():
    out.append({"name": dom.name(), "state": dom.state()[0], "xml": len(dom.XMLDesc(0))})
conn.close()
print(json.dumps(out))
"""


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{argv[0]} failed: {result.stderr.strip()}")
    return elapsed, result.stdout


def define_domains(ctx: Context, conn: libvirt.virConnect, count: int) -> None:
    image = ctx.images.get("minimal")
    caps = ctx.capabilities()
    for i in range(count):
        name = f"cli-{i:03d}"
        spec = VMSpec(name=name, memory_mib=128)
        files = ctx.paths.vm_files(name)
        record = ctx.ledger.vms.reserve(spec, "local", VMPaths(image.base_disk, files.overlay, files.seed,
                                                              files.console_log, files.agent_socket))
        xml = design(spec, caps, BootArtifacts(image.kernel, image.initrd),
                     VMAllocation(files.overlay, files.console_log, files.agent_socket, record.ssh_port)).to_xml()
        dom = conn.defineXML(xml)
        ctx.ledger.vms.set_domain_uuid(name, dom.UUIDString())
        ctx.ledger.vms.set_state(name, "stopped", "defined by bench_cli")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=15)
    parser.add_argument("--domains", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_cli.txt")
    args = parser.parse_args()
    root = scratch_dir("hvcli-")
    daemon = PrivateLibvirtd(root / "d").start()
    report = Report()
    say = report.say
    try:
        ctx = Context(state_dir=root / "s", uri=daemon.uri)
        share_test_images(ctx)
        ctx.images.build("minimal")
        conn = libvirt.open(daemon.uri)
        define_domains(ctx, conn, args.domains)
        ctx.close()
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env |= {"HVCTL_STATE_DIR": str(root / "s"), "HVCTL_CONNECT": daemon.uri}
        say(f"# bench_cli {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()}: {platform.machine()}, "
            f"{os.cpu_count()} cores, Python {platform.python_version()}, libvirt {libvirt.getVersion()}, "
            f"{args.domains} defined domains, {args.n} runs per side, medians")
        # One warm-up of each, which also writes the bytecode caches.
        listed = json.loads(timed([*HVCTL, "list", "--json"], env)[1])
        assert len(listed["vms"]) == args.domains and not listed["orphans"], listed
        raw = json.loads(timed([sys.executable, "-c", RAW_LOOP, daemon.uri], env)[1])
        assert len(raw) == args.domains
        timed([*HVCTL, "--version"], env)
        version, virsh, hv_list, raw_list = [], [], [], []
        for _ in range(args.n):
            version.append(timed([*HVCTL, "--version"], env)[0])
            virsh.append(timed(["virsh", "-c", daemon.uri, "version"], env)[0])
            hv_list.append(timed([*HVCTL, "list", "--json"], env)[0])
            raw_list.append(timed([sys.executable, "-c", RAW_LOOP, daemon.uri], env)[0])
        med = statistics.median
        say(f"hvctl --version: {med(version) * 1000:.0f} ms (min {min(version) * 1000:.0f}); "
            f"virsh version: {med(virsh) * 1000:.0f} ms; goal <= 150 ms: "
            f"{'met' if med(version) <= 0.150 else 'NOT met'}")
        ratio = med(hv_list) / med(raw_list)
        say(f"hvctl list --json ({args.domains} domains): {med(hv_list) * 1000:.0f} ms (min "
            f"{min(hv_list) * 1000:.0f}); raw libvirt-python list + XMLDesc loop: {med(raw_list) * 1000:.0f} ms "
            f"(min {min(raw_list) * 1000:.0f}); ratio {ratio:.2f}, goal <= 2: {'met' if ratio <= 2 else 'NOT met'}")
        say(f"version_ms={med(version) * 1000:.0f} virsh_ms={med(virsh) * 1000:.0f} "
            f"list_ms={med(hv_list) * 1000:.0f} raw_list_ms={med(raw_list) * 1000:.0f} ratio={ratio:.2f}")
        for dom in conn.listAllDomains():
            dom.undefine()
        conn.close()
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)
    report.save(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
