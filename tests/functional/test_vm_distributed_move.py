"""Members of a distributed job moved while it runs (issue 15), SKIPPED until it passes (see pytestmark): at stop 45
d1 moved live, and d3's checkpoint migration booted its new incarnation and started its launcher, but the job did
not re-form with it. Three `ml` guests of tenant acme on its tenant network "lab", on two remote-style hosts wired to
each other (the network over VXLAN), one job:

- DDP correctness: each step runs with the global batch of 6, on three VMs or on two; every loss must equal, within
  float tolerance, one process on this machine with batch 6 over the same data and seed.
- Both kinds of migration of members while the job runs. Every worker holds after step 2 (fault hook files written
  through the agents, so the job stands there on any machine, with no collective in flight). d1, which hosts the
  rendezvous store, moves live to host near (`migrate --copy-storage`: its TCP connections and the store go with
  it; its checkpoint migration is refused first). d3 moves to near by `migrate --mode checkpoint`: its launcher is
  cancelled, its new incarnation, with the same tenant address and no checkpoint of its own, rejoins over the VXLAN
  (torch's rendezvous drops the old d3 once its heartbeats stop), and the job re-forms with it from the step-2
  checkpoint. hvctl's attached `run` follows both to their new host.
- Elastic restart: d2 holds after step 6 (on far, now alone there), the test destroys it, hvctl drops it, and d1 and
  d3 re-form and finish steps 7-8 from the step-6 checkpoint. The guests' own logs (through their agents) show who
  trained which step in which world.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import RemoteFleet, remote_fleet
from framework.devhost.remote import link_hosts
from test_vm_distributed import BATCH, VMS, ddp_log, single_process  # the same job's helpers

from guest.workloads.protocol import parse_progress
from images.store import ImageStore

pytestmark = [pytest.mark.vm, pytest.mark.timeout(3000),
              pytest.mark.skip(reason="pending: the job did not re-form with d3's new incarnation (stop 45: the "
                                      "new round waited 60 s for its MASTER_ADDR key); `migrate --rejoin-job` "
                                      "is experimental until this passes")]

POLICY = """
hosts: {cpu_overcommit: 4.0, reserve: {memory_mib: 0}}
tenants:
  acme: {quota: {vcpus: 4, memory_mib: 6144, disk_gib: 16, vms: 4}}
"""
STEPS = 8
# The fault hooks (guest/workloads/__main__.py): every first worker holds after step 2 ("2 4": exactly that step, in
# a world of fewer than 4, which this job always is); their successors, which resume at step 3, do not. d2 holds
# after step 6 for good, until it is destroyed.
HOOKS = {"d1": "2 4", "d2": "2 4;6", "d3": "2 4"}


@pytest.fixture(scope="module")
def fleet(image_dir: Path) -> Iterator[RemoteFleet]:
    ImageStore(image_dir).build("ml")
    with remote_fleet(image_dir, {"far": 49, "near": 50}, POLICY, cli_timeout=900) as f:
        # Wired to each other (198.19.8.0/30): the tenant network's VXLAN runs over these underlay addresses.
        underlays = dict(zip(("far", "near"), link_hosts(f.hosts["far"], f.hosts["near"], 8), strict=True))
        for host, underlay in underlays.items():
            added = f.hvctl("host", "add", host, f.hosts[host].uri, "--underlay", underlay)
            assert added.returncode == 0, added.stderr
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


def wait_for_step(fleet: RemoteFleet, vm: str, step: int, job: Future[subprocess.CompletedProcess[str]]) -> None:
    """Until ``vm``'s rank has reported ``step`` with its checkpoint (a hook holds it there). A hang guard only: the
    hooks, not a clock, decide when the test acts."""
    deadline = time.monotonic() + 2400
    while not any(p.step == step and p.checkpoint for p in parse_progress(ddp_log(fleet, vm))):
        assert not job.done(), job.result().stderr
        assert time.monotonic() < deadline, ddp_log(fleet, vm)[-3000:]
        time.sleep(10)


def test_a_job_over_three_vms_moves_one_loses_one_and_finishes_with_one_processs_losses(fleet: RemoteFleet,
                                                                                          tmp_path: Path) -> None:
    for vm, hook in HOOKS.items():
        written = fleet.sh(vm, f"mkdir -p /run/hvctl-test && printf '{hook}' > /run/hvctl-test/hold-after-step")
        assert written.exit_code == 0, written.stderr
    address = fleet.ctx.ledger.vms.get("d3").spec.network.address  # type: ignore[union-attr]
    with ThreadPoolExecutor(1) as background, contextlib.ExitStack() as on_failure:
        # The job runs while the test moves d3 and destroys d2. If the test fails first, its VMs are destroyed: the
        # hooks would hold the job to its timeout, and the pool's exit waits for it; with fewer than --min-nodes
        # left, hvctl ends it.
        job = background.submit(fleet.hvctl, "run", "--vms", ",".join(VMS), "train", "--distributed",
                                "--min-nodes", "2", "--steps", str(STEPS), "--checkpoint-every", "2",
                                "--batch-size", str(BATCH), "--collective-timeout", "60", "--json", timeout=2400)
        on_failure.callback(lambda: job.done() or [fleet.hvctl("destroy", vm, timeout=300) for vm in VMS])
        for vm in VMS:
            wait_for_step(fleet, vm, 2, job)
        # The first VM hosts the rendezvous: the job cannot go on without it, so its checkpoint migration is refused
        # at once; a live migration takes the store along.
        refused = fleet.hvctl("migrate", "d1", "--to", "near", "--mode", "checkpoint", "--rejoin-job")
        assert refused.returncode != 0 and "d1 hosts the rendezvous of distributed job" in refused.stderr, \
            refused.stderr
        uptime = float(fleet.sh("d1", "cut -d' ' -f1 /proc/uptime").stdout)
        live = fleet.hvctl("migrate", "d1", "--to", "near", "--copy-storage", "--json", timeout=1200)
        assert live.returncode == 0, live.stderr
        assert float(fleet.sh("d1", "cut -d' ' -f1 /proc/uptime").stdout) > uptime  # it never stopped
        moved = fleet.hvctl("migrate", "d3", "--to", "near", "--mode", "checkpoint", "--rejoin-job", "--json",
                            timeout=1800)
        assert moved.returncode == 0, moved.stderr
        wait_for_step(fleet, "d2", 6, job)
        destroyed = fleet.hvctl("destroy", "d2", timeout=300)
        assert destroyed.returncode == 0, destroyed.stderr
        done = job.result()
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["finished"] == ["d1", "d3"] and list(result["dropped"]) == ["d2"], result
    assert result["dropped"]["d2"].startswith("its VM stopped"), result
    assert "d3 is being moved by a checkpoint migration" in done.stderr and "d3 rejoined the job" in done.stderr
    assert "d1" not in result["dropped"]  # followed through its live migration too

    # The move: d3 runs on near with its tenant address, its rank rejoined from the step-2 checkpoint (a peer's: the
    # new disk had none) with d1's own loss for step 3, and the source incarnation is gone.
    went = json.loads(live.stdout)
    print(f"d1 moved live: {went['total_s']} s, downtime {went['downtime_ms']} ms; d3 by checkpoint: "
          f"{json.loads(moved.stdout)['total_s']} s")
    rejoined = json.loads(moved.stdout)["workloads"]
    assert [(w["checkpoint_step"], w["resumed_step"], w["peer"]) for w in rejoined] == [(2, 3, "d1")], rejoined
    assert rejoined[0]["loss"] == rejoined[0]["source_loss"]
    record = fleet.ctx.ledger.vms.get("d3")
    assert record.host == "near" and record.spec.network.address == address  # type: ignore[union-attr]
    assert fleet.ctx.host("far").find_guest("d3") is None
    assert fleet.ctx.ledger.vms.get("d1").host == "near"

    # Three VMs until d2 was destroyed (d3 by its new incarnation from step 3), two to the end. A step trained again
    # after a restart counts as it was last trained.
    worlds = {1: 3, 2: 3, 3: 3, 4: 3, 5: 3, 6: 3, 7: 2, 8: 2}
    reference = single_process(tmp_path, STEPS)
    for vm, trained in (("d1", range(1, STEPS + 1)), ("d3", range(3, STEPS + 1))):
        steps = {p.step: p for p in parse_progress(ddp_log(fleet, vm))}
        assert sorted(steps) == list(trained), sorted(steps)
        assert {s: steps[s].world_size for s in trained} == {s: worlds[s] for s in trained}
        largest = max(abs(steps[s].loss - reference[s - 1]) for s in steps)
        print(f"{vm}: largest loss difference from one process with batch {BATCH}: {largest:.2e} (steps "
              f"{trained.start}-{STEPS}, worlds {[worlds[s] for s in trained]})")
        assert largest < 1e-3, ([steps[s].loss for s in sorted(steps)], reference)
    assert result["result"]["start_step"] == 6 and result["result"]["final_step"] == STEPS
    # Both survivors hold the job's last checkpoint: hvctl checkpoint takes it out as for any training.
    fetched = fleet.hvctl("checkpoint", "d3", "--out", str(tmp_path / "out"), "--json")
    assert fetched.returncode == 0, fetched.stderr
    assert json.loads(fetched.stdout)["checkpoint"].endswith(f"ckpt-{STEPS:08d}.pt")
