"""A decode loop of our own, in the gpt-fast style: prefill once, then one compiled, graph-captured step per token.

``generate``'s HF path runs Python between every step and syncs with the host for every token; at batch 1 on a GPU
that leaves the HBM idle most of the time. Here:

- ``FastLlama`` is a compact Llama forward built from a loaded HF ``LlamaForCausalLM``: q/k/v and gate/up are fused
  into one matmul each, the KV cache is a static buffer per layer written with ``index_copy_``, and attention is
  ``scaled_dot_product_attention`` over the whole static cache with a mask, so every decode step has the same shapes.
- ``Decoder.generate`` prefills the prompt, then calls one step function per token. On CUDA it is compiled with
  ``mode="reduce-overhead"`` (inductor + CUDA graphs). Sampling (greedy, or temperature/top-p by the exponential
  trick) runs on the device, and tokens reach the host in chunks through pinned memory and events, so nothing in the
  loop waits for the GPU except the EOS check at chunk boundaries, which waits for the chunk before.
- CUDA graphs reuse their output buffers on the next replay (the "accessing tensor output of CUDAGraphs that has
  been overwritten" error of the HF static-cache path): every output that outlives a step is cloned before the next
  one, and ``torch.compiler.cudagraph_mark_step_begin()`` marks each step, as PyTorch documents.

Left-padded batches work: each row's RoPE positions start at its first real token, and pad slots are masked out of
every later query. The same code runs on CPU, compiled (inductor) or not, which is how the tests check it against
HF's eager greedy tokens.
"""

from __future__ import annotations

import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812  # torch's own convention
from torch import nn

from .errors import UnsupportedModel
from .llm import LoadedModel, TokenCallback, TokenStream, build_result, encode_prompts, kv_cache_bytes
from .runtime import PeakMemoryMeter, oom_guard, require_memory
from .schema import LLMRequest, LLMResult

CACHE_BUCKET = 256  # cache lengths are rounded up to this, so calls of nearby sizes reuse one compiled graph
CHUNK_STEPS = 16  # tokens per device-to-host transfer when streaming or stopping at EOS


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # HF's order: normalise in fp32, cast back, then scale (bf16 results match HF's bit for bit).
        hidden = x.float()
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hidden.to(x.dtype)


class KVCache(nn.Module):
    k: torch.Tensor
    v: torch.Tensor

    def __init__(self, batch: int, length: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: Any) -> None:
        super().__init__()
        shape = (batch, kv_heads, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device))

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        return self.k, self.v


class Block(nn.Module):
    def __init__(self, layer: Any, config: Any) -> None:
        super().__init__()
        attention, mlp = layer.self_attn, layer.mlp
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        with torch.no_grad():
            wqkv = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
            w13 = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        self.wqkv = nn.Linear(wqkv.shape[1], wqkv.shape[0], bias=False, device="meta")
        self.wqkv.weight = nn.Parameter(wqkv, requires_grad=False)
        self.wo = nn.Linear(1, 1, bias=False, device="meta")
        self.wo.weight = nn.Parameter(attention.o_proj.weight.detach(), requires_grad=False)
        self.w13 = nn.Linear(w13.shape[1], w13.shape[0], bias=False, device="meta")
        self.w13.weight = nn.Parameter(w13, requires_grad=False)
        self.w2 = nn.Linear(1, 1, bias=False, device="meta")
        self.w2.weight = nn.Parameter(mlp.down_proj.weight.detach(), requires_grad=False)
        eps = float(config.rms_norm_eps)
        self.attention_norm = RMSNorm(layer.input_layernorm.weight.detach(), eps)
        self.mlp_norm = RMSNorm(layer.post_attention_layernorm.weight.detach(), eps)
        self.cache: KVCache | None = None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, slots: torch.Tensor
    ) -> torch.Tensor:
        assert self.cache is not None
        batch, steps, _ = x.shape
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = self.wqkv(self.attention_norm(x)).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(batch, steps, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, steps, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, steps, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        keys, values = self.cache.update(slots, k, v)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=self.kv_heads != self.heads)
        x = x + self.wo(y.transpose(1, 2).reshape(batch, steps, q_size))
        gate, up = self.w13(self.mlp_norm(x)).chunk(2, dim=-1)
        out: torch.Tensor = x + self.w2(F.silu(gate) * up)
        return out


class FastLlama(nn.Module):
    inv_freq: torch.Tensor
    valid: torch.Tensor  # (B, L): the slot holds a real token (left padding is not)
    key_slots: torch.Tensor  # arange(L)
    """The forward of an HF Llama-family causal LM, rewritten for a static cache. Weights are taken from ``hf``
    (fused ones are copies; norms, o/down projections, embedding and LM head are shared tensors)."""

    def __init__(self, hf: Any) -> None:
        super().__init__()
        config = hf.config
        model_type = getattr(config, "model_type", None)
        if model_type != "llama":
            raise UnsupportedModel(f"the fast decode loop runs Llama models, not {model_type!r}")
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            raise UnsupportedModel("the fast decode loop does not run Llama variants with attention or MLP biases")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise UnsupportedModel(f"the fast decode loop runs SiLU MLPs, not {config.hidden_act!r}")
        self.config = config
        self.embed = hf.model.embed_tokens
        self.blocks = [Block(layer, config) for layer in hf.model.layers]
        self.layers = nn.ModuleList(self.blocks)  # registers them; ``blocks`` is the same list, typed
        self.norm = RMSNorm(hf.model.norm.weight.detach(), float(config.rms_norm_eps))
        # Our own Linear around the same tensor: quantizing it must not touch the HF model's (tied) head.
        self.lm_head = nn.Linear(1, 1, bias=False, device="meta")
        self.lm_head.weight = nn.Parameter(hf.lm_head.weight.detach(), requires_grad=False)
        # RoPE from HF's own rotary module, so scaled variants (llama3, linear, ...) come out the same.
        rotary = hf.model.rotary_emb
        self.register_buffer("inv_freq", rotary.inv_freq.detach().float().clone(), persistent=False)
        self.attention_scaling = float(getattr(rotary, "attention_scaling", 1.0))
        self.requires_grad_(False)
        self.batch = 0
        self.length = 0

    @property
    def device(self) -> torch.device:
        weight: torch.Tensor = self.embed.weight
        return weight.device

    @property
    def dtype(self) -> torch.dtype:
        weight: torch.Tensor = self.embed.weight
        return weight.dtype

    def setup_cache(self, batch: int, length: int) -> None:
        """(Re)allocate every layer's cache and the pad mask for this batch and cache length."""
        if (batch, length) == (self.batch, self.length):
            return
        for block in self.blocks:
            block.cache = None  # free the old caches before the new ones are allocated
        for block in self.blocks:
            block.cache = KVCache(batch, length, block.kv_heads, block.head_dim, self.dtype, self.device)
        self.register_buffer(
            "valid", torch.zeros(batch, length, dtype=torch.bool, device=self.device), persistent=False
        )
        self.register_buffer("key_slots", torch.arange(length, device=self.device), persistent=False)
        self.batch, self.length = batch, length

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, every_position: bool = False
    ) -> torch.Tensor:
        """tokens, positions: (B, T); slots: (T,) cache slots they go to. Returns fp32 logits of the last position
        (B, V), or of every position (B, T, V) with ``every_position``."""
        # A query at slot s sees keys at slots <= s that are real tokens; a pad query also sees itself, so its softmax
        # is never empty (an all-masked row would be NaN, and NaN values leak through zero attention weights).
        causal = self.key_slots[None, :] <= slots[:, None]  # (T, L)
        mask = (causal[None] & self.valid[:, None, :]) | (self.key_slots[None, :] == slots[:, None])[None]
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, D/2)
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = (angles.cos() * self.attention_scaling).to(self.dtype)[:, None]
        sin = (angles.sin() * self.attention_scaling).to(self.dtype)[:, None]
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin, mask[:, None], slots)
        logits: torch.Tensor = self.lm_head(self.norm(x if every_position else x[:, -1]))
        return logits.float()


def quantize_int8(model: FastLlama) -> None:
    """Weight-only int8 for every Linear (per-channel scales), with torchao's ``Int8WeightOnlyConfig``: decode reads
    half the bytes of bf16. Activations stay in the model dtype; the embedding table is not quantized."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as error:
        raise UnsupportedModel(f"int8 weights need torchao, which does not import here: {error}") from error
    quantize_(model, Int8WeightOnlyConfig())


def step_bytes(model: nn.Module) -> int:
    """Bytes one decode step reads at batch 1: every Linear weight (int8 data and scales when quantized) and the
    norms. The embedding table is left out: a step reads one row of it (an LM head tied to it is counted, since the
    head reads all of it)."""
    total = 0
    for module in model.modules():
        if isinstance(module, (nn.Linear, RMSNorm)):
            total += _tensor_bytes(module.weight)
    return total


def _tensor_bytes(tensor: torch.Tensor) -> int:
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, nn.Parameter):  # a subclass (torchao's Int8Tensor)
        names, _ = tensor.__tensor_flatten__()  # type: ignore[attr-defined]
        return sum(_tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def sample(logits: torch.Tensor, temperature: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """(B, V) fp32 logits -> (B, 1) token ids, on the device: argmax, or nucleus sampling by the exponential trick
    (argmax of p / Exp(1) draws a token with probability p, without multinomial's host sync)."""
    if temperature is None or top_p is None:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # keep the token that crosses top_p
    noise = torch.empty_like(sorted_probs).exponential_(1)
    return order.gather(-1, (sorted_probs / noise).argmax(dim=-1, keepdim=True))


def decode_step(
    model: FastLlama,
    token: torch.Tensor,
    slot: torch.Tensor,
    pads: torch.Tensor,
    temperature: torch.Tensor | None,
    top_p: torch.Tensor | None,
) -> torch.Tensor:
    """One token for every row: token (B, 1) goes to cache slot ``slot`` (1,); returns the next (B, 1)."""
    positions = (slot - pads)[:, None]
    return sample(model(token, positions, slot), temperature, top_p)


def cache_length(needed: int, context_window: int) -> int:
    """Round up to CACHE_BUCKET, never past the context window."""
    return min(context_window, -(-needed // CACHE_BUCKET) * CACHE_BUCKET)


@dataclass
class Decoder:
    """A FastLlama plus its (optionally compiled) step, reused across requests. ``compile_mode`` None runs eager."""

    loaded: LoadedModel
    model: FastLlama
    step: Callable[..., torch.Tensor]
    compile_mode: str | None
    weights: str = "native"  # or "int8"

    @classmethod
    def build(cls, loaded: LoadedModel, compile_mode: str | None = "auto", weights: str = "native") -> Decoder:
        if compile_mode == "auto":
            compile_mode = "reduce-overhead" if loaded.device.type == "cuda" else None
        if weights not in ("native", "int8"):
            raise UnsupportedModel(f"unknown weight format {weights!r}; use native or int8")
        model = FastLlama(loaded.model)
        if weights == "int8":
            quantize_int8(model)
        step: Callable[..., torch.Tensor] = decode_step
        if compile_mode is not None:
            # Dynamo keeps its compiled graphs per code object, and stops at recompile_limit (8) entries: with one
            # shared decode_step, every Decoder's model and shapes would add to one list until it overflowed (seen
            # on an H200 with four decoders). A copy of the code object per Decoder keeps each one's list its own.
            own = types.FunctionType(decode_step.__code__.replace(), decode_step.__globals__, "decode_step")
            step = torch.compile(own, mode=compile_mode, fullgraph=True)
        return cls(loaded, model, step, compile_mode, weights)

    @property
    def backend(self) -> str:
        name = "fast" + ("-int8" if self.weights == "int8" else "")
        return name + ("" if self.compile_mode is None else f"-compiled-{self.compile_mode}")

    def generate(self, request: LLMRequest, on_token: TokenCallback | None = None) -> LLMResult:
        loaded = self.loaded
        started = time.perf_counter()
        encoded = encode_prompts(loaded, request.prompts, request.max_new_tokens)
        batch, longest = len(encoded), max(len(ids) for ids in encoded)
        length = cache_length(longest + request.max_new_tokens, loaded.context_window)
        require_memory(
            kv_cache_bytes(loaded.model.config, batch, length, loaded.dtype)
            + batch * int(loaded.model.config.vocab_size) * 4 * 4,
            f"generating {request.max_new_tokens} tokens for {batch} prompts",
            loaded.device,
        )
        stream = TokenStream(loaded, batch, request.stop_at_eos, on_token)
        meter = PeakMemoryMeter(loaded.device)
        devices = [loaded.device.index or 0] if loaded.device.type == "cuda" else []
        with oom_guard(f"LLM generation ({self.backend})"), torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(request.sampling.seed if request.sampling is not None else 0)
            first_at = self._decode(encoded, longest, length, request, stream)
        finished = time.perf_counter()
        stream.first_token_at, stream.last_token_at = first_at, finished
        return build_result(loaded, request, encoded, stream, started, finished, self.backend, meter, provider=None)

    def _decode(
        self, encoded: list[list[int]], longest: int, length: int, request: LLMRequest, stream: TokenStream
    ) -> float:
        """Runs prefill and the decode loop, feeding ``stream``; returns when the first token was on the host."""
        device, model = self.loaded.device, self.model
        batch = len(encoded)
        model.setup_cache(batch, length)
        pad_id = int(self.loaded.tokenizer.pad_token_id)
        tokens = torch.full((batch, longest), pad_id, dtype=torch.long)
        pads = torch.tensor([longest - len(ids) for ids in encoded], dtype=torch.long)
        for row, ids in enumerate(encoded):
            tokens[row, longest - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        tokens, pads = tokens.to(device), pads.to(device)
        slots = torch.arange(longest, device=device)
        model.valid.zero_()
        model.valid[:, :longest] = slots[None, :] >= pads[:, None]
        model.valid[:, longest:] = True
        positions = (slots[None, :] - pads[:, None]).clamp(min=0)
        if request.sampling is None:
            temperature = top_p = None
        else:
            temperature = torch.tensor(request.sampling.temperature, device=device)
            top_p = torch.tensor(request.sampling.top_p, device=device)

        steps = request.max_new_tokens
        out = torch.empty((batch, steps), dtype=torch.long, device=device)
        token = sample(model(tokens, positions, slots), temperature, top_p)  # prefill, eager; (B, 1) contiguous
        out[:, :1] = token
        first = out[:, 0].tolist()  # the one sync before the loop: time to first token is real
        first_at = time.perf_counter()
        stream.step(first)
        chunk = CHUNK_STEPS if (request.stop_at_eos or stream.on_token is not None) else steps
        host = torch.empty((batch, chunk), dtype=torch.long, pin_memory=device.type == "cuda")
        pending: tuple[int, int, Any] | None = None  # (start, end, event) of a chunk on its way to the host
        slot = torch.tensor([longest], dtype=torch.long, device=device)
        done_at = 1
        for index in range(1, steps):
            if device.type == "cuda" and self.compile_mode is not None:
                torch.compiler.cudagraph_mark_step_begin()  # type: ignore[no-untyped-call]
            token = self.step(model, token, slot, pads, temperature, top_p).clone()
            out[:, index : index + 1].copy_(token)
            slot += 1
            if (index + 1) % chunk == 0 or index + 1 == steps:
                # Hand the finished chunk to the host, then settle the one before it: by now the GPU has moved on,
                # so waiting for it costs nothing, and the queue of steps stays full.
                if pending is not None and self._deliver(pending, host, stream):
                    return first_at
                start = done_at
                pending = (start, index + 1, self._copy_out(out[:, start : index + 1], host))
                done_at = index + 1
        if pending is not None:
            self._deliver(pending, host, stream)
        return first_at

    @staticmethod
    def _copy_out(chunk: torch.Tensor, host: torch.Tensor) -> Any:
        width = chunk.shape[1]
        host[:, :width].copy_(chunk, non_blocking=chunk.device.type == "cuda")
        if chunk.device.type != "cuda":
            return None
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record()
        return event

    @staticmethod
    def _deliver(pending: tuple[int, int, Any], host: torch.Tensor, stream: TokenStream) -> bool:
        """Feed a chunk that reached the host to the stream; True when every row has finished."""
        start, end, event = pending
        if event is not None:
            event.synchronize()
        rows = host[:, : end - start].tolist()
        for column in range(end - start):
            stream.step([row[column] for row in rows])
            if all(stream.finished):
                return True
        return False


def decoder_for(loaded: LoadedModel, compile_mode: str | None = "auto", weights: str = "native") -> Decoder:
    """One Decoder per loaded model, compile mode and weight format, built on first use and kept on the LoadedModel
    (the agent loads a model once and serves many requests)."""
    if (compile_mode, weights) not in loaded.decoders:
        loaded.decoders[compile_mode, weights] = Decoder.build(loaded, compile_mode, weights)
    decoder: Decoder = loaded.decoders[compile_mode, weights]
    return decoder
