"""ONNX export of a causal LM's forward (with KV cache) and a decode loop on ONNX Runtime.

The graph takes ``input_ids``, ``attention_mask`` and ``past.{layer}.{key,value}`` and returns ``logits`` and
``present.{layer}.{key,value}``; a zero-length past is the prefill. Export always runs in fp32 on CPU (the graph is
device-independent); ONNX Runtime then tries CUDAExecutionProvider and falls back to CPUExecutionProvider, and the
result names the provider that actually ran.

Exporter choice: torch's TorchScript exporter (``dynamo=False``). The dynamo exporter needs the extra ``onnxscript``
package and took ~13 s instead of ~0.5 s for the tiny model here; the traced graph is checked for parity at several
batch/sequence shapes by the tests.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from transformers import DynamicCache

from .errors import WorkloadError
from .llm import (
    LoadedModel,
    TokenCallback,
    TokenStream,
    build_result,
    encode_prompts,
    left_pad,
    load_model,
    refuse_quantized,
)
from .runtime import PeakMemoryMeter, oom_guard
from .schema import LLMRequest, LLMResult

OPSET = 18
# Stated parity bound for fp32 torch vs fp32 ONNX Runtime on CPU (observed ~3e-7 on the tiny model).
PARITY_ATOL_FP32 = 1e-4
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


class _CachedForward(torch.nn.Module):
    """Flat tensors in and out around HF's Cache object, which the exporter cannot take as an input."""

    def __init__(self, model: torch.nn.Module, num_layers: int) -> None:
        super().__init__()
        self.model = model
        self.config: Any = getattr(model, "config")  # noqa: B009  # HF configs are untyped
        self.num_layers = num_layers

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        cache = DynamicCache(config=self.config)
        for layer in range(self.num_layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        # Positions from the mask, as HF generate does, so left padding does not shift real tokens' positions.
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache, use_cache=True
        )
        present: list[torch.Tensor] = []
        for layer in out.cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def _cache_names(num_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{layer}.{kind}" for layer in range(num_layers) for kind in ("key", "value")]


def _kv_shape(config: Any) -> tuple[int, int]:
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return int(getattr(config, "num_key_value_heads", None) or heads), head_dim


def export_onnx(model_dir: str | Path, onnx_path: str | Path) -> Path:
    """Export the fp32 model in ``model_dir`` to ``onnx_path`` (weights inline; fine below 2 GiB)."""
    cpu_model = load_model(model_dir, torch.device("cpu"))
    config = cpu_model.model.config
    layers = int(config.num_hidden_layers)
    kv_heads, head_dim = _kv_shape(config)
    wrapper = _CachedForward(cpu_model.model, layers).eval()
    # Trace with a non-empty past and uneven sizes so no dimension is constant-folded into the graph.
    batch, past_len, new_len = 2, 3, 5
    past = [torch.zeros(batch, kv_heads, past_len, head_dim) for _ in range(2 * layers)]
    input_ids = torch.ones(batch, new_len, dtype=torch.long)
    mask = torch.ones(batch, past_len + new_len, dtype=torch.long)
    past_names, present_names = _cache_names(layers, "past"), _cache_names(layers, "present")
    dynamic: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "new"},
        "attention_mask": {0: "batch", 1: "total"},
        "logits": {0: "batch", 1: "new"},
    }
    dynamic.update({name: {0: "batch", 2: "past"} for name in past_names})
    dynamic.update({name: {0: "batch", 2: "total"} for name in present_names})
    target = Path(onnx_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        # TracerWarnings about Python-bool conversions in HF's mask helpers: shapes are checked by the parity tests.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (input_ids, mask, *past),
            str(target),
            dynamo=False,
            opset_version=OPSET,
            input_names=["input_ids", "attention_mask", *past_names],
            output_names=["logits", *present_names],
            dynamic_axes=dynamic,
        )
    meta = {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, "opset": OPSET}
    target.with_suffix(".json").write_text(json.dumps(meta), encoding="utf-8")
    return target


def default_onnx_path(model_dir: str | Path) -> Path:
    return Path(model_dir) / "onnx" / "model.onnx"


def ensure_onnx(model_dir: str | Path, onnx_path: str | Path | None = None) -> Path:
    """Export unless an export newer than the weights already exists."""
    target = Path(onnx_path) if onnx_path is not None else default_onnx_path(model_dir)
    weights = [p for p in Path(model_dir).glob("model*.safetensors") if p.is_file()]
    newest_weights = max((p.stat().st_mtime for p in weights), default=0.0)
    if target.is_file() and target.with_suffix(".json").is_file() and target.stat().st_mtime >= newest_weights:
        return target
    try:
        return export_onnx(model_dir, target)
    except OSError as error:  # e.g. a read-only model directory: the caller can pass a writable onnx_path
        raise WorkloadError(f"cannot write the ONNX export to {target}: {error}; pass another onnx_path") from error


def open_session(
    onnx_path: str | Path, providers: Sequence[str] = PREFERRED_PROVIDERS, threads: int | None = None
) -> ort.InferenceSession:
    """Try each provider in order; ORT itself may also fall back, so callers read ``get_providers()[0]``.

    ``threads`` sets ORT's intra-op pool (default: ORT's own choice, one per core), e.g. to match torch's.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    available = set(ort.get_available_providers())
    errors: list[str] = []
    # onnxruntime-gpu lists CUDA on hosts without a driver and logs a multi-line error when it fails to load it;
    # that failure is expected here and reported through get_providers(), so silence the process logger meanwhile.
    ort.set_default_logger_severity(4)
    try:
        for index, provider in enumerate(providers):
            if provider not in available:
                continue
            try:
                return ort.InferenceSession(str(onnx_path), sess_options=options, providers=list(providers[index:]))
            except Exception as error:  # listed but cannot initialise (no driver, no libcudnn)
                errors.append(f"{provider}: {error}")
    finally:
        ort.set_default_logger_severity(2)  # ORT's default: warnings and above
    raise WorkloadError(f"no ONNX Runtime provider could open {onnx_path}: {'; '.join(errors) or 'none available'}")


def _sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> np.ndarray:
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    order = np.argsort(-probs, axis=-1, kind="stable")
    sorted_probs = np.take_along_axis(probs, order, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the top token always survives).
    keep = np.cumsum(sorted_probs, axis=-1) - sorted_probs < top_p
    sorted_probs = np.where(keep, sorted_probs, 0.0)
    sorted_probs /= sorted_probs.sum(axis=-1, keepdims=True)
    picks = [int(row_order[rng.choice(len(row), p=row)]) for row, row_order in zip(sorted_probs, order, strict=True)]
    return np.asarray(picks, dtype=np.int64)


def generate_onnx(
    request: LLMRequest,
    on_token: TokenCallback | None = None,
    onnx_path: str | Path | None = None,
    session: ort.InferenceSession | None = None,
) -> LLMResult:
    """Decode on ONNX Runtime with the exported KV-cache graph (exported on first use next to the weights)."""
    refuse_quantized(request, "onnx")
    tokenizer_model = load_model(request.model_dir, torch.device("cpu"))  # tokenizer + config; weights stay unused
    if session is None:
        session = open_session(ensure_onnx(request.model_dir, onnx_path))
    provider = session.get_providers()[0]
    return decode_on_session(tokenizer_model, session, request, on_token, provider)


def decode_on_session(
    loaded: LoadedModel,
    session: ort.InferenceSession,
    request: LLMRequest,
    on_token: TokenCallback | None,
    provider: str,
) -> LLMResult:
    started = time.perf_counter()
    config = loaded.model.config
    layers = int(config.num_hidden_layers)
    kv_heads, head_dim = _kv_shape(config)
    encoded = encode_prompts(loaded, request.prompts, request.max_new_tokens)
    ids_t, mask_t = left_pad(encoded, loaded.tokenizer.pad_token_id, torch.device("cpu"))
    input_ids, mask = ids_t.numpy(), mask_t.numpy()
    batch = len(encoded)
    past_names = _cache_names(layers, "past")
    past = [np.zeros((batch, kv_heads, 0, head_dim), dtype=np.float32) for _ in past_names]
    stream = TokenStream(loaded, batch, request.stop_at_eos, on_token)
    rng = np.random.default_rng(request.sampling.seed if request.sampling is not None else 0)
    meter = PeakMemoryMeter(torch.device("cpu"))  # ORT allocations are invisible to torch.cuda's counters
    with oom_guard(f"LLM generation (onnxruntime {provider})"):
        for _ in range(request.max_new_tokens):
            outputs = session.run(
                None, {"input_ids": input_ids, "attention_mask": mask, **dict(zip(past_names, past, strict=True))}
            )
            last = outputs[0][:, -1, :]
            if request.sampling is None:
                next_ids = last.argmax(axis=-1).astype(np.int64)
            else:
                next_ids = _sample(last, request.sampling.temperature, request.sampling.top_p, rng)
            stream.step(next_ids.tolist())
            if all(stream.finished):
                break
            past = list(outputs[1:])
            input_ids = next_ids[:, None]
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=mask.dtype)], axis=1)
    finished = time.perf_counter()
    result = build_result(loaded, request, encoded, stream, started, finished, "onnxruntime", meter, provider=provider)
    device = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
    return result.model_copy(update={"device": device, "dtype": "float32"})


def logits_parity(model_dir: str | Path, session: ort.InferenceSession, prompts: Sequence[str]) -> float:
    """Max |torch - ORT| over the real (non-padding) positions of a left-padded full-sequence forward, fp32."""
    loaded = load_model(model_dir, torch.device("cpu"))
    encoded = encode_prompts(loaded, prompts, 1)
    input_ids, mask = left_pad(encoded, loaded.tokenizer.pad_token_id, torch.device("cpu"))
    layers = int(loaded.model.config.num_hidden_layers)
    kv_heads, head_dim = _kv_shape(loaded.model.config)
    with torch.no_grad():
        reference = _CachedForward(loaded.model, layers)(
            input_ids, mask, *[torch.zeros(len(encoded), kv_heads, 0, head_dim) for _ in range(2 * layers)]
        )[0].numpy()
    feeds = {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy()}
    feeds.update(
        {name: np.zeros((len(encoded), kv_heads, 0, head_dim), np.float32) for name in _cache_names(layers, "past")}
    )
    logits = session.run(["logits"], feeds)[0]
    real = mask.numpy().astype(bool)
    return float(np.abs(reference[real] - logits[real]).max())
