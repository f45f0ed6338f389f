"""LLM decode speed: HF eager generate vs the best torch path, and torch vs ONNX Runtime, on one random-weight model.

Paths measured (same prompts, same token count, EOS ignored so every run generates exactly --new-tokens per row):
- eager:          HF generate with the dynamic KV cache (guest.workloads.llm's path);
- static:         HF generate with cache_implementation="static";
- static+compile: static cache and model.forward = torch.compile(mode=...) — "reduce-overhead" (CUDA graphs) on GPU,
                  which is llm_fast.generate_fast; inductor "default" on CPU, where CUDA graphs do not exist;
- onnxruntime:    the exported KV-cache graph on ORT (guest.workloads.llm_onnx), provider as reported by ORT.
tok/s is end to end: generated tokens / wall time of the whole generate call (prefill included), median of
--repeats runs after one warm-up run per path (the warm-up absorbs compilation; its time is "first call"). The
measured runs go round-robin over the paths so that load from other work on a shared machine hits all of them.
best_tok_s is the fastest torch path. On GPU the Llama-1B shape is the default and bw_util is the best path's
per-sequence decode rate × weight bytes ÷ measured device-to-device copy bandwidth.

Usage: benchmarks/bench_llm.py [--shape tiny|small|1b] [--batch B] [--prompt-len P] [--new-tokens N] [--threads T]
       [--repeats R] [--no-compile] [--no-ort] [--out FILE]. The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import onnxruntime as ort
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from guest.workloads.assets import build_random_llama, read_corpus, save_llm, tiny_llama_config, train_tokenizer  # noqa: E402
from guest.workloads.llm import load_model, run_generate  # noqa: E402
from guest.workloads.llm_fast import (  # noqa: E402
    bandwidth_utilisation,
    generate_static,
    llama_1b_config,
    measure_copy_bandwidth,
    weight_bytes,
    with_random_weights,
)
from guest.workloads.llm_onnx import decode_on_session, ensure_onnx, open_session  # noqa: E402
from guest.workloads.schema import LLMRequest, LLMResult  # noqa: E402

SHAPES = {  # hidden, layers, heads, kv heads, intermediate, vocab
    "tiny": (64, 2, 4, 4, 128, 512),
    "small": (256, 4, 8, 4, 704, 8192),
}


_PREFIX = "bench-llm-"  # temporary model/checkpoint directories, removed on exit


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
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    # One thread by default: on the shared 2-core machines a second torch thread contends with whatever else runs
    # (a TCG guest, say) and spin-waits, which made ssl steps 10x slower in a measured run.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-ort", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    shape = args.shape or ("1b" if gpu else "small")
    # ORT runs the fp32 export; a 1B fp32 graph (5 GB) exceeds protobuf's 2 GB inline limit, so skip it there.
    use_ort = not args.no_ort and shape != "1b"
    torch.set_num_threads(args.threads)
    config = model_config(shape, context=max(256, args.prompt_len + args.new_tokens + 8))
    tokenizer = train_tokenizer(read_corpus())
    workdir = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-"))
    if use_ort:  # ORT exports from a model directory, so build one; torch loads the same weights from it
        model_dir = save_llm(workdir / "model", build_random_llama(config, seed=0), tokenizer)
        loaded = load_model(model_dir, device)
    else:
        model_dir = None
        loaded = with_random_weights(tokenizer, config, device)
    corpus_ids = tokenizer.encode(read_corpus(), add_special_tokens=False)
    prompt = tokenizer.decode(corpus_ids[: args.prompt_len - 1])  # BOS makes it prompt_len tokens
    request = LLMRequest(
        model_dir=str(model_dir or workdir),
        prompts=(prompt,) * args.batch,
        max_new_tokens=args.new_tokens,
        stop_at_eos=False,
    )

    lines: list[str] = []

    def report(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    cores = os.cpu_count()
    report(
        f"# bench_llm {datetime.now():%Y-%m-%d %H:%M} on {platform.node()}: {platform.machine()}, {cores} cores "
        f"(load {os.getloadavg()[0]:.2f}), torch {torch.__version__} ({args.threads} threads), "
        f"transformers {transformers.__version__}, onnxruntime {ort.__version__}"
    )
    if gpu:
        report(f"# device: {torch.cuda.get_device_name(device)}")
    params_m = sum(p.numel() for p in loaded.model.parameters()) / 1e6
    dtype = str(loaded.dtype).removeprefix("torch.")
    report(
        f"# model: {shape} random weights ({params_m:.1f} M params, "
        f"{weight_bytes(loaded.model) / 2**20:.0f} MiB as {dtype}); batch {args.batch}, "
        f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, median of {args.repeats}"
    )
    paths: dict[str, Callable[[], LLMResult]] = {
        "eager": lambda: run_generate(loaded, request, None, "torch"),
        "static": lambda: generate_static(loaded, request, compile_mode=None),
    }
    if not args.no_compile:
        # Its own copy: compiling replaces model.forward, and the eager paths keep running in between.
        compiled = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model))
        mode = "reduce-overhead" if gpu else "default"
        paths["static+compile"] = lambda: generate_static(compiled, request, compile_mode=mode)
    ort_name = None
    if use_ort and model_dir is not None:
        session = open_session(ensure_onnx(model_dir, workdir / "onnx" / "model.onnx"), threads=args.threads)
        provider = session.get_providers()[0]
        ort_loaded = load_model(model_dir, torch.device("cpu"))
        ort_name = f"onnxruntime/{provider.removesuffix('ExecutionProvider')}"
        paths[ort_name] = lambda: decode_on_session(ort_loaded, session, request, None, provider)
    first_call: dict[str, float] = {}
    for name, run in paths.items():  # warm-up: compilation, first allocations
        started = time.perf_counter()
        run()
        first_call[name] = time.perf_counter() - started
    samples: dict[str, list[LLMResult]] = {name: [] for name in paths}
    for _ in range(args.repeats):  # round-robin, so load changes on the shared machine hit every path alike
        for name, run in paths.items():
            samples[name].append(run())
    rates: dict[str, float] = {}
    results: dict[str, LLMResult] = {}
    for name, runs in samples.items():
        per_run = [r.generated_tokens / r.total_s for r in runs]
        rates[name] = statistics.median(per_run)
        result = results[name] = runs[min(range(len(runs)), key=lambda i: abs(per_run[i] - rates[name]))]
        report(
            f"{name:16s} {rates[name]:9.1f} tok/s  ttft {result.ttft_s * 1e3:7.1f} ms  "
            f"decode {result.decode_tokens_per_s:9.1f} tok/s  first call {first_call[name]:6.1f} s"
        )
    if args.no_compile:
        report("static+compile   skipped (--no-compile)")
    if not gpu:
        report("fast path        skipped: CUDA graphs (llm_fast.generate_fast) need a GPU; bw_util not measured")
    if ort_name is None:
        report("onnxruntime      skipped" + (" (--no-ort)" if args.no_ort else " (1B fp32 export exceeds 2 GB)"))
    ort_rate = rates[ort_name] if ort_name is not None else None
    torch_paths = {k: v for k, v in rates.items() if not k.startswith("onnxruntime")}
    best = max(torch_paths, key=lambda k: torch_paths[k])
    ort_text = f"{ort_rate:.1f}" if ort_rate is not None else "nan"
    summary = (
        f"eager_tok_s={rates['eager']:.1f} best_tok_s={rates[best]:.1f} ort_tok_s={ort_text} "
        f"device={'cuda' if gpu else 'cpu'}"
    )
    if gpu:
        bandwidth = measure_copy_bandwidth(device)
        per_sequence = results[best].decode_tokens_per_s / args.batch  # weights are read once per step, not per row
        utilisation = bandwidth_utilisation(per_sequence, weight_bytes(loaded.model), bandwidth)
        report(
            f"# copy bandwidth {bandwidth / 1e9:.0f} GB/s; {best} decodes {per_sequence:.0f} steps/s "
            f"x {weight_bytes(loaded.model) / 1e9:.2f} GB weights"
        )
        summary += f" bw_util={utilisation:.3f}"
    report(f"{summary} best_path={best}")
    out = args.out or Path(__file__).resolve().parent / "results" / f"bench_llm_{'gpu' if gpu else 'cpu'}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
