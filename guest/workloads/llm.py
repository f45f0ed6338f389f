"""Causal-LM inference from a local model directory with HF ``generate`` (KV cache), greedy or nucleus sampling.

bf16 on GPU, fp32 on CPU. Batches are left-padded; tokens stream through ``on_token`` as each decode step finishes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging as hf_logging

from .errors import ModelDirError, PromptTooLong, UnsupportedModel
from .runtime import PeakMemoryMeter, dtype_name, inference_dtype, oom_guard, require_memory, resolve_device
from .schema import Completion, LLMRequest, LLMResult, TokenEvent

TokenCallback = Callable[[TokenEvent], None]
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")

# Workloads run under the agent: tqdm bars on stderr would only garble its log.
hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


@dataclass
class LoadedModel:
    """A model and tokenizer ready to generate; load once with ``load_model`` and reuse across requests."""

    model: PreTrainedModel
    tokenizer: Any  # a transformers fast tokenizer (its classes are not typed for mypy)
    device: torch.device
    dtype: torch.dtype
    context_window: int
    model_dir: Path
    # The fast path's decoders for this model, by (compile mode, weights): built on first use (decode.decoder_for).
    decoders: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)


def _check_model_dir(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise ModelDirError(f"model directory {directory} does not exist")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelDirError(f"model directory {directory} has no config.json")
    try:
        config: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelDirError(f"{config_path} is not valid JSON: {error}") from error
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelDirError(f"{config_path} has no model_type")
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        raise ModelDirError(f"model directory {directory} has no weights (expected one of {', '.join(WEIGHT_FILES)})")
    if not (directory / "tokenizer.json").is_file():
        raise ModelDirError(f"model directory {directory} has no tokenizer.json")
    return config


def load_model(model_dir: str | Path, device: torch.device) -> LoadedModel:
    """Load from disk only (``local_files_only``); anything missing or unreadable becomes ModelDirError."""
    directory = Path(model_dir)
    _check_model_dir(directory)
    dtype = inference_dtype(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        # Any: with output_loading_info the call returns (model, info), which its annotations do not say.
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            directory, local_files_only=True, dtype=dtype, output_loading_info=True
        )
        model, info = loaded
    except Exception as error:  # transformers/safetensors raise OSError, ValueError, SafetensorError, ...
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ModelDirError(f"cannot load model from {directory}: {type(error).__name__}: {first_line}") from error
    # A weights file missing tensors loads with freshly initialised ones and only a warning: refuse instead.
    missing = list(info.get("missing_keys", [])) + list(info.get("mismatched_keys", []))
    if missing:
        raise ModelDirError(f"weights in {directory} are incomplete: {len(missing)} tensors missing, e.g. {missing[0]}")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = model.to(device).eval()
    context = int(getattr(model.config, "max_position_embeddings", 0) or tokenizer.model_max_length)
    return LoadedModel(model, tokenizer, device, dtype, context, directory)


def encode_prompts(loaded: LoadedModel, prompts: Sequence[str], max_new_tokens: int) -> list[list[int]]:
    """BOS + prompt tokens per prompt; PromptTooLong when a prompt plus the new tokens exceeds the context."""
    tokenizer = loaded.tokenizer
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    encoded: list[list[int]] = []
    for index, prompt in enumerate(prompts):
        ids = bos + list(tokenizer.encode(prompt, add_special_tokens=False))
        if len(ids) + max_new_tokens > loaded.context_window:
            raise PromptTooLong(len(ids), max_new_tokens, loaded.context_window, index)
        encoded.append(ids)
    return encoded


def left_pad(sequences: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[row, width - len(ids) :] = 1
    return input_ids.to(device), mask.to(device)


def kv_cache_bytes(config: Any, batch: int, positions: int, dtype: torch.dtype) -> int:
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    element = torch.tensor([], dtype=dtype).element_size()
    return 2 * int(config.num_hidden_layers) * batch * positions * kv_heads * head_dim * element


class TokenStream:
    """Collects generated tokens per sequence, times them, and forwards each one to the callback.

    After a sequence's EOS the generator keeps emitting pad tokens for it; those are neither recorded nor streamed.
    """

    def __init__(self, loaded: LoadedModel, batch: int, stop_at_eos: bool, on_token: TokenCallback | None) -> None:
        self.tokenizer = loaded.tokenizer
        self.eos_id = loaded.tokenizer.eos_token_id if stop_at_eos else None
        self.on_token = on_token
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.finished = [False] * batch
        self.streamed_text = [""] * batch
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None

    def _piece(self, sequence: int) -> str:
        # Decode the whole sequence and emit what is new: single byte-level tokens can be half a UTF-8 character.
        text = str(self.tokenizer.decode(self.tokens[sequence], skip_special_tokens=True))
        previous = self.streamed_text[sequence]
        if text.endswith("\ufffd") or not text.startswith(previous):
            return ""  # incomplete character: it is emitted with the token that completes it
        self.streamed_text[sequence] = text
        return text[len(previous) :]

    def step(self, token_ids: Sequence[int]) -> None:
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        for sequence, token_id in enumerate(token_ids):
            if self.finished[sequence]:
                continue
            if self.eos_id is not None and token_id == self.eos_id:
                self.finished[sequence] = True
                continue
            self.tokens[sequence].append(int(token_id))
            if self.on_token is not None:
                index = len(self.tokens[sequence]) - 1
                self.on_token(
                    TokenEvent(sequence=sequence, index=index, token_id=int(token_id), text=self._piece(sequence))
                )


class _HFStreamer(BaseStreamer):
    """Adapter for ``generate(streamer=...)``: the first ``put`` is the prompt, every later one a (batch,) step."""

    def __init__(self, stream: TokenStream) -> None:
        self.stream = stream
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.stream.step(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


def generation_config(loaded: LoadedModel, request: LLMRequest, **overrides: Any) -> GenerationConfig:
    tokenizer = loaded.tokenizer
    options: dict[str, Any] = {
        "max_new_tokens": request.max_new_tokens,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id if request.stop_at_eos else None,
        "use_cache": True,
    }
    if request.sampling is None:
        options.update(do_sample=False)
    else:
        # top_k=0 disables HF's default top-k so only temperature and top-p shape the distribution.
        options.update(do_sample=True, temperature=request.sampling.temperature, top_p=request.sampling.top_p, top_k=0)
    options.update(overrides)
    return GenerationConfig(**options)  # type: ignore[no-untyped-call]


def run_generate(
    loaded: LoadedModel,
    request: LLMRequest,
    on_token: TokenCallback | None,
    backend: str,
    **generate_overrides: Any,
) -> LLMResult:
    """Shared by the eager and the static-cache/compiled paths: they differ only in generate() options."""
    started = time.perf_counter()
    encoded = encode_prompts(loaded, request.prompts, request.max_new_tokens)
    batch = len(encoded)
    longest = max(len(ids) for ids in encoded)
    require_memory(
        kv_cache_bytes(loaded.model.config, batch, longest + request.max_new_tokens, loaded.dtype)
        + batch * int(loaded.model.config.vocab_size) * 4 * 2,
        f"generating {request.max_new_tokens} tokens for {batch} prompts",
        loaded.device,
    )
    input_ids, attention_mask = left_pad(encoded, loaded.tokenizer.pad_token_id, loaded.device)
    stream = TokenStream(loaded, batch, request.stop_at_eos, on_token)
    config = generation_config(loaded, request, **generate_overrides)
    meter = PeakMemoryMeter(loaded.device)
    devices = [loaded.device.index or 0] if loaded.device.type == "cuda" else []
    with oom_guard(f"LLM generation ({backend})"), torch.inference_mode(), torch.random.fork_rng(devices=devices):
        # fork_rng: a seeded request must neither depend on nor disturb the process's global RNG stream.
        torch.manual_seed(request.sampling.seed if request.sampling is not None else 0)
        model: Any = loaded.model  # generate() comes from GenerationMixin, which the annotations lose
        model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config, streamer=_HFStreamer(stream)
        )
    finished = time.perf_counter()
    return build_result(loaded, request, encoded, stream, started, finished, backend, meter, provider=None)


def build_result(
    loaded: LoadedModel,
    request: LLMRequest,
    encoded: list[list[int]],
    stream: TokenStream,
    started: float,
    finished: float,
    backend: str,
    meter: PeakMemoryMeter,
    provider: str | None,
) -> LLMResult:
    completions = tuple(
        Completion(
            text=loaded.tokenizer.decode(tokens, skip_special_tokens=True),
            token_ids=tuple(tokens),
            prompt_tokens=len(ids),
            finish_reason="eos" if done else "length",
        )
        for ids, tokens, done in zip(encoded, stream.tokens, stream.finished, strict=True)
    )
    first = stream.first_token_at if stream.first_token_at is not None else finished
    last = stream.last_token_at if stream.last_token_at is not None else finished
    prompt_tokens = sum(len(ids) for ids in encoded)
    generated = sum(len(tokens) for tokens in stream.tokens)
    after_first = generated - sum(1 for tokens in stream.tokens if tokens)
    ttft = first - started
    peak = meter.read()
    return LLMResult(
        backend=backend,
        provider=provider,
        device=str(loaded.device),
        dtype=dtype_name(loaded.dtype),
        completions=completions,
        prompt_tokens=prompt_tokens,
        generated_tokens=generated,
        ttft_s=ttft,
        prompt_tokens_per_s=prompt_tokens / ttft if ttft > 0 else 0.0,
        decode_tokens_per_s=after_first / (last - first) if last > first else 0.0,
        total_s=finished - started,
        peak_memory_bytes=peak.bytes,
        peak_memory_source=peak.source,
    )


def generate(request: LLMRequest, on_token: TokenCallback | None = None, model: LoadedModel | None = None) -> LLMResult:
    """Generate for every prompt of the request in one left-padded batch.

    ``model`` reuses an already loaded model (it must be the request's model_dir); otherwise it is loaded here.
    """
    refuse_quantized(request, "eager")
    loaded = model or load_model(request.model_dir, resolve_device(request.device))
    return run_generate(loaded, request, on_token, backend="torch")


def refuse_quantized(request: LLMRequest, backend: str) -> None:
    if request.weights != "native":
        raise UnsupportedModel(
            f"the {backend} backend runs native weights only; {request.weights} weights run on --backend fast"
        )
