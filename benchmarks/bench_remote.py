"""A VM on a remote host against the same VM on this machine, in one run; and the image upload against scp.

Two hosts: a private libvirtd on this machine (`local`), and a remote-style host (`far`: libvirtd and sshd in their
own network and mount namespaces, reached as qemu+ssh over a veth pair; see framework.devhost.remote). The guest is the
`base` image (Debian with hvctl's agent), and every create is timed from the call to the agent answering:
- cold on far: the first VM of the image there, so the kernel, initrd and 258 MiB qcow2 are uploaded first;
- warm on far: the image volumes are already in far's pool;
- local: the same create on this machine's daemon.
Warm and local runs alternate, so drift in machine load hits both. Then the qcow2 is sent to far with scp (the same
ssh, key and pinned host key that the qemu+ssh URI uses), and compared with the upload's throughput.

Usage: benchmarks/bench_remote.py [-n N] [--out FILE]. The last line is machine-readable.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test framework
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Report, scratch_dir  # noqa: E402
from framework.devhost import PrivateLibvirtd  # noqa: E402
from framework.devhost.remote import RemoteStyleHost  # noqa: E402

from hvctl.context import Context  # noqa: E402
from hvctl.host import libvirt_version  # noqa: E402
from hvctl.ops.create import create  # noqa: E402
from hvctl.ops.hosts import add_host  # noqa: E402
from hvctl.ops.incarnation import BootOptions  # noqa: E402
from hvctl.ops.lifecycle import destroy  # noqa: E402
from hvctl.spec import VMSpec  # noqa: E402

SPEC = {"memory_mib": 512, "disk_gib": 2, "image": "base"}


def timed_create(ctx: Context, name: str, host: str) -> tuple[float, dict[str, object]]:
    stats: dict[str, object] = {}
    started = time.perf_counter()
    create(ctx, VMSpec.parse(name=name, host=host, **SPEC), options=BootOptions(timeout=300), stats=stats)
    elapsed = time.perf_counter() - started
    destroy(ctx, name)
    return elapsed, stats


def scp_seconds(far: RemoteStyleHost, source: Path) -> float:
    """scp of ``source`` into far's storage directory, through the ssh wrapper of far's qemu+ssh URI."""
    dest = "/var/lib/libvirt/images/bench-scp.bin"
    started = time.perf_counter()
    subprocess.run(["scp", "-q", "-S", str(far.ssh_wrapper), str(source), f"root@{far.address}:{dest}"], check=True,
                   timeout=600)
    elapsed = time.perf_counter() - started
    subprocess.run([str(far.ssh_wrapper), f"root@{far.address}", "rm", "-f", dest], check=True, timeout=60)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=3, help="warm creates per host")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_remote.txt")
    parser.add_argument("--images", type=Path, help="an image store that already holds `base` (else it is built)")
    args = parser.parse_args()

    root = scratch_dir("hvbr-")
    state = root / "s"
    if args.images:
        state.mkdir()
        (state / "images").symlink_to(args.images.resolve())
    local = PrivateLibvirtd(root / "d").start()
    far = RemoteStyleHost(scratch_dir("hvbf-"), index=46, hide=(state,))
    report = Report()
    say = report.say
    try:
        far.start()
        ctx = Context(state_dir=state, uri=local.uri)
        image = ctx.images.build("base")
        add_host(ctx, "far", far.uri)
        for host in ("local", "far"):
            ctx.capabilities(host)  # probed once, outside the timed region
        qcow2 = image.base_disk
        accel = {host: ctx.capabilities(host).accel.value for host in ("local", "far")}
        say(f"# bench_remote {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()}: {platform.machine()}, "
            f"{os.cpu_count()} cores, libvirt {libvirt_version()}, accel local={accel['local']} "
            f"far={accel['far']}; base image, 512 MiB guests; far over qemu+ssh on a veth")
        cold, cold_stats = timed_create(ctx, "cold", "far")
        upload = cold_stats["image_upload"]
        assert isinstance(upload, dict)
        upload_mib_s = upload["bytes"] / 2**20 / upload["seconds"]
        say(f"cold on far: {cold:.2f} s create→agent, of which uploading the image (kernel, initrd, qcow2: "
            f"{upload['bytes'] / 2**20:.0f} MiB) took {upload['seconds']:.2f} s ({upload_mib_s:.0f} MiB/s)")
        warm, here = [], []
        for i in range(args.n):
            warm.append(timed_create(ctx, f"warm-{i}", "far")[0])
            here.append(timed_create(ctx, f"here-{i}", "local")[0])
            say(f"run {i}: far (warm) {warm[-1]:.2f} s  local {here[-1]:.2f} s")
        scp = [scp_seconds(far, qcow2) for _ in range(3)]
        size_mib = qcow2.stat().st_size / 2**20
        scp_mib_s = size_mib / statistics.median(scp)
        say(f"scp of the same {size_mib:.0f} MiB qcow2 to far: median {statistics.median(scp):.2f} s "
            f"({scp_mib_s:.0f} MiB/s); hvctl's upload over libvirt streams {upload_mib_s:.0f} MiB/s, "
            f"ratio {upload_mib_s / scp_mib_s:.2f}")
        warm_med, here_med = statistics.median(warm), statistics.median(here)
        say(f"create→agent median: far warm {warm_med:.2f} s, local {here_med:.2f} s, "
            f"ratio {warm_med / here_med:.3f} (goal <= 1.2); far cold {cold:.2f} s")
        say(f"warm_ratio={warm_med / here_med:.3f} cold_s={cold:.2f} upload_mib_s={upload_mib_s:.0f} "
            f"scp_mib_s={scp_mib_s:.0f}")
        ctx.close()
    finally:
        far.stop()
        local.stop()
        shutil.rmtree(far.root, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    report.save(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
