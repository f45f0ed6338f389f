"""The fast decode loop on a real GPU: compiled with CUDA graphs ("reduce-overhead"), several calls in a row.

Runs only where ``torch.cuda.is_available()``; elsewhere every test here is skipped with that reason (a skip, not a
pass: on the CPU-only CI these checks do not run). The CPU half is tests/unit/test_workload_decode.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from guest.workloads.assets import make_tiny_llm, tiny_llama_config
from guest.workloads.decode import Decoder
from guest.workloads.errors import PromptTooLong
from guest.workloads.llm import LoadedModel, generate, load_model
from guest.workloads.llm_fast import with_random_weights
from guest.workloads.schema import LLMRequest, Sampling

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU decode checks did not run"),
]

PROMPTS = ("The keeper", "A river does not argue with the hill in front of it.", "Rain")
SHAPES = [(PROMPTS[:1], 20), (PROMPTS, 33), (PROMPTS[1:], 5), (PROMPTS[:2], 40), (PROMPTS[:1], 20)]


def ask(prompts: tuple[str, ...], new: int, **kwargs: object) -> LLMRequest:
    return LLMRequest(model_dir="x", prompts=prompts, max_new_tokens=new, stop_at_eos=False, **kwargs)  # type: ignore[arg-type]


def token_ids(result: object) -> list[tuple[int, ...]]:
    return [c.token_ids for c in result.completions]  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llm(tmp_path_factory.mktemp("gpu-decode") / "tiny", seed=0)


@pytest.fixture(scope="module")
def fp32(tiny_dir: Path) -> LoadedModel:
    """fp32 on the GPU, with TF32 off: equality with HF eager is then a test of the loop, not of rounding."""
    torch.backends.cuda.matmul.allow_tf32 = False
    loaded = load_model(tiny_dir, torch.device("cuda"))
    model = loaded.model.float()
    return dataclasses.replace(loaded, model=model, dtype=torch.float32)


@pytest.fixture(scope="module")
def bf16_gqa(tiny_dir: Path) -> LoadedModel:
    loaded = load_model(tiny_dir, torch.device("cuda"))
    config = tiny_llama_config(len(loaded.tokenizer), hidden_size=128, num_layers=2, num_heads=8, num_kv_heads=2)
    return with_random_weights(loaded.tokenizer, config, torch.device("cuda"), seed=1)


def test_graph_captured_loop_gives_hf_eager_greedy_tokens_call_after_call(fp32: LoadedModel) -> None:
    decoder = Decoder.build(fp32, compile_mode="reduce-overhead")
    for prompts, new in SHAPES:
        wanted = generate(ask(prompts, new), model=fp32)
        got = decoder.generate(ask(prompts, new))
        assert token_ids(got) == token_ids(wanted), (prompts, new)
    assert got.backend == "fast-compiled-reduce-overhead" and got.device.startswith("cuda")


def test_bf16_gqa_graphs_run_every_shape_and_match_the_uncompiled_loop(bf16_gqa: LoadedModel) -> None:
    compiled = Decoder.build(bf16_gqa, compile_mode="reduce-overhead")
    eager = Decoder.build(bf16_gqa, compile_mode=None)
    agree = total = 0
    for prompts, new in SHAPES:
        a, b = token_ids(compiled.generate(ask(prompts, new))), token_ids(eager.generate(ask(prompts, new)))
        assert [len(row) for row in a] == [new] * len(prompts)
        agree += sum(x == y for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))
        total += sum(len(row) for row in a)
    # bf16 kernels differ between inductor and eager, and random weights give near-ties: most tokens must agree.
    print(f"bf16 compiled vs eager loop: {agree}/{total} greedy tokens agree")
    assert agree / total > 0.9


def test_sampling_and_int8_run_under_graphs_and_errors_leave_the_decoder_usable(bf16_gqa: LoadedModel) -> None:
    decoder = Decoder.build(bf16_gqa, compile_mode="reduce-overhead")
    sampling = Sampling(temperature=1.2, top_p=0.9, seed=4)
    first = token_ids(decoder.generate(ask(PROMPTS, 24, sampling=sampling)))
    assert first == token_ids(decoder.generate(ask(PROMPTS, 24, sampling=sampling)))
    with pytest.raises(PromptTooLong):
        decoder.generate(ask(PROMPTS[:1], bf16_gqa.context_window))
    assert first == token_ids(decoder.generate(ask(PROMPTS, 24, sampling=sampling)))
    int8 = Decoder.build(bf16_gqa, compile_mode="reduce-overhead", weights="int8")
    for prompts, new in SHAPES[:3]:
        result = int8.generate(ask(prompts, new))
        assert result.backend == "fast-int8-compiled-reduce-overhead"
        assert result.generated_tokens == len(prompts) * new
