"""Data-parallel training across real VMs (issue 15): three `ml` guests of tenant acme on its tenant network "lab",
on a remote-style host (its bridges and firewall live in its own network namespace). One job checks both things the
issue asks for, because every torch import under TCG costs minutes:

- DDP correctness: steps 1-2 run on three VMs, steps 3-4 on two, each step with the global batch of 6; every loss
  must equal, within float tolerance, one process on this machine with batch 6 over the same data and seed.
- Elastic restart: d3's worker holds after step 2 (a fault hook file written through its agent, so the job stops
  at that step on any machine), the test destroys d3, hvctl drops it, and d1 and d2 re-form and finish from the
  step-2 checkpoint. The guests' own logs (through their agents) show who trained which step in which world.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import RemoteFleet, remote_fleet

from guest import rpc
from guest.workloads.assets import make_tiny_llm
from guest.workloads.protocol import parse_progress
from images.store import ImageStore

pytestmark = [pytest.mark.vm, pytest.mark.timeout(3000)]

POLICY = """
hosts: {cpu_overcommit: 4.0, reserve: {memory_mib: 0}}
tenants:
  acme: {quota: {vcpus: 3, memory_mib: 4608, disk_gib: 12, vms: 3}}
"""
VMS = ("d1", "d2", "d3")
STEPS, HOLD, BATCH = 4, 2, 6


def ddp_log(fleet: RemoteFleet, vm: str) -> str:
    """The output of ``vm``'s train-ddp workload (its launcher and every worker it started)."""
    ours = [w for w in fleet.agent(vm, "workload.list", rpc.WorkloadList).workloads if w.kind == "train-ddp"]
    if not ours:
        return ""
    return fleet.agent(vm, "workload.logs", rpc.WorkloadLogs, rpc.WorkloadLogsParams(id=ours[-1].id)).data


@pytest.fixture(scope="module")
def fleet(image_dir: Path) -> Iterator[RemoteFleet]:
    ImageStore(image_dir).build("ml")
    with remote_fleet(image_dir, {"far": 47}, POLICY, cli_timeout=900) as f:
        assert f.hvctl("host", "add", "far", f.hosts["far"].uri).returncode == 0
        assert f.hvctl("network", "create", "lab", "--tenant", "acme", "--subnet", "10.96.30.0/24").returncode == 0
        def create(vm: str) -> subprocess.CompletedProcess[str]:
            return f.hvctl("create", vm, "--host", "far", "--image", "ml", "--memory", "1536", "--disk", "4",
                           "--tenant", "acme", "--net", "lab", "--boot-timeout", "600", timeout=1200)

        # All three at once, as an admin would: they take turns at the image upload and the network's set-up on the
        # new host, and boot side by side.
        with ThreadPoolExecutor(len(VMS)) as pool:
            for result in pool.map(create, VMS):
                assert result.returncode == 0, result.stderr
        yield f


def single_process(tmp_path: Path, steps: int = STEPS) -> list[float]:
    """The reference: this machine's guest code, one process, the whole global batch, the image's tiny LLM (seeded,
    so the same weights), the guest's defaults for everything else."""
    model = make_tiny_llm(tmp_path / "tiny-llm")
    done = subprocess.run([sys.executable, "-m", "guest.workloads", "run", "train", "--objective", "ssl",
                           "--steps", str(steps), "--batch-size", str(BATCH), "--model", str(model),
                           "--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "0", "--json"],
                          capture_output=True, text=True, timeout=600, check=True)
    return [float(x) for x in json.loads(done.stdout.splitlines()[-1])["losses"]]


def test_a_job_over_three_vms_loses_one_and_finishes_on_two_with_one_processs_losses(fleet: RemoteFleet,
                                                                                      tmp_path: Path) -> None:
    # The fault hook: d3's worker stops for good after reporting step HOLD (its peers then wait in step HOLD+1).
    hook = fleet.sh("d3", f"mkdir -p /run/hvctl-test && echo {HOLD} > /run/hvctl-test/hold-after-step")
    assert hook.exit_code == 0, hook.stderr
    with ThreadPoolExecutor(1) as background:  # the job runs while the test destroys d3
        job = background.submit(fleet.hvctl, "run", "--vms", ",".join(VMS), "train", "--distributed",
                                "--min-nodes", "2", "--steps", str(STEPS), "--checkpoint-every", str(HOLD),
                                "--batch-size", str(BATCH), "--collective-timeout", "60", "--json", timeout=2400)
        # A hang guard only (the job's own timeout bounds it too): the hook, not a clock, decides when d3 goes.
        deadline = time.monotonic() + 2400
        while not any(p.step == HOLD and p.checkpoint for p in parse_progress(ddp_log(fleet, "d3"))):
            assert not job.done(), job.result().stderr
            assert time.monotonic() < deadline, ddp_log(fleet, "d3")[-3000:]
            time.sleep(10)
        destroyed = fleet.hvctl("destroy", "d3", timeout=300)
        assert destroyed.returncode == 0, destroyed.stderr
        done = job.result()
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["finished"] == ["d1", "d2"] and list(result["dropped"]) == ["d3"], result
    assert result["dropped"]["d3"].startswith("its VM stopped"), result

    reference = single_process(tmp_path)
    for vm in ("d1", "d2"):
        steps = {p.step: p for p in parse_progress(ddp_log(fleet, vm))}  # a restart repeats no step
        assert sorted(steps) == list(range(1, STEPS + 1)), sorted(steps)
        worlds = [steps[s].world_size for s in range(1, STEPS + 1)]
        assert worlds == [3] * HOLD + [2] * (STEPS - HOLD), worlds
        largest = max(abs(steps[s].loss - reference[s - 1]) for s in steps)
        print(f"{vm}: largest loss difference from one process with batch {BATCH}: {largest:.2e} "
              f"(steps 1-{HOLD} on 3 VMs, {HOLD + 1}-{STEPS} on 2 after the restart)")
        assert largest < 1e-3, ([steps[s].loss for s in sorted(steps)], reference)
    assert result["result"]["start_step"] == HOLD and result["result"]["final_step"] == STEPS
    # Both survivors hold the job's last checkpoint: hvctl checkpoint takes it out as for any training.
    fetched = fleet.hvctl("checkpoint", "d2", "--out", str(tmp_path / "out"), "--json")
    assert fetched.returncode == 0, fetched.stderr
    assert json.loads(fetched.stdout)["checkpoint"].endswith(f"ckpt-{STEPS:08d}.pt")
