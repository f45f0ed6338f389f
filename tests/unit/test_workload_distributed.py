"""Distributed ssl training with real processes on this machine: each rank is the launcher a VM runs
(``python -m guest.workloads run train-ddp``), with gloo over loopback. The VM test (test_vm_distributed) does the same
across VMs on a tenant network; here the math and the elastic restart are checked quickly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from guest.workloads.distributed import Group, shard_of
from guest.workloads.errors import WorkloadError
from guest.workloads.schema import TrainRequest
from guest.workloads.train import train

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ["--objective", "ssl", "--batch-size", "6", "--seq-len", "16", "--seed", "3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Job:
    """``ranks`` launchers of one job, each in its own session (so one can be killed with all it started)."""

    def __init__(self, tmp: Path, ranks: int, min_nodes: int, steps: int, checkpoint_every: int,
                 hold: dict[int, str] | None = None) -> None:
        self.tmp, self.ranks, self.min_nodes, self.steps = tmp, ranks, min_nodes, steps
        self.checkpoint_every, self.port = checkpoint_every, free_port()
        self.logs = [tmp / f"rank{i}.log" for i in range(ranks)]
        self.go = [tmp / f"go{i}" for i in range(ranks)]  # each VM's own go file
        self.cancelled: set[int] = set()  # ranks whose launcher was cancelled, and has not been started again
        self.procs = [self.launch(i, (hold or {}).get(i), self.go[i], tmp / f"ck{i}") for i in range(ranks)]
        # The go barrier hvctl keeps: every launcher has imported torch before any joins the rendezvous.
        self.wait_for(lambda: all(any('"ready"' in line for line in self.lines(i)) for i in range(ranks)))
        for go in self.go:
            go.touch()

    def launch(self, i: int, hold: str | None, go: Path | None, checkpoints: Path) -> subprocess.Popen[bytes]:
        """Launcher ``i``: it waits for ``go`` before its first rendezvous, or with None joins at once (a VM that
        comes back into a running job, as a member's new incarnation after a checkpoint migration does)."""
        # TMPDIR: torch.distributed.run makes a torchelastic_* directory per launch and leaves it behind.
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TMPDIR": str(self.tmp)}
        if hold is not None:  # the fault hook: this launcher's worker stops after that step
            env["HVCTL_TEST_HOLD_AFTER_STEP"] = hold
        argv = [sys.executable, "-m", "guest.workloads", "run", "train-ddp", "--job", f"t{self.port}",
                "--rendezvous", "127.0.0.1", "--address", "127.0.0.1", "--port", str(self.port),
                "--min-nodes", str(self.min_nodes), "--max-nodes", str(self.ranks),
                *(["--go-file", str(go)] if go is not None else []), *(["--hosts-store"] if i == 0 else []), "--",
                *TRAIN, "--steps", str(self.steps), "--checkpoint-every", str(self.checkpoint_every),
                "--checkpoint-dir", str(checkpoints), "--json"]
        with self.logs[i].open("a") as log:
            return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def rejoin(self, rank: int) -> None:
        """A new launcher for ``rank``, with an empty checkpoint directory, into the running job; its log starts
        afresh."""
        self.logs[rank].write_text("")
        self.cancelled.discard(rank)
        self.procs[rank] = self.launch(rank, None, None, self.tmp / f"ck{rank}-new")

    def lines(self, rank: int) -> list[str]:
        return self.logs[rank].read_text(errors="replace").splitlines()

    def progress(self, rank: int) -> list[dict[str, object]]:
        return [json.loads(line)["progress"] for line in self.lines(rank) if line.startswith('{"progress"')]

    def result(self, rank: int) -> dict[str, object]:
        results = [json.loads(line) for line in self.lines(rank) if line.startswith('{"objective"')]
        assert results, "\n".join(self.lines(rank)[-20:])
        return dict(results[-1])

    def wait_for(self, condition: object) -> None:
        while not condition():  # type: ignore[operator]
            live = [p for i, p in enumerate(self.procs) if i not in self.cancelled]
            assert all(p.poll() in (None, 0) for p in live), [self.lines(i)[-5:] for i in range(len(self.procs))]
            time.sleep(0.1)

    def kill(self, rank: int) -> None:
        """What a VM's death does to its rank: the launcher and its worker (which torch starts in a session of its
        own) are gone, and their sockets with them."""
        worker = [int(pid) for children in Path(f"/proc/{self.procs[rank].pid}/task").glob("*/children")
                  for pid in children.read_text().split()]
        os.killpg(self.procs[rank].pid, signal.SIGKILL)
        for pid in worker:
            os.kill(pid, signal.SIGKILL)
        self.procs[rank].wait()

    def cancel(self, rank: int) -> None:
        """What the agent's ``workload.cancel`` does: SIGTERM to the launcher's process group, then wait."""
        os.killpg(self.procs[rank].pid, signal.SIGTERM)
        self.procs[rank].wait(timeout=60)
        self.cancelled.add(rank)

    def finish(self, ranks: list[int]) -> None:
        for i in ranks:
            assert self.procs[i].wait(timeout=240) == 0, "\n".join(self.lines(i)[-30:])
            assert not self.go[i].exists()  # read once, and removed by the launcher that read it

    def stop(self) -> None:
        for rank, p in enumerate(self.procs):
            if p.poll() is None:
                self.kill(rank)


@pytest.fixture
def jobs(tmp_path: Path) -> Iterator[list[Job]]:
    made: list[Job] = []
    yield made
    for job in made:
        job.stop()


def single_process(steps: int) -> list[float]:
    """The reference: one process, the whole global batch of 6, the same data and seed."""
    request = TrainRequest(objective="ssl", steps=steps, batch_size=6, seq_len=16, seed=3)
    return list(train(request).losses)


@pytest.mark.timeout(300)
def test_two_ranks_with_a_global_batch_reproduce_one_process_with_that_batch(tmp_path: Path, jobs: list[Job]) -> None:
    jobs.append(job := Job(tmp_path, ranks=2, min_nodes=2, steps=6, checkpoint_every=3))
    job.finish([0, 1])
    reference = single_process(6)
    for rank in (0, 1):
        result = job.result(rank)
        assert (result["rank"], result["world_size"], result["final_step"]) == (rank, 2, 6)
        losses = list(result["losses"])  # type: ignore[call-overload]
        largest = max(abs(a - b) for a, b in zip(losses, reference, strict=True))
        print(f"rank {rank}: largest loss difference from one process with the global batch: {largest:.2e}")
        assert largest < 1e-4, (losses, reference)
        assert [p["rank"] for p in job.progress(rank)] == [rank] * 6
    # Each rank wrote the same checkpoint to its own directory: either one can carry the job on.
    a = torch.load(tmp_path / "ck0" / "ckpt-00000006.pt", weights_only=True)
    b = torch.load(tmp_path / "ck1" / "ckpt-00000006.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.timeout(300)
def test_a_rank_killed_mid_run_leaves_the_rest_to_finish_from_the_last_checkpoint(tmp_path: Path,
                                                                                   jobs: list[Job]) -> None:
    steps = 16
    # The fault: the launcher of rank 2 holds its worker after step 10 (the others wait for it in step 11's
    # all-reduce) and is killed, worker and all, once it has reported that step and its checkpoint.
    jobs.append(job := Job(tmp_path, ranks=3, min_nodes=2, steps=steps, checkpoint_every=5, hold={2: "10"}))
    job.wait_for(lambda: any(p["step"] == 10 and p["checkpoint"] for p in job.progress(2)))
    job.kill(2)
    job.finish([0, 1])
    reference = single_process(steps)
    for rank in (0, 1):
        result = job.result(rank)
        assert result["world_size"] == 2 and result["final_step"] == steps
        start = int(result["start_step"])  # type: ignore[call-overload]
        assert start == 10
        losses = list(result["losses"])  # type: ignore[call-overload]
        largest = max(abs(a - b) for a, b in zip(losses, reference[start:], strict=True))
        print(f"rank {rank} resumed at step {start} with 2 ranks; largest loss difference: {largest:.2e}")
        assert largest < 1e-3


@pytest.mark.timeout(300)
def test_a_rank_cancelled_and_started_again_elsewhere_rejoins_the_running_job(tmp_path: Path,
                                                                           jobs: list[Job]) -> None:
    """What a checkpoint migration of one member does (hvctl.ops.ckpt_migrate): its launcher is cancelled, the
    rest re-form without it and go on; its new incarnation's launcher, with no checkpoint of its own, joins the
    running job, which re-forms with it from the newest checkpoint any rank holds."""
    steps = 12
    # The hooks: rank 2 holds after step 4 until it is cancelled; ranks 0 and 1, re-formed without it, hold after
    # step 8 for as long as the job has fewer than 3 ranks, so the job cannot end before rank 2 is back.
    jobs.append(job := Job(tmp_path, ranks=3, min_nodes=2, steps=steps, checkpoint_every=4,
                           hold={0: "8 3", 1: "8 3", 2: "4"}))
    job.wait_for(lambda: any(p["step"] == 4 and p["checkpoint"] for p in job.progress(2)))
    job.cancel(2)
    job.wait_for(lambda: any(p["step"] == 8 and p["world_size"] == 2 for p in job.progress(0)))  # went on without it
    job.rejoin(2)
    job.finish([0, 1, 2])
    reference = single_process(steps)
    worlds = {1: 3, 2: 3, 3: 3, 4: 3, 5: 2, 6: 2, 7: 2, 8: 2} | {s: 3 for s in range(9, steps + 1)}
    for rank in (0, 1, 2):
        seen = {int(p["step"]): p for p in job.progress(rank)}  # type: ignore[call-overload]
        result = job.result(rank)
        assert (result["world_size"], result["start_step"], result["final_step"]) == (3, 8, steps), result
        assert {s: p["world_size"] for s, p in seen.items()} == {s: worlds[s] for s in seen}
        largest = max(abs(float(p["loss"]) - reference[s - 1]) for s, p in seen.items())  # type: ignore[arg-type]
        print(f"rank {rank}: steps {min(seen)}-{max(seen)}; largest loss difference from one process {largest:.2e}")
        assert largest < 1e-3
    assert sorted(int(p["step"]) for p in job.progress(2)) == list(range(9, steps + 1))  # type: ignore[call-overload]
    assert sorted({int(p["step"]) for p in job.progress(0)}) == list(range(1, steps + 1))  # type: ignore[call-overload]


@pytest.mark.timeout(300)
def test_a_checkpoint_restored_into_one_vm_resumes_the_whole_job(tmp_path: Path, jobs: list[Job]) -> None:
    """`hvctl restore VM CKPT` puts a checkpoint into one VM only; the next distributed run resumes from it on every
    rank (they agree on the newest checkpoint any of them holds)."""
    earlier = train(TrainRequest(objective="ssl", steps=6, batch_size=6, seq_len=16, seed=3,
                                 checkpoint_dir=str(tmp_path / "ck1"), checkpoint_every=3))
    (tmp_path / "ck1" / "ckpt-00000006.pt").unlink()  # rank 1 keeps step 3's; rank 0 has none
    jobs.append(job := Job(tmp_path, ranks=2, min_nodes=2, steps=6, checkpoint_every=3))
    job.finish([0, 1])
    for rank in (0, 1):
        result = job.result(rank)
        assert (result["start_step"], result["final_step"]) == (3, 6)
        losses = list(result["losses"])  # type: ignore[call-overload]
        largest = max(abs(a - b) for a, b in zip(losses, earlier.losses[3:], strict=True))
        assert largest < 1e-4, (losses, earlier.losses)


def test_a_global_batch_that_does_not_split_evenly_is_refused() -> None:
    assert shard_of(6, Group(rank=1, world_size=3)) == slice(2, 4)
    with pytest.raises(WorkloadError, match="a global batch of 6 does not split evenly over 4 ranks"):
        shard_of(6, Group(rank=0, world_size=4))


def test_distributed_outside_a_launcher_or_for_rl_is_refused() -> None:
    from guest.workloads import __main__ as cli

    with pytest.raises(ValueError, match="data-parallel training is for the ssl objective"):
        TrainRequest(objective="rl", steps=2, distributed=True)
    assert "RANK" not in os.environ
    assert cli.main(["run", "train", "--objective", "ssl", "--steps", "1", "--distributed"]) == 1
