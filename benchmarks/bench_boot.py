"""Create → agent-ready and create → SSH-ready for the `base` image: hvctl against raw libvirt-python, in one run.

Both sides boot the same image under the same private libvirtd, the same machine (the raw side's domain XML is
written by hand in common.py, not by hvctl's designer) and the same kind of seed (hvctl's seed builder makes the raw
side's), and are waited on with the same probes: an
authenticated agent ping over the virtio-serial channel, then an authenticated SSH session with the pinned host
key. Runs alternate between the sides. Guests run under TCG on 1 vCPU.

Usage: benchmarks/bench_boot.py [-n N]. The last line is machine-readable.
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

from common import Report, raw_domain_xml, scratch_dir, share_test_images  # noqa: E402
from framework.devhost import PrivateLibvirtd  # noqa: E402

from hvctl.access import wait_for_ssh  # noqa: E402
from hvctl.agent_client import AgentClient  # noqa: E402
from hvctl.context import Context  # noqa: E402
from hvctl.ledger import VMRecord, VMState  # noqa: E402
from hvctl.ops.create import create  # noqa: E402
from hvctl.ops.incarnation import make_overlay  # noqa: E402
from hvctl.ops.lifecycle import destroy  # noqa: E402
from hvctl.seed import build_seed, generate_ed25519, new_agent_token, operator_key, public_key_of  # noqa: E402
from hvctl.spec import VMSpec  # noqa: E402

SPEC = {"memory_mib": 512, "disk_gib": 2, "image": "base"}


def hvctl_side(ctx: Context, name: str) -> tuple[float, float]:
    started = time.perf_counter()
    record = create(ctx, VMSpec(name=name, **SPEC))  # type: ignore[arg-type]
    agent = time.perf_counter() - started  # create returns once the agent answered
    wait_for_ssh(record, operator_key(ctx.paths.keys), 120)
    ssh = time.perf_counter() - started
    destroy(ctx, name)
    return agent, ssh


def raw_side(conn: libvirt.virConnect, ctx: Context, name: str, port: int) -> tuple[float, float]:
    spec = VMSpec(name=name, **SPEC)  # type: ignore[arg-type]
    image = ctx.images.get("base")
    vm_dir = ctx.paths.vm_dir(name)
    vm_dir.mkdir(mode=0o755)
    host_key, token = generate_ed25519(name), new_agent_token()
    seed = vm_dir / "seed.iso"
    xml = raw_domain_xml(ctx.capabilities().accel.value == "kvm", name, spec.memory_mib, image.kernel, image.initrd,
                         vm_dir, port, vcpus=spec.vcpus, root_on_disk=True, seed=True)
    started = time.perf_counter()
    make_overlay(image.base_disk, vm_dir / "disk.qcow2", spec.disk_gib)
    build_seed(seed, name, [public_key_of(operator_key(ctx.paths.keys))], host_key, token)
    dom = conn.defineXML(xml)
    dom.create()
    AgentClient.over_socket(vm_dir / "agent.sock", token).wait_ready(180)
    agent = time.perf_counter() - started
    record = VMRecord(name=name, tenant="default", host="local", spec_source=spec, state=VMState.RUNNING, image="base",
                      base_disk=image.base_disk, overlay=vm_dir / "disk.qcow2", console_log=vm_dir / "console.log",
                      agent_socket=vm_dir / "agent.sock", ssh_port=port, created_at=0, updated_at=0,
                      host_pubkey=host_key.public_line)
    wait_for_ssh(record, operator_key(ctx.paths.keys), 120)
    ssh = time.perf_counter() - started
    dom.destroy()
    dom.undefine()
    shutil.rmtree(vm_dir)
    return agent, ssh


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_boot.txt")
    args = parser.parse_args()
    root = scratch_dir("hvb-")
    daemon = PrivateLibvirtd(root / "d").start()
    report = Report()
    say = report.say
    try:
        ctx = Context(state_dir=root / "s", uri=daemon.uri)
        share_test_images(ctx)
        for recipe in ("minimal", "base"):
            ctx.images.build(recipe)
        ctx.capabilities()
        conn = libvirt.open(daemon.uri)
        say(f"# bench_boot {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()}: {platform.machine()}, "
            f"{os.cpu_count()} cores, accel={ctx.capabilities().accel.value}, guest 1 vCPU 512 MiB, image base")
        hv_agent, hv_ssh, raw_agent, raw_ssh = [], [], [], []
        for i in range(args.n):
            a, s = hvctl_side(ctx, f"hv-{i}")
            hv_agent.append(a)
            hv_ssh.append(s)
            a, s = raw_side(conn, ctx, f"raw-{i}", 22980)
            raw_agent.append(a)
            raw_ssh.append(s)
            say(f"run {i}: hvctl agent {hv_agent[-1]:.2f} s ssh {hv_ssh[-1]:.2f} s | "
                f"raw agent {raw_agent[-1]:.2f} s ssh {raw_ssh[-1]:.2f} s")
        med = statistics.median
        say(f"hvctl: create->agent-ready median {med(hv_agent):.2f} s, create->ssh-ready median {med(hv_ssh):.2f} s")
        say(f"raw libvirt: create->agent-ready median {med(raw_agent):.2f} s, "
            f"create->ssh-ready median {med(raw_ssh):.2f} s")
        say(f"goal <= 10 s under TCG on 1 vCPU: agent {'met' if med(hv_agent) <= 10 else 'NOT met'}, "
            f"ssh {'met' if med(hv_ssh) <= 10 else 'NOT met'}")
        say(f"agent_ready_s={med(hv_agent):.2f} ssh_ready_s={med(hv_ssh):.2f} raw_s={med(raw_agent):.2f} "
            f"ratio={med(hv_agent) / med(raw_agent):.3f}")
        conn.close()
        ctx.close()
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)
    report.save(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
