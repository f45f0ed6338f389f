"""gloo all-reduce between two VMs on a tenant network against the same between two processes on this machine, in
one run; and the step time of data-parallel training on two VMs against one VM.

Two `ml` guests of one tenant on its tenant network, on a remote-style host (bridges and firewall in its own network
namespace; see framework.devhost.remote). The all-reduce script is the same in both places: torch.distributed with
gloo, pinned to the tenant NIC in the guests and to loopback here; for each message size, one warm-up and then the
mean of several all-reduces. Under TCG the absolute numbers say little about real hardware; the VM/host ratio and
how it moves with the message size do (the tenant path is virtio-net through a bridge on an emulated CPU).

Then `hvctl run d1 train` (one VM, global batch B) against `hvctl run --vms d1,d2 train --distributed` (B split
over two): steps per second from the training results, start-up excluded.

Usage: benchmarks/bench_allreduce.py [--steps N] [--out FILE]. The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test framework
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Report, scratch_dir  # noqa: E402
from framework.devhost.remote import RemoteStyleHost  # noqa: E402

from guest import rpc  # noqa: E402
from hvctl.context import Context  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HVCTL = [sys.executable, "-m", "hvctl.cli"]
SIZES = (4 << 10, 256 << 10, 4 << 20)  # bytes of float32 per all-reduce
REPEATS = {4 << 10: 20, 256 << 10: 10, 4 << 20: 5}
PORT = 29510
POLICY = """
hosts: {cpu_overcommit: 4.0, reserve: {memory_mib: 0}}
tenants:
  acme: {quota: {vcpus: 2, memory_mib: 3072, disk_gib: 8, vms: 2}}
"""

# argv: RANK WORLD MASTER_ADDRESS MY_ADDRESS SIZES_JSON REPEATS_JSON PORT; prints {size: seconds per all-reduce}.
ALLREDUCE = r"""
import json, os, sys, time
from datetime import timedelta
rank, world, master, mine = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
sizes, repeats = json.loads(sys.argv[5]), json.loads(sys.argv[6])
if mine == "127.0.0.1":
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
else:
    from guest.workloads.distributed import interface_of
    os.environ["GLOO_SOCKET_IFNAME"] = interface_of(mine)
import torch
import torch.distributed as dist
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"tcp://{master}:{sys.argv[7]}", rank=rank, world_size=world,
                        timeout=timedelta(seconds=600))
out = {}
for size in sizes:
    t = torch.ones(size // 4)
    dist.all_reduce(t)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(repeats[str(size)]):
        dist.all_reduce(t)
    out[size] = (time.perf_counter() - start) / repeats[str(size)]
dist.destroy_process_group()
print(json.dumps(out))
"""


class Fleet:
    def __init__(self, state: Path) -> None:
        self.state = state
        self.env = os.environ | {"HVCTL_STATE_DIR": str(state), "HVCTL_CONNECT": "test:///default",
                                 "COLUMNS": "200", "NO_COLOR": "1"}

    def hvctl(self, *args: str, timeout: float = 1800) -> str:
        done = subprocess.run([*HVCTL, *args], capture_output=True, text=True, env=self.env, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise SystemExit(f"hvctl {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def exec(self, vm: str, argv: list[str], timeout: float = 1200) -> rpc.ExecResult:
        ctx = Context(state_dir=self.state, uri="test:///default")
        try:
            record = ctx.ledger.vms.get(vm)
            assert record.agent_token
            return ctx.agent(record.host, vm, record.agent_token, timeout=timeout + 30).typed(
                "exec", rpc.ExecResult, rpc.ExecParams(argv=argv, timeout_s=timeout))
        finally:
            ctx.close()


def allreduce_pair(run: list[object], addresses: list[str]) -> dict[int, float]:
    """Both ranks at once (``run`` is [callable per rank]); rank 0's timings."""
    results: list[str] = ["", ""]
    errors: list[str] = []

    def rank(i: int) -> None:
        try:
            results[i] = run[i](["python3", "-c", ALLREDUCE, str(i), "2", addresses[0], addresses[i],  # type: ignore[operator]
                                 json.dumps(SIZES), json.dumps({str(k): v for k, v in REPEATS.items()}), str(PORT)])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"rank {i}: {exc}")

    threads = [threading.Thread(target=rank, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit("; ".join(errors))
    return {int(k): float(v) for k, v in json.loads(results[0].splitlines()[-1]).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_allreduce.txt")
    args = parser.parse_args()
    report = Report()
    images = Path(os.environ.get("HVCTL_TEST_IMAGES", "/var/tmp/hvctl-test-images"))
    state = scratch_dir("hvba-")
    (state / "images").symlink_to(images)
    (state / "policy.yaml").write_text(POLICY)
    host = RemoteStyleHost(scratch_dir("hvbr-"), index=48, hide=(state,))
    fleet = Fleet(state)
    try:
        host.start()
        fleet.hvctl("host", "add", "far", host.uri)
        fleet.hvctl("network", "create", "lab", "--tenant", "acme", "--subnet", "10.96.31.0/24")
        for vm in ("d1", "d2"):
            fleet.hvctl("create", vm, "--host", "far", "--image", "ml", "--memory", "1536", "--disk", "4",
                        "--tenant", "acme", "--net", "lab", "--boot-timeout", "600")
        addresses = [json.loads(fleet.hvctl("show", vm, "--json"))["spec"]["network"]["address"].split("/")[0]
                     for vm in ("d1", "d2")]
        report.say(f"machine: {platform.machine()}, {os.cpu_count()} cores; guests: ml image, 1 vCPU, TCG, on "
                   f"tenant network lab ({', '.join(addresses)}), on a remote-style host")

        def in_vm(vm: str):  # type: ignore[no-untyped-def]
            def run(argv: list[str]) -> str:
                done = fleet.exec(vm, argv)
                if done.exit_code != 0:
                    raise RuntimeError(done.stderr.strip()[-500:])
                return done.stdout
            return run

        def on_host(argv: list[str]) -> str:
            done = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, timeout=600,
                                  env=os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
            if done.returncode != 0:
                raise RuntimeError(done.stderr.strip()[-500:])
            return done.stdout

        vm_times = allreduce_pair([in_vm("d1"), in_vm("d2")], addresses)
        host_times = allreduce_pair([on_host, on_host], ["127.0.0.1", "127.0.0.1"])
        ratios = []
        for size in SIZES:
            vm_bw, host_bw = size / vm_times[size] / 2**20, size / host_times[size] / 2**20
            ratios.append(vm_bw / host_bw)
            report.say(f"all-reduce of {size >> 10} KiB: VMs {vm_times[size] * 1000:.2f} ms ({vm_bw:.1f} MiB/s), "
                       f"host processes {host_times[size] * 1000:.2f} ms ({host_bw:.1f} MiB/s), ratio {ratios[-1]:.4f}")

        train = ["train", "--steps", str(args.steps), "--checkpoint-every", "0", "--batch-size", str(args.batch_size),
                 "--json"]
        one = json.loads(fleet.hvctl("run", "d1", *train))["result"]
        fleet.hvctl("exec", "d1", "--agent", "--", "rm", "-rf", "/var/lib/hvctl-agent/checkpoints/ssl")
        two = json.loads(fleet.hvctl("run", "--vms", "d1,d2", *train, "--distributed"))["result"]
        step_ratio = two["steps_per_s"] / one["steps_per_s"]
        report.say(f"ssl training, global batch {args.batch_size}, {args.steps} steps: one VM {one['steps_per_s']:.3f} "
                   f"steps/s, two VMs (DDP over lab) {two['steps_per_s']:.3f} steps/s, ratio {step_ratio:.3f}")
        report.say(" ".join(f"allreduce_ratio_{size >> 10}k={r:.4f}" for size, r in zip(SIZES, ratios, strict=True))
                   + f" ddp_step_ratio={step_ratio:.3f}")
        report.save(args.out)
    finally:
        for vm in ("d1", "d2"):
            subprocess.run([*HVCTL, "destroy", vm], env=fleet.env, capture_output=True, timeout=600)
        host.stop()
        shutil.rmtree(host.root, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
