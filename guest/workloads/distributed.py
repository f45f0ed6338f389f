"""Data-parallel training across VMs: one elastic launcher (``torch.distributed.run``) per VM, DDP in its worker.

How a job runs (hvctl's ``run --vms a,b,c train --distributed`` drives it through each VM's agent):

- Every VM runs ``python -m guest.workloads run train-ddp``: :func:`launch`. It finds the NIC that holds the VM's
  tenant-network address (gloo and NCCL must talk there, not on the NAT'd management NIC), imports the launcher,
  prints a ``{"ready": ...}`` line and waits for hvctl's go (a file hvctl creates through the agent once every VM is
  ready). The barrier makes all VMs join the first rendezvous together, so the job starts with every VM rather than
  the first few to finish importing torch.
- The launchers rendezvous through the c10d store on the first VM (``is_host``), each advertising its tenant address
  (``--local-addr``), and start one worker each: ``run train --distributed``, that is :func:`join` below plus the
  ordinary training loop of ``train.py``. The worker is forked from a forkserver that imports the training code
  once, with the first worker, so an elastic restart does not import torch again.
- The global batch of B windows is the one a single process would draw; rank r of W trains on the r-th of W equal
  slices and DDP averages the gradients, so a step is the single-process step with batch B up to float rounding.
  Every rank keeps the same data position, RNG states, model and optimizer, so each writes the same checkpoint to
  its own disk, and any survivor can restart the job.
- A VM that dies leaves its peers blocked in a collective until ``collective_timeout_s``; their workers fail, the
  launchers rendezvous again with whoever is left (at least ``min_nodes``) and the new workers resume from the newest
  checkpoint any rank holds (:func:`agree_on_checkpoint`), now with slices of B/W' for the new world size W'.

torch is imported inside the functions that use it, after :func:`launch` has set the environment that torch's
process groups read (the tenant NIC for gloo and NCCL, a fresh store per rendezvous round): nothing of torch is
loaded before that environment is in place.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import socket
import struct
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from .errors import WorkloadError
from .protocol import Ready, ready_line

RDZV_PORT = 29400
_SIOCGIFADDR = 0x8915


@dataclass(frozen=True)
class Group:
    rank: int
    world_size: int


@dataclass(frozen=True)
class LaunchOptions:
    job: str
    rendezvous: str  # the first VM's tenant address
    local_address: str  # this VM's tenant address
    min_nodes: int
    max_nodes: int
    max_restarts: int
    train_args: list[str]
    hosts_store: bool  # this VM hosts the rendezvous store (the first VM, whose address is ``rendezvous``)
    port: int = RDZV_PORT
    go_file: str | None = None  # wait for this file before joining; None joins at once
    join_timeout_s: int = 600


def interface_of(address: str) -> str:
    """The name of the NIC that holds IPv4 ``address``."""
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                packed = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on this one
                continue
        if socket.inet_ntoa(packed[20:24]) == address:
            return name
    raise WorkloadError(f"no network interface here has the address {address}; is this VM on the tenant network?")


def worker_argv(options: LaunchOptions) -> list[str]:
    """The worker's command line, as ``python -m guest.workloads`` reads it."""
    return ["run", "train", *options.train_args, "--distributed", "--json"]


def launcher_argv(options: LaunchOptions) -> list[str]:
    """torch.distributed.run's arguments for this node, as ``torchrun`` would take them: the worker is
    ``python -m guest.workloads run train ... --distributed``, started from the launcher's forkserver."""
    return [
        f"--nnodes={options.min_nodes}:{options.max_nodes}",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={options.rendezvous}:{options.port}",
        f"--rdzv-id={options.job}",
        # last_call: once min_nodes have joined a round, how long it stays open for the rest. hvctl's go barrier
        # makes every VM join within moments of the others, so a short one only shortens each restart.
        f"--rdzv-conf=is_host={int(options.hosts_store)},join_timeout={options.join_timeout_s},last_call_timeout=10",
        f"--max-restarts={options.max_restarts}",
        f"--local-addr={options.local_address}",
        "--monitor-interval=1",
        "--start-method=forkserver",
        "-m", "guest.workloads", *worker_argv(options),
    ]


def launch(options: LaunchOptions) -> None:
    """This VM's part of the job: the elastic agent and its worker, until the job ends. Raises WorkloadError when the
    job fails here (the launcher's own account of why is on stderr)."""
    nic = interface_of(options.local_address)
    os.environ["GLOO_SOCKET_IFNAME"] = nic
    os.environ["NCCL_SOCKET_IFNAME"] = nic
    # Each rendezvous round gets a fresh store for its workers' process group (hosted by that round's rank 0).
    # torch's default shares the rendezvous store across rounds, and a restarted worker then reads the previous
    # round's gloo addresses and hangs connecting to them.
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    from torch.distributed import run as elastic
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    # torchrun's own parsing of its command line (the launcher's config), with the worker a function of ours.
    config, _, _ = elastic.config_from_args(elastic.parse_args(launcher_argv(options)))  # type: ignore[no-untyped-call]
    # Workers are forked from a forkserver that imports the training code once: a worker that torchrun started as
    # a new interpreter imported torch and transformers again at each elastic restart, which under TCG took minutes.
    # The forkserver starts with the first worker, after the first rendezvous: importing before it would compete
    # with this launcher for the VM's CPU while the others wait for it to join.
    multiprocessing.set_forkserver_preload([f"{__package__}.train"])
    print(ready_line(Ready(interface=nic, address=options.local_address)), flush=True)
    if options.go_file is not None:  # this VM's own, read once
        _wait_for(Path(options.go_file), options.join_timeout_s)
        Path(options.go_file).unlink(missing_ok=True)
    try:
        elastic_launch(config, entrypoint=run_worker)(*worker_argv(options))
    except ChildFailedError as error:
        raise WorkloadError(f"distributed training failed on this VM: {error.get_first_failure()[1].message}") \
            from error
    except Exception as error:  # rendezvous timeouts, a store that went away with the first VM
        raise WorkloadError(f"distributed training failed on this VM: {type(error).__name__}: {error}") from error


def run_worker(*argv: str) -> None:
    """A worker, in a process the launcher's forkserver forked: ``python -m guest.workloads`` with ``argv``."""
    from .__main__ import main  # here: __main__ imports this module

    code = main(list(argv))
    if code:
        raise SystemExit(code)


def _wait_for(path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise WorkloadError(f"hvctl did not start the job within {timeout_s:.0f} s of this VM being ready")
        time.sleep(0.2)


def join(collective_timeout_s: float) -> Group:
    """Inside a worker the launcher started: join the process group (gloo on CPU, NCCL when CUDA is here)."""
    import torch
    import torch.distributed as dist

    if "RANK" not in os.environ:
        raise WorkloadError("--distributed runs under torch.distributed.run (hvctl run --vms ... --distributed)")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=collective_timeout_s))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Group(dist.get_rank(), dist.get_world_size())


def leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def shard_of(batch_size: int, group: Group) -> slice:
    """Rank r's rows of a global batch: the r-th of world_size equal slices."""
    if batch_size % group.world_size:
        raise WorkloadError(f"a global batch of {batch_size} does not split evenly over {group.world_size} ranks")
    share = batch_size // group.world_size
    return slice(group.rank * share, (group.rank + 1) * share)


def mean_over_ranks(value: Any, group: Group) -> float:
    """The mean of a scalar tensor over all ranks (each rank's loss is its slice's mean; slices are equal)."""
    import torch.distributed as dist

    total = value.detach().clone()
    dist.all_reduce(total)
    return float(total) / group.world_size


def agree_on_checkpoint(latest: Path | None) -> tuple[int, bytes] | None:
    """The newest checkpoint any rank holds, as (step, file bytes), sent to every rank by the lowest rank holding it.

    A VM that joined late, or lost its disk, has none or an older one; the job goes on from the newest. Only tensors
    cross the wire (no pickles between VMs): the caller loads the bytes with ``weights_only`` as it would the file.
    """
    import torch
    import torch.distributed as dist

    from .checkpoint import checkpoint_step

    mine = torch.tensor([checkpoint_step(latest) if latest is not None else -1], dtype=torch.int64)
    steps = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(steps, mine)
    newest = max(int(s) for s in steps)
    if newest < 0:
        return None
    source = min(rank for rank, s in enumerate(steps) if int(s) == newest)
    size = torch.zeros(1, dtype=torch.int64)
    data = b""
    if dist.get_rank() == source:
        assert latest is not None
        data = latest.read_bytes()
        size[0] = len(data)
    dist.broadcast(size, src=source)
    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(buffer, src=source)
    return newest, buffer.numpy().tobytes()
