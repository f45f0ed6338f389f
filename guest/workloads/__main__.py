"""Developer CLI: ``python -m guest.workloads run llm|perception|perception-train|train ...``, ``make-tiny-llm DIR``,
``make-media-samples DIR``.

Output is human-readable, or one JSON document with ``--json`` (with ``--stream --json``, one JSON line per token
first). Errors are one line on stderr with the error class's own exit code (``errors.py``: 2 bad request, 3 model
dir, 4 prompt too long, 5 bad media, 6 checkpoint mismatch, 7 out of memory, 1 any other workload error).

Each handler imports its workload's module inside its own body: the agent starts this CLI for every workload, and
one kind must not pay for another's imports (torch, transformers, onnxruntime, numpy take seconds, and minutes in
a TCG guest). A function-local import in this module has that reason.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ..kinds import KINDS
from ..validation import describe
from .distributed import RDZV_PORT
from .errors import WorkloadError
from .protocol import progress_line
from .schema import LLMRequest, PerceptionRequest, PerceptionTrainRequest, Sampling, TokenEvent, TrainRequest

HOLD_FILE = Path("/run/hvctl-test/hold-after-step")  # the fault hook of _run_train, for VM tests

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m guest.workloads", description="run hvctl guest workloads locally")
    commands = parser.add_subparsers(dest="command", required=True)
    tiny = commands.add_parser("make-tiny-llm", help="write the tiny tokenizer + random Llama to DIR")
    tiny.add_argument("directory")
    tiny.add_argument("--seed", type=int, default=0)
    samples = commands.add_parser("make-media-samples", help="write synthetic PNG/WAV/caption samples to DIR")
    samples.add_argument("directory")
    samples.add_argument("--count", type=int, default=4)
    samples.add_argument("--seed", type=int, default=7)

    run = commands.add_parser("run", help="run one workload").add_subparsers(dest="workload", required=True)
    llm = run.add_parser("llm", help=KINDS["llm"].summary)
    llm.add_argument("--model", required=True)
    llm.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    llm.add_argument("--max-new-tokens", type=int, default=32)
    llm.add_argument("--temperature", type=float, help="sample instead of greedy decoding")
    llm.add_argument("--top-p", type=float, default=1.0)
    llm.add_argument("--seed", type=int, default=0)
    llm.add_argument("--ignore-eos", action="store_true", help="always generate max-new-tokens")
    # "torch" is the old name of "eager" (HF generate), kept for scripts that use it.
    llm.add_argument("--backend", choices=["eager", "torch", "onnx", "fast"], default="eager")
    llm.add_argument("--weights", choices=["native", "int8"], default="native", help="int8: --backend fast only")
    llm.add_argument("--stream", action="store_true")

    perception = run.add_parser("perception", help=KINDS["perception"].summary)
    perception.add_argument("--model", required=True)
    perception.add_argument("--text")
    perception.add_argument("--image")
    perception.add_argument("--audio")

    ptrain = run.add_parser("perception-train", help=KINDS["perception-train"].summary)
    ptrain.add_argument("--out", required=True)
    ptrain.add_argument("--epochs", type=int, default=5)
    ptrain.add_argument("--seed", type=int, default=0)
    ptrain.add_argument("--no-compare", action="store_true", help="skip the single-modality baselines")

    training = run.add_parser("train", help=KINDS["train"].summary)
    training.add_argument("--objective", choices=["ssl", "rl", "seed-rl"], required=True)
    training.add_argument("--steps", type=int, required=True)
    training.add_argument("--batch-size", type=int, default=8)
    training.add_argument("--seq-len", type=int, default=64)
    training.add_argument("--lr", type=float, default=3e-3)
    training.add_argument("--seed", type=int, default=0)
    training.add_argument("--model", help="ssl: start from this model directory")
    training.add_argument("--checkpoint-every", type=int, default=0)
    training.add_argument("--checkpoint-dir")
    training.add_argument("--no-resume", action="store_true")
    training.add_argument("--export", help="ssl: write the trained model here as a transformers directory")
    training.add_argument("--distributed", action="store_true",
                          help="ssl: be one rank of a data-parallel job (under torch.distributed.run)")
    training.add_argument("--collective-timeout", type=float, default=120.0,
                          help="distributed: seconds a rank waits for its peers in a collective")

    ddp = run.add_parser("train-ddp", help=KINDS["train-ddp"].summary)
    ddp.add_argument("--job", required=True, help="rendezvous id, the same on every VM")
    ddp.add_argument("--rendezvous", required=True, help="the first VM's tenant address (it hosts the store)")
    ddp.add_argument("--address", required=True, help="this VM's tenant address")
    ddp.add_argument("--min-nodes", type=int, required=True)
    ddp.add_argument("--max-nodes", type=int, required=True)
    ddp.add_argument("--hosts-store", action="store_true", help="this is the first VM: it hosts the rendezvous")
    ddp.add_argument("--port", type=int, default=RDZV_PORT, help="the rendezvous port")
    ddp.add_argument("--max-restarts", type=int, default=3)
    ddp.add_argument("--go-file", help="join the rendezvous once this file exists")
    ddp.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the train workload's arguments")
    for sub in (llm, perception, ptrain, training):
        sub.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
        sub.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def _emit(result: BaseModel, as_json: bool, summary: Callable[[Any], str]) -> None:
    print(result.model_dump_json() if as_json else summary(result))


def _run_llm(args: argparse.Namespace) -> None:
    sampling = (
        None if args.temperature is None else Sampling(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    )
    request = LLMRequest(
        model_dir=args.model,
        prompts=tuple(args.prompt),
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        stop_at_eos=not args.ignore_eos,
        device=args.device,
        weights=args.weights,
    )

    def stream(event: TokenEvent) -> None:
        if args.json:
            print(event.model_dump_json(), flush=True)
        else:  # a batch streams interleaved; prefix each piece with its prompt number
            prefix = f"[{event.sequence}] " if len(request.prompts) > 1 else ""
            print(f"{prefix}{event.text}", end="\n" if prefix else "", flush=True)

    callback = stream if args.stream else None
    if args.backend == "onnx":
        from .llm_onnx import generate_onnx

        result = generate_onnx(request, on_token=callback)
    elif args.backend == "fast":
        from .llm_fast import generate_fast

        result = generate_fast(request, on_token=callback)
    else:
        from .llm import generate

        result = generate(request, on_token=callback)
    if args.stream and not args.json:
        print()

    def summary(r: Any) -> str:
        lines = [] if args.stream else [f"--- {i}: {c.text!r} ({c.finish_reason})" for i, c in enumerate(r.completions)]
        backend = f"{r.backend}/{r.provider}" if r.provider else r.backend
        lines.append(
            f"{backend} on {r.device} {r.dtype}: ttft {r.ttft_s * 1e3:.1f} ms, "
            f"prompt {r.prompt_tokens_per_s:.0f} tok/s, decode {r.decode_tokens_per_s:.0f} tok/s, "
            f"peak {r.peak_memory_bytes / 2**20:.0f} MiB ({r.peak_memory_source})"
        )
        return "\n".join(lines)

    _emit(result, args.json, summary)


def _run_perception(args: argparse.Namespace) -> None:
    from .perception import classify

    request = PerceptionRequest(
        model_dir=args.model, text=args.text, image_path=args.image, audio_path=args.audio, device=args.device
    )
    result = classify(request)
    probabilities = ", ".join(f"{k} {v:.2f}" for k, v in result.probabilities.items())
    _emit(result, args.json, lambda r: f"{r.label}  ({probabilities}; from {', '.join(r.modalities)})")


def _run_perception_train(args: argparse.Namespace) -> None:
    from .perception import train_perception

    request = PerceptionTrainRequest(
        out_dir=args.out,
        epochs=args.epochs,
        seed=args.seed,
        compare_single_modalities=not args.no_compare,
        device=args.device,
    )
    if not args.json:
        print(f"training on the synthetic task ({request.epochs} epochs) ...", flush=True)
    result = train_perception(request)

    def summary(r: Any) -> str:
        singles = ", ".join(f"{m} {a:.3f}" for m, a in r.single_modality_accuracy.items()) or "not run"
        alpha = ", ".join(f"{a:.3f}" for a in r.weights.alpha)
        w = "; ".join(", ".join(f"{m} {v:.3f}" for m, v in row.items()) for row in r.weights.w)
        return (
            f"fusion test accuracy {r.test_accuracy:.3f} (chance {r.chance_accuracy:.3f}); single modality: {singles}\n"
            f"alpha [{alpha}]; w per head [{w}]\nsaved to {r.model_dir} in {r.train_seconds:.1f} s"
        )

    _emit(result, args.json, summary)


def _run_train(args: argparse.Namespace) -> None:
    # SIGUSR1 asks for a checkpoint at the next step boundary (the agent's workload.checkpoint); training goes on.
    asked = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: asked.set())

    def checkpoint_requested() -> bool:
        if asked.is_set():
            asked.clear()
            return True
        return False

    # A fault hook for tests, rules separated by ";" or lines: "STEP" stops this process for good after it reports
    # that step or a later one (it waits to be killed); "STEP WORLD" after it reports exactly that step in a job of
    # fewer than WORLD ranks (a distributed worker its launcher restarts into a larger world goes on). The variable
    # is for a process a test starts itself; the file for a workload a test starts in a VM through hvctl (it writes
    # the file with the agent's exec first).
    hook = os.environ.get("HVCTL_TEST_HOLD_AFTER_STEP") or (HOLD_FILE.read_text() if HOLD_FILE.is_file() else "")
    holds = [[int(word) for word in rule.split()] for rule in hook.replace(";", "\n").splitlines() if rule.strip()]

    def held(p: Any) -> bool:
        return any(p.step >= rule[0] if len(rule) == 1 else p.step == rule[0] and (p.world_size or 1) < rule[1]
                   for rule in holds)

    def progress(p: Any) -> None:
        if args.json:
            print(progress_line(p), flush=True)
        else:
            mark = f" checkpoint {p.checkpoint}" if p.checkpoint else ""
            print(f"step {p.step}/{args.steps} loss {p.loss:.4f} lr {p.lr:.2e}{mark}", flush=True)
        while held(p):
            signal.pause()

    request = TrainRequest(
        objective=args.objective,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        seed=args.seed,
        model_dir=args.model,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        resume=not args.no_resume,
        device=args.device,
        export_dir=args.export,
        distributed=args.distributed,
        collective_timeout_s=args.collective_timeout,
    )
    # Imported only once the request is valid: a bad request fails in a second, not after importing torch.
    from .train import train

    def summary(r: Any) -> str:
        reward = f", mean reward first/last step {r.rewards[0]:.3f}/{r.rewards[-1]:.3f}" if r.rewards else ""
        loss = f"loss {r.losses[0]:.4f} -> {r.losses[-1]:.4f}" if r.losses else "nothing to do"
        return (
            f"{r.objective}: steps {r.start_step + 1}..{r.final_step}, {loss}{reward}; "
            f"{r.steps_per_s:.1f} steps/s, {r.samples_per_s:.0f} samples/s; {len(r.checkpoints)} checkpoints"
            + (f"; exported to {r.exported}" if r.exported else "")
        )

    _emit(train(request, progress, checkpoint_requested), args.json, summary)


def _run_train_ddp(args: argparse.Namespace) -> None:
    from .distributed import LaunchOptions, launch

    # The launcher's own output is JSON lines already; the agent's trailing --json lands among the train arguments,
    # and launcher_argv gives the worker its own.
    train_args = [a for a in args.train_args if a != "--json"]
    if train_args[:1] == ["--"]:
        train_args = train_args[1:]
    launch(LaunchOptions(job=args.job, rendezvous=args.rendezvous, local_address=args.address,
                         min_nodes=args.min_nodes, max_nodes=args.max_nodes, max_restarts=args.max_restarts,
                         train_args=train_args, hosts_store=args.hosts_store, port=args.port,
                         go_file=args.go_file))


def _make_media_samples(args: argparse.Namespace) -> None:
    import numpy as np

    from . import synthetic
    from .media import encode_png, write_wav

    directory = Path(args.directory)
    directory.mkdir(parents=True, exist_ok=True)
    batch = synthetic.make_batch(args.count, args.seed)
    index = []
    for i in range(args.count):
        image = (batch.images[i].transpose(1, 2, 0) * 255).round().astype(np.uint8)
        (directory / f"sample{i}.png").write_bytes(encode_png(image))
        write_wav(directory / f"sample{i}.wav", batch.audio[i], synthetic.SAMPLE_RATE)
        index.append(
            {
                "image": f"sample{i}.png",
                "audio": f"sample{i}.wav",
                "text": batch.captions[i],
                "label": synthetic.CLASSES[int(batch.labels[i])],
            }
        )
    (directory / "samples.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
    print(f"wrote {args.count} samples to {directory} (see samples.json)")


# One handler per kind of guest.kinds.KINDS (tests/unit/test_workload_protocol.py checks that they match).
HANDLERS: dict[str, Callable[[argparse.Namespace], None]] = {
    "llm": _run_llm,
    "perception": _run_perception,
    "perception-train": _run_perception_train,
    "train": _run_train,
    "train-ddp": _run_train_ddp,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "make-tiny-llm":
            from .assets import make_tiny_llm

            print(f"wrote {make_tiny_llm(args.directory, seed=args.seed)}")
        elif args.command == "make-media-samples":
            _make_media_samples(args)
        else:
            HANDLERS[args.workload](args)
    except WorkloadError as error:
        print(f"error: {error.message}", file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps({"error": error.to_dict()}))
        return error.exit_code
    except ValidationError as error:
        print(f"error: bad request: {describe(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
