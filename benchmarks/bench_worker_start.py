"""What starting a training workload costs, the two ways of starting one, in one run.

Two places start one: the agent, for every `hvctl run NAME train|llm|...`, and torchrun, for each worker of a
`train --distributed` job at the first rendezvous and again at every elastic restart. Started as a new interpreter
(the agent's Popen, and torchrun's default for a module entry point), a workload imports torch and transformers
each time; forked from a forkserver that imported them once (the launcher's now, guest/workloads/distributed.py;
the agent's in guest/warm.py, not on yet), it does not. Both sides here run the same workload, the ssl
training of the guest's tiny model for one step, to its end, on this machine:

- fresh: ``python -m guest.workloads run train ...`` as a new process;
- forked: ``distributed.run_worker(...)`` in a process forked from a forkserver that preloaded
  ``guest.workloads.train`` (its own start, once, is reported apart).

Under TCG a torch + transformers import took 45 s in an `ml` guest against 4 s here, so the ratio in a VM is larger
than this machine's. Usage: benchmarks/bench_worker_start.py [--runs N] [--out FILE]. The last line is
machine-readable.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing import forkserver
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Report  # noqa: E402

from guest.workloads.distributed import run_worker  # noqa: E402


def worker_argv(checkpoints: Path) -> list[str]:
    return ["run", "train", "--objective", "ssl", "--steps", "1", "--checkpoint-every", "0",
            "--checkpoint-dir", str(checkpoints), "--json"]


def fresh(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "guest.workloads", *argv], check=True, stdout=subprocess.DEVNULL,
                   env=os.environ | {"PYTHONPATH": str(ROOT)}, cwd=ROOT)
    return time.perf_counter() - started


def forked(context: multiprocessing.context.BaseContext, argv: list[str]) -> float:
    started = time.perf_counter()
    process = context.Process(target=run_worker, args=tuple(argv))  # type: ignore[attr-defined]
    process.start()
    process.join()
    assert process.exitcode == 0, process.exitcode
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_worker_start.txt")
    args = parser.parse_args()
    report = Report()
    with tempfile.TemporaryDirectory() as scratch:
        argv = worker_argv(Path(scratch))
        multiprocessing.set_forkserver_preload(["guest.workloads.train"])
        context = multiprocessing.get_context("forkserver")
        # The forkserver writes where this process's stdout pointed when it started: the workers' JSON lines go
        # to /dev/null, as the fresh ones' do.
        saved = os.dup(1)
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        try:
            started = time.perf_counter()
            forkserver.ensure_running()
            first = forked(context, argv)  # waits for the preload
            server_s = time.perf_counter() - started
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        fresh_s = [fresh(argv) for _ in range(args.runs)]
        forked_s = [forked(context, argv) for _ in range(args.runs)]
    f, k = statistics.median(fresh_s), statistics.median(forked_s)
    report.say(f"# {platform.node()}: {os.cpu_count()} CPUs; python {platform.python_version()}; one ssl step of the "
               f"tiny model per worker, to its end; median of {args.runs} runs each")
    report.say(f"forkserver start with its preload, and its first worker: {server_s:.2f} s (the worker {first:.2f} s)")
    report.say(f"fresh interpreter   {f:6.2f} s  (runs: {', '.join(f'{x:.2f}' for x in fresh_s)})")
    report.say(f"forked, preloaded   {k:6.2f} s  (runs: {', '.join(f'{x:.2f}' for x in forked_s)})")
    report.say(f"fresh_s={f:.3f} forked_s={k:.3f} forkserver_start_s={server_s:.3f} ratio={f / k:.2f}")
    report.save(args.out)


if __name__ == "__main__":
    main()
