"""Training throughput of guest.workloads.train: steps/s and samples/s for each objective.

- ssl: causal-LM steps on the shipped corpus (fp32 on CPU, bf16 autocast on GPU); --shape picks the model (tiny is the
  workload's default model; small/1b are random-weight Llama shapes saved to a temporary directory first);
- rl / seed-rl: the contextual-bandit policy (an MLP: these measure loop overhead more than compute).
Each objective runs a short warm-up call first (allocations, first kernels), then --steps measured steps; a
checkpoint every --checkpoint-every steps is included when asked, since real runs pay for it.

Usage: benchmarks/bench_train.py [--shape tiny|small|1b] [--steps N] [--batch-size B] [--seq-len L] [--threads T]
       [--checkpoint-every K] [--out FILE]. The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from guest.workloads.assets import build_random_llama, read_corpus, save_llm, tiny_llama_config, train_tokenizer  # noqa: E402
from guest.workloads.llm_fast import llama_1b_config  # noqa: E402
from guest.workloads.schema import Objective, TrainRequest, TrainResult  # noqa: E402
from guest.workloads.train import train  # noqa: E402

_PREFIX = "bench-train-"  # temporary model/checkpoint directories, removed on exit


def model_dir_for(shape: str, workdir: Path) -> str | None:
    if shape == "tiny":
        return None  # the workload's own default model
    tokenizer = train_tokenizer(read_corpus())
    config = llama_1b_config(512) if shape == "1b" else tiny_llama_config(8192, 256, 4, 8, 4, 704, 256)
    return str(save_llm(workdir / shape, build_random_llama(config, seed=0), tokenizer))


def main() -> int:
    try:
        return _run()
    finally:
        for leftover in Path(tempfile.gettempdir()).glob(f"{_PREFIX}{os.getpid()}-*"):
            shutil.rmtree(leftover, ignore_errors=True)


def _run() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["tiny", "small", "1b"], default="tiny")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rl-batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=64)
    # One thread by default: on the shared 2-core machines a second torch thread contends with whatever else runs
    # (a TCG guest, say) and spin-waits, which made ssl steps 10x slower in a measured run.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gpu = torch.cuda.is_available()
    workdir = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-"))
    model_dir = model_dir_for(args.shape, workdir)

    lines: list[str] = []

    def report(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    device_name = torch.cuda.get_device_name() if gpu else "cpu"
    report(
        f"# bench_train {datetime.now():%Y-%m-%d %H:%M} on {platform.node()}: {platform.machine()}, {os.cpu_count()} "
        f"cores (load {os.getloadavg()[0]:.2f}), torch {torch.__version__} ({args.threads} threads), "
        f"device {device_name}"
    )
    report(
        f"# ssl: {args.shape} model, batch {args.batch_size} x {args.seq_len} tokens; rl/seed-rl: batch "
        f"{args.rl_batch_size}; {args.steps} measured steps after a 3-step warm-up; checkpoint every "
        f"{args.checkpoint_every or 'never'}"
    )
    results: dict[str, TrainResult] = {}
    objectives: tuple[Objective, ...] = ("ssl", "rl", "seed-rl")
    for objective in objectives:
        batch = args.batch_size if objective == "ssl" else args.rl_batch_size
        common = {"objective": objective, "batch_size": batch, "seq_len": args.seq_len, "model_dir": model_dir}
        train(TrainRequest(steps=3, **common))  # type: ignore[arg-type]
        checkpoints = {}
        if args.checkpoint_every:
            checkpoints = {
                "checkpoint_dir": str(workdir / f"ck-{objective}"),
                "checkpoint_every": args.checkpoint_every,
            }
        result = train(TrainRequest(steps=args.steps, **common, **checkpoints))  # type: ignore[arg-type]
        results[objective] = result
        tokens = f", {result.samples_per_s * args.seq_len:8.0f} tokens/s" if objective == "ssl" else ""
        report(
            f"{objective:8s} {result.steps_per_s:8.2f} steps/s  {result.samples_per_s:9.1f} samples/s{tokens}  "
            f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}  autocast {result.autocast_dtype}"
        )
    ssl, rl, seed_rl = results["ssl"], results["rl"], results["seed-rl"]
    report(
        f"ssl_steps_s={ssl.steps_per_s:.2f} ssl_samples_s={ssl.samples_per_s:.1f} "
        f"ssl_tokens_s={ssl.samples_per_s * args.seq_len:.0f} rl_steps_s={rl.steps_per_s:.2f} "
        f"rl_samples_s={rl.samples_per_s:.1f} seed_rl_steps_s={seed_rl.steps_per_s:.2f} "
        f"device={'cuda' if gpu else 'cpu'}"
    )
    out = args.out or Path(__file__).resolve().parent / "results" / f"bench_train_{'gpu' if gpu else 'cpu'}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
