"""Serving engine candidates for resident model serving, measured on the host before any is wired in: the same
requests run one at a time through plain HF ``generate``, against transformers' own continuous batching
(``generate_batch``: paged KV cache, iteration-level scheduling, requests joining and leaving the batch at every
decode step), in one run.

Greedy decoding, so the two must agree token for token on every request; the benchmark fails if they do not. The
model is a random-weight Llama of the `small` shape of bench_llm.py (CPU); prompts have different lengths, so the
batch really is ragged.

Usage: benchmarks/bench_batching.py [--shape tiny|small] [-n REQUESTS] [--new-tokens T] [--threads K] [--out FILE].
The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import transformers  # noqa: E402
from bench_llm import model_config  # noqa: E402
from common import Report  # noqa: E402
from transformers import GenerationConfig  # noqa: E402
from transformers.generation.configuration_utils import ContinuousBatchingConfig  # noqa: E402

from guest.workloads.assets import build_random_llama  # noqa: E402


def prompts_for(n: int, vocab: int) -> list[list[int]]:
    """``n`` deterministic prompts of 8 to 63 tokens."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (8 + (i * 13) % 56,), generator=gen).tolist() for i in range(n)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["tiny", "small"], default="small")
    parser.add_argument("-n", type=int, default=32, help="concurrent requests")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_batching.txt")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = model_config(args.shape, context=256)
    model = build_random_llama(config, seed=0)
    prompts = prompts_for(args.n, config.vocab_size)
    greedy = GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    report = Report()
    say = report.say
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    say(f"# bench_batching {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()}: torch {torch.__version__}, "
        f"transformers {transformers.__version__}, CPU, {args.threads} thread(s); {args.shape} random Llama "
        f"({params_m:.1f} M params, fp32); {args.n} requests, prompts 8-63 tokens, {args.new_tokens} new tokens each")

    with torch.inference_mode():
        model.generate(torch.tensor([prompts[0]]), generation_config=greedy)  # warm-up, untimed
        started = time.perf_counter()
        sequential = [model.generate(torch.tensor([p]), generation_config=greedy)[0, len(p):].tolist()
                      for p in prompts]
        sequential_s = time.perf_counter() - started

        # The paged cache sized for the job (16-token pages, room for every request at once): left to its
        # defaults on CPU it sizes itself from memory it cannot read without psutil, and set-up alone took 39 s.
        pages = args.n * -(-(63 + args.new_tokens) // 16) + 16
        cb = ContinuousBatchingConfig(page_size=16, num_blocks=pages, max_batch_tokens=512, use_cuda_graph=False,
                                      use_async_batching=False)
        model.generate_batch(inputs=prompts[:2], generation_config=greedy, continuous_batching_config=cb,
                             progress_bar=False, warmup=False)  # warm-up, untimed
        started = time.perf_counter()
        results = model.generate_batch(inputs=prompts, generation_config=greedy, continuous_batching_config=cb,
                                       progress_bar=False, warmup=False)
        batched_s = time.perf_counter() - started
    batched = {tuple(r.prompt_ids): list(r.generated_tokens) for r in results.values()}
    mismatched = [i for i, (p, s) in enumerate(zip(prompts, sequential, strict=True)) if batched.get(tuple(p)) != s]
    tokens = args.n * args.new_tokens
    seq_tok_s, cb_tok_s = tokens / sequential_s, tokens / batched_s
    say(f"one at a time (HF generate): {sequential_s:.2f} s, {seq_tok_s:.0f} tok/s")
    say(f"continuous batching (HF generate_batch): {batched_s:.2f} s, {cb_tok_s:.0f} tok/s, "
        f"speedup {cb_tok_s / seq_tok_s:.2f}x")
    say(f"greedy outputs identical on {args.n - len(mismatched)} of {args.n} requests")
    say(f"cb_tok_s={cb_tok_s:.0f} sequential_tok_s={seq_tok_s:.0f} speedup={cb_tok_s / seq_tok_s:.2f} "
        f"equal={len(mismatched) == 0}")
    report.save(args.out)
    return 0 if not mismatched else 1


if __name__ == "__main__":
    sys.exit(main())
