"""LLM decode speed: HF eager generate against our own decode loop (guest.workloads.decode), bf16 and int8, and a
batch sweep, on one random-weight model; ONNX Runtime where it can run.

Paths at --batch (same prompts, same token count, EOS ignored so every run generates exactly --new-tokens per row):
- eager:          HF generate with the dynamic KV cache (guest.workloads.llm, `--backend eager`);
- hf-static:      HF generate with its static cache, HF compiling the forward itself (GPU only: on CPU it is eager);
- fast:           our loop, uncompiled;
- fast+compile:   our loop with the step compiled: "reduce-overhead" (inductor + CUDA graphs) on GPU, which is
                  `--backend fast`; inductor "default" on CPU;
- fast-int8+compile: the same with torchao weight-only int8 weights;
- onnxruntime:    the exported KV-cache graph on ORT (guest.workloads.llm_onnx), provider as reported by ORT.
decode tok/s counts the tokens after the first over the time after the first (prefill excluded); the median of
--repeats runs after one warm-up run per path (the warm-up absorbs compilation; its time is "first call"). Runs go
round-robin over the paths so that load from other work on a shared machine hits all of them.

Then the sweep: eager against fast+compile at each of --sweep's batch sizes, as steps/s and tokens/s. Then int8's
quality: teacher-forced next-token agreement with the native weights on a fixed text (the guest corpus), and the
relative logit error. On random weights agreement is a harsh measure: logits are nearly flat, so near-ties flip.

On GPU (the Llama-1B shape by default) bw_util = per-sequence decode steps/s × bytes one step reads ÷ measured
device-to-device copy bandwidth, for the best batch-1 path at native precision; int8_bw_util likewise with the int8
bytes. Every line is written to the output file as it is printed, so a run cut short keeps what it measured.

Usage: benchmarks/bench_llm.py [--shape tiny|small|1b] [--batch B] [--sweep 1,8,32,64] [--prompt-len P]
       [--new-tokens N] [--threads T] [--repeats R] [--no-compile] [--no-ort] [--no-hf-static] [--out FILE].
The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from guest.workloads.assets import build_random_llama, read_corpus, save_llm, tiny_llama_config, train_tokenizer  # noqa: E402
from guest.workloads.decode import Decoder, step_bytes  # noqa: E402
from guest.workloads.llm import load_model, run_generate  # noqa: E402
from guest.workloads.llm_fast import (  # noqa: E402
    bandwidth_utilisation,
    generate_hf_static,
    llama_1b_config,
    measure_copy_bandwidth,
    with_random_weights,
)
from guest.workloads.schema import LLMRequest, LLMResult  # noqa: E402

SHAPES = {  # hidden, layers, heads, kv heads, intermediate, vocab
    "tiny": (64, 2, 4, 4, 128, 512),
    "small": (256, 4, 8, 4, 704, 8192),
}
_PREFIX = "bench-llm-"  # temporary model/checkpoint directories, removed on exit


class Report:
    """Prints each line and appends it to the output file at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("", encoding="utf-8")

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        with self.path.open("a", encoding="utf-8") as out:
            out.write(line + "\n")


def model_config(shape: str, context: int) -> transformers.LlamaConfig:
    if shape == "1b":
        return llama_1b_config(max_position_embeddings=context)
    hidden, layers, heads, kv_heads, intermediate, vocab = SHAPES[shape]
    return tiny_llama_config(vocab, hidden, layers, heads, kv_heads, intermediate, context)


def main() -> int:
    try:
        return _run()
    finally:
        for leftover in Path(tempfile.gettempdir()).glob(f"{_PREFIX}{os.getpid()}-*"):
            shutil.rmtree(leftover, ignore_errors=True)


def _run() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["tiny", "small", "1b"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--sweep", help="batch sizes for the sweep (default 1,8,32,64 on GPU, 1,8 on CPU)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    # One thread by default: on the shared 2-core machines a second torch thread contends with whatever else runs
    # (a TCG guest, say) and spin-waits, which made ssl steps 10x slower in a measured run.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-ort", action="store_true")
    parser.add_argument("--no-hf-static", action="store_true")
    parser.add_argument("--paths", help="comma-separated subset of the paths to run (eager always runs)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    shape = args.shape or ("1b" if gpu else "small")
    sweep_text = args.sweep if args.sweep is not None else ("1,8,32,64" if gpu else "1,8")
    sweep = [int(b) for b in sweep_text.split(",") if b]
    torch.set_num_threads(args.threads)
    out = args.out or Path(__file__).resolve().parent / "results" / f"bench_llm_{'gpu' if gpu else 'cpu'}.txt"
    report = Report(out)
    config = model_config(shape, context=max(256, args.prompt_len + args.new_tokens + 8))
    tokenizer = train_tokenizer(read_corpus())
    workdir = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-"))
    # ORT exports from a model directory in fp32; a 1B fp32 graph (5 GB) exceeds protobuf's 2 GB inline limit.
    use_ort = not args.no_ort and shape != "1b"
    if use_ort:
        model_dir = save_llm(workdir / "model", build_random_llama(config, seed=0), tokenizer)
        loaded = load_model(model_dir, device)
    else:
        model_dir = None
        loaded = with_random_weights(tokenizer, config, device)

    try:
        import onnxruntime as ort

        ort_version = ort.__version__
    except ImportError:
        ort, ort_version, use_ort = None, "absent", False
    report(
        f"# bench_llm {datetime.now():%Y-%m-%d %H:%M} on {platform.node()}: {platform.machine()}, {os.cpu_count()} "
        f"cores (load {os.getloadavg()[0]:.2f}), torch {torch.__version__} ({args.threads} threads), "
        f"transformers {transformers.__version__}, onnxruntime {ort_version}"
    )
    if gpu:
        report(f"# device: {torch.cuda.get_device_name(device)}")
    params_m = sum(p.numel() for p in loaded.model.parameters()) / 1e6
    dtype = str(loaded.dtype).removeprefix("torch.")
    corpus_ids = tokenizer.encode(read_corpus(), add_special_tokens=False)
    prompt = tokenizer.decode(corpus_ids[: args.prompt_len - 1])  # BOS makes it prompt_len tokens

    def request_for(batch: int) -> LLMRequest:
        return LLMRequest(
            model_dir=str(model_dir or workdir),
            prompts=(prompt,) * batch,
            max_new_tokens=args.new_tokens,
            stop_at_eos=False,
        )

    request = request_for(args.batch)
    decoders: dict[str, Decoder] = {"fast": Decoder.build(loaded, compile_mode=None)}
    native_bytes = step_bytes(decoders["fast"].model)
    report(
        f"# model: {shape} random weights ({params_m:.1f} M params, {dtype}; one decode step reads "
        f"{native_bytes / 1e6:.0f} MB); batch {args.batch}, prompt {args.prompt_len} tokens, {args.new_tokens} new "
        f"tokens, median of {args.repeats}"
    )

    # --paths: build only what runs (an int8 decoder quantizes a copy of every weight).
    wanted = {"eager", *args.paths.split(",")} if args.paths else None
    paths: dict[str, Callable[[LLMRequest], LLMResult]] = {
        "eager": lambda r: run_generate(loaded, r, None, "torch"),
        "fast": lambda r: decoders["fast"].generate(r),
    }
    if gpu and not args.no_hf_static:
        paths["hf-static"] = lambda r: generate_hf_static(loaded, r)
    mode = "reduce-overhead" if gpu else "default"
    for name, weights in (("fast+compile", "native"), ("fast-int8+compile", "int8")):
        if args.no_compile or (wanted is not None and name not in wanted):
            continue
        try:
            decoders[name] = Decoder.build(loaded, compile_mode=mode, weights=weights)
        except Exception as error:  # noqa: BLE001  # a missing torchao must not cost the other paths
            report(f"{name} skipped: {type(error).__name__}: {error}")
            continue
        paths[name] = lambda r, name=name: decoders[name].generate(r)  # type: ignore[misc]
    if wanted is not None:
        paths = {k: v for k, v in paths.items() if k in wanted}
    ort_name = None
    if use_ort and model_dir is not None and ort is not None:
        from guest.workloads.llm_onnx import decode_on_session, ensure_onnx, open_session

        session = open_session(ensure_onnx(model_dir, workdir / "onnx" / "model.onnx"), threads=args.threads)
        provider = session.get_providers()[0]
        ort_loaded = load_model(model_dir, torch.device("cpu"))
        ort_name = f"onnxruntime/{provider.removesuffix('ExecutionProvider')}"
        paths[ort_name] = lambda r: decode_on_session(ort_loaded, session, r, None, provider)

    results, first_call = measure(paths, request, args.repeats, report)
    for name, result in results.items():
        report(
            f"{name:20s} decode {result.decode_tokens_per_s:9.1f} tok/s  ttft {result.ttft_s * 1e3:7.1f} ms  "
            f"end to end {result.generated_tokens / result.total_s:9.1f} tok/s  first call {first_call[name]:6.1f} s"
        )
    if args.no_compile:
        report("fast+compile         skipped (--no-compile)")
    if ort_name is None:
        why = "--no-ort" if args.no_ort else "no onnxruntime" if ort is None else "1B fp32 export exceeds 2 GB"
        report(f"onnxruntime          skipped ({why})")

    torch_paths = {k: v for k, v in results.items() if not k.startswith(("onnxruntime", "fast-int8"))}
    best = max(torch_paths, key=lambda k: torch_paths[k].decode_tokens_per_s)
    bandwidth = measure_copy_bandwidth(device) if gpu else 0.0
    utilisation = 0.0
    if gpu:
        per_sequence = results[best].decode_tokens_per_s / args.batch  # weights are read once per step, not per row
        utilisation = bandwidth_utilisation(per_sequence, native_bytes, bandwidth)
        report(
            f"# copy bandwidth {bandwidth / 1e9:.0f} GB/s; {best} decodes {per_sequence:.0f} steps/s x "
            f"{native_bytes / 1e9:.2f} GB per step = {utilisation:.3f} of it (roofline "
            f"{bandwidth / native_bytes:.0f} steps/s)"
        )

    sweep_rates: dict[str, dict[int, float]] = {}
    if not args.no_compile and sweep:
        report(f"# batch sweep, {args.new_tokens} new tokens: decode steps/s (tokens/s)")
        for batch in sweep:
            sweep_paths = {k: paths[k] for k in ("eager", "fast+compile") if k in paths}
            swept, _ = measure(sweep_paths, request_for(batch), args.repeats, report)
            cells = []
            for name, result in swept.items():
                sweep_rates.setdefault(name, {})[batch] = result.decode_tokens_per_s
                steps = result.decode_tokens_per_s / batch
                cells.append(f"{name} {steps:8.1f} ({result.decode_tokens_per_s:9.1f})")
            ratio = ""
            if len(swept) == 2:
                speedup = swept["fast+compile"].decode_tokens_per_s / swept["eager"].decode_tokens_per_s
                ratio = f"  fast/eager {speedup:5.2f}x"
            report(f"batch {batch:3d}: " + "  ".join(cells) + ratio)

    quality = ""
    if "fast-int8+compile" in decoders:
        agreement, error = int8_quality(decoders["fast"], decoders["fast-int8+compile"], corpus_ids, device)
        int8_bytes = step_bytes(decoders["fast-int8+compile"].model)
        report(
            f"# int8: one step reads {int8_bytes / 1e6:.0f} MB ({int8_bytes / native_bytes:.2f} of {dtype}); "
            f"teacher-forced next-token agreement with {dtype} {agreement:.3f}, relative logit error {error:.4f}"
        )
        quality = f" int8_agree={agreement:.3f}"

    ort_text = f"{results[ort_name].decode_tokens_per_s:.1f}" if ort_name else "nan"
    summary = (
        f"eager_tok_s={results['eager'].decode_tokens_per_s:.1f} best_tok_s={results[best].decode_tokens_per_s:.1f} "
        f"ort_tok_s={ort_text} device={'cuda' if gpu else 'cpu'} batch={args.batch}"
    )
    if "fast-int8+compile" in results:
        summary += f" int8_tok_s={results['fast-int8+compile'].decode_tokens_per_s:.1f}"
    for name, rates in sweep_rates.items():
        summary += f" {name.replace('+', '_')}_sweep=" + ",".join(f"{b}:{rate:.0f}" for b, rate in rates.items())
    if gpu:
        summary += f" bw_util={utilisation:.3f}"
        if "fast-int8+compile" in results:
            int8_steps = results["fast-int8+compile"].decode_tokens_per_s / args.batch
            int8_bytes = step_bytes(decoders["fast-int8+compile"].model)
            summary += f" int8_bw_util={bandwidth_utilisation(int8_steps, int8_bytes, bandwidth):.3f}"
    report(f"{summary}{quality} best_path={best}")
    return 0


def measure(
    paths: dict[str, Callable[[LLMRequest], LLMResult]],
    request: LLMRequest,
    repeats: int,
    report: Callable[[str], None],
) -> tuple[dict[str, LLMResult], dict[str, float]]:
    """Warm each path up once, then ``repeats`` rounds round-robin; the run with the median decode rate per path.
    A path that raises is reported and dropped, so one broken path does not cost the others' numbers."""
    first_call: dict[str, float] = {}
    live = dict(paths)
    for name, run in list(live.items()):
        started = time.perf_counter()
        try:
            run(request)
        except Exception as error:  # noqa: BLE001
            report(f"{name:20s} FAILED at batch {len(request.prompts)}: {type(error).__name__}: {error}")
            traceback.print_exc()
            del live[name]
            continue
        first_call[name] = time.perf_counter() - started
        report(f"# warm-up {name} at batch {len(request.prompts)}: {first_call[name]:.1f} s")
    samples: dict[str, list[LLMResult]] = {name: [] for name in live}
    for _ in range(repeats):
        for name, run in live.items():
            samples[name].append(run(request))
    chosen = {}
    for name, runs in samples.items():
        rate = statistics.median(r.decode_tokens_per_s for r in runs)
        chosen[name] = min(runs, key=lambda r: abs(r.decode_tokens_per_s - rate))
    return chosen, first_call


def int8_quality(
    native: Decoder, int8: Decoder, corpus_ids: list[int], device: torch.device, length: int = 128
) -> tuple[float, float]:
    """Teacher-forced: both models read the same ``length`` corpus tokens; how often their next-token argmax agrees,
    and ||logits_int8 - logits_native|| / ||logits_native|| over every position."""
    ids = torch.tensor([corpus_ids[:length]], device=device)
    slots = torch.arange(ids.shape[1], device=device)
    logits: dict[str, torch.Tensor] = {}
    for name, decoder in (("native", native), ("int8", int8)):
        decoder.model.setup_cache(1, max(256, length))
        decoder.model.valid.fill_(True)
        with torch.no_grad():
            logits[name] = decoder.model(ids, slots[None], slots, every_position=True)[0]
    agreement = (logits["native"].argmax(-1) == logits["int8"].argmax(-1)).float().mean().item()
    error = ((logits["int8"] - logits["native"]).norm() / logits["native"].norm()).item()
    return agreement, error


if __name__ == "__main__":
    raise SystemExit(main())
