"""The fast LLM path's entry point (the decode loop itself is ``decode.py``), the HF static-cache comparison, the
Llama-1B shape with random weights for speed runs, and the decode bandwidth-utilisation estimate.

Decoding one token reads every weight once, so at small batch the ceiling is HBM bandwidth / weight bytes tokens/s;
``bandwidth_utilisation`` says how close a measured rate comes to it. This module imports on CPU hosts (so the agent
and the benchmarks can load it anywhere).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from .decode import decoder_for
from .llm import LoadedModel, TokenCallback, load_model, run_generate
from .runtime import inference_dtype, resolve_device, synchronize
from .schema import LLMRequest, LLMResult


def llama_1b_config(max_position_embeddings: int = 4096) -> LlamaConfig:
    """The Llama-3.2-1B shape (random weights only: nothing is downloaded)."""
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def random_model(config: LlamaConfig, device: torch.device, seed: int = 0) -> PreTrainedModel:
    """Random weights built directly on ``device`` in its inference dtype (a 1B model inits in seconds on GPU)."""
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    untyped: Any = model  # transformers' decorated .to() confuses mypy
    untyped.to(dtype=inference_dtype(device))
    model.eval()  # type: ignore[no-untyped-call]
    return model


def with_random_weights(tokenizer: Any, config: LlamaConfig, device: torch.device, seed: int = 0) -> LoadedModel:
    """A LoadedModel for speed runs: random weights of ``config`` with any tokenizer (e.g. the tiny one; ids beyond
    its vocabulary decode to nothing, which is fine for timing). Nothing is written to disk."""
    model = random_model(config, device, seed)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=inference_dtype(device),
        context_window=int(config.max_position_embeddings),
        model_dir=Path("<random>"),
    )


def generate_hf_static(loaded: LoadedModel, request: LLMRequest, on_token: TokenCallback | None = None) -> LLMResult:
    """HF ``generate`` with its static cache, letting HF compile the forward itself: the comparison for the fast
    loop (HF's own compile keeps its outputs valid across CUDA-graph replays, which compiling ``model.forward`` from
    outside did not: "accessing tensor output of CUDAGraphs that has been overwritten")."""
    return run_generate(loaded, request, on_token, "hf-static", cache_implementation="static")


def generate_fast(
    request: LLMRequest, on_token: TokenCallback | None = None, model: LoadedModel | None = None
) -> LLMResult:
    """The fast path: our own decode loop (``decode.Decoder``), compiled with CUDA graphs on a GPU and eager on CPU.

    The first call on a GPU compiles and captures graphs (tens of seconds); later calls with the same batch size and
    cache bucket reuse them. ``request.weights == "int8"`` runs torchao's weight-only int8.
    """
    loaded = model or load_model(request.model_dir, resolve_device(request.device))
    return decoder_for(loaded, weights=request.weights).generate(request, on_token)


def measure_copy_bandwidth(device: torch.device, size_bytes: int = 1 << 30, iterations: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting read + write (2 × size per copy), like STREAM copy."""
    elements = size_bytes // 4
    source = torch.empty(elements, dtype=torch.float32, device=device).fill_(1.0)
    target = torch.empty_like(source)
    for _ in range(3):  # warm up: first touches page in memory / launch the kernel once
        target.copy_(source)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(iterations):
        target.copy_(source)
    synchronize(device)
    elapsed = time.perf_counter() - started
    del source, target
    return 2.0 * elements * 4 * iterations / elapsed


def bandwidth_utilisation(tokens_per_s: float, model_weight_bytes: int, bandwidth_bytes_per_s: float) -> float:
    """Fraction of the copy bandwidth that decode uses if each token step reads every weight once (batch 1).

    For batch B, pass the per-sequence step rate (tokens/s ÷ B): weights are read once per step, not per row.
    """
    return tokens_per_s * model_weight_bytes / bandwidth_bytes_per_s

