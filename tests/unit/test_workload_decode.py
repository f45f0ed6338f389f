"""The fast decode loop (guest.workloads.decode) on CPU: it must give HF eager generate's greedy tokens, call after
call with other shapes, compiled or not; sampling on the device is seeded; int8 weights are smaller and close.

The GPU half (CUDA graphs, bf16) is tests/unit/test_gpu_decode.py, which runs only where CUDA is present.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from guest.workloads.assets import read_corpus, tiny_llama_config
from guest.workloads.decode import CACHE_BUCKET, Decoder, cache_length, decoder_for, step_bytes
from guest.workloads.errors import PromptTooLong, UnsupportedModel
from guest.workloads.llm import LoadedModel, generate
from guest.workloads.llm_fast import generate_fast, with_random_weights
from guest.workloads.schema import LLMRequest, Sampling, TokenEvent

torch.set_num_threads(1)  # two cores shared with the VM tests

PROMPTS = ("The keeper", "A river does not argue with the hill in front of it.", "Rain")
# (prompts, new tokens): batch sizes, prompt lengths (so left padding) and token counts change from call to call,
# and 40 tokens cross two of the loop's 16-step chunks.
SHAPES = [(PROMPTS[:1], 20), (PROMPTS, 33), (PROMPTS[1:], 5), (PROMPTS[:2], 40), (PROMPTS[2:], 1)]


@pytest.fixture(scope="module")
def gqa(tiny: LoadedModel) -> LoadedModel:
    """Grouped-query attention, as in the Llama-1B shape: 8 query heads share 2 KV heads."""
    config = tiny_llama_config(len(tiny.tokenizer), hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=2)
    return with_random_weights(tiny.tokenizer, config, torch.device("cpu"), seed=3)


def ask(model_dir: Path | str, prompts: tuple[str, ...], new: int, **kwargs: object) -> LLMRequest:
    return LLMRequest(model_dir=str(model_dir), prompts=prompts, max_new_tokens=new, **kwargs)  # type: ignore[arg-type]


def token_ids(result: object) -> list[tuple[int, ...]]:
    return [c.token_ids for c in result.completions]  # type: ignore[attr-defined]


@pytest.mark.parametrize("which", ["tiny", "gqa"])
def test_greedy_equals_hf_eager_for_several_shapes_in_a_row(which: str, request: pytest.FixtureRequest) -> None:
    loaded: LoadedModel = request.getfixturevalue(which)
    decoder = Decoder.build(loaded, compile_mode=None)
    for prompts, new in SHAPES:
        wanted = generate(ask("x", prompts, new, stop_at_eos=False), model=loaded)
        got = decoder.generate(ask("x", prompts, new, stop_at_eos=False))
        assert token_ids(got) == token_ids(wanted), (prompts, new)
        assert got.backend == "fast" and got.generated_tokens == len(prompts) * new


def test_compiled_loop_equals_hf_eager_across_calls(tiny: LoadedModel) -> None:
    """Inductor on CPU (CUDA graphs exist only on a GPU). Calls of one batch size reuse one compiled step, whatever
    their prompt and token counts: a recompile of the 1B model costs a minute on an H200."""
    from torch._dynamo.utils import counters

    decoder = Decoder.build(tiny, compile_mode="default")
    counters.clear()
    graphs = []
    for prompts, new in (SHAPES[0], (PROMPTS[2:], 7), SHAPES[1], (PROMPTS[:1], 9)):
        wanted = generate(ask("x", prompts, new, stop_at_eos=False), model=tiny)
        got = decoder.generate(ask("x", prompts, new, stop_at_eos=False))
        assert token_ids(got) == token_ids(wanted), (prompts, new)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [1, 1, 2, 2]  # batch 1, batch 1 again, batch 3 (one recompile), batch 1 from the cache
    assert got.backend == "fast-compiled-default"


def test_each_decoder_keeps_its_own_compiled_graphs(tiny: LoadedModel) -> None:
    """Dynamo's recompile limit (8) is per code object: decoders sharing one would overflow it together."""
    steps = [Decoder.build(tiny, compile_mode="default").step for _ in range(2)]
    codes = [getattr(step, "_torchdynamo_orig_callable", step).__code__ for step in steps]
    assert codes[0] is not codes[1]


def test_eos_stops_each_row_like_hf_and_streams_exactly_the_tokens(tiny: LoadedModel) -> None:
    free = token_ids(generate(ask("x", PROMPTS[:1], 30, stop_at_eos=False), model=tiny))[0]
    cut = next(i for i in range(18, len(free)) if free[i] not in free[:i])  # past the first 16-step chunk
    tokenizer = copy.deepcopy(tiny.tokenizer)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(free[cut])
    with_eos = dataclasses.replace(tiny, tokenizer=tokenizer)
    wanted = generate(ask("x", PROMPTS, 30), model=with_eos)
    events: list[TokenEvent] = []
    got = Decoder.build(with_eos, compile_mode=None).generate(ask("x", PROMPTS, 30), on_token=events.append)
    assert token_ids(got) == token_ids(wanted)
    assert got.completions[0].token_ids == free[:cut] and got.completions[0].finish_reason == "eos"
    assert [c.finish_reason for c in got.completions] == [c.finish_reason for c in wanted.completions]
    for row, completion in enumerate(got.completions):
        assert [e.token_id for e in events if e.sequence == row] == list(completion.token_ids)


def test_sampling_on_the_device_is_seeded_and_top_p_near_zero_is_greedy(tiny: LoadedModel) -> None:
    decoder = Decoder.build(tiny, compile_mode=None)

    def sampled(seed: int, top_p: float = 0.9) -> list[tuple[int, ...]]:
        sampling = Sampling(temperature=1.5, top_p=top_p, seed=seed)
        return token_ids(decoder.generate(ask("x", PROMPTS, 24, sampling=sampling, stop_at_eos=False)))

    assert sampled(1) == sampled(1)
    assert sampled(1) != sampled(2)
    greedy = token_ids(decoder.generate(ask("x", PROMPTS, 24, stop_at_eos=False)))
    assert sampled(5, top_p=1e-6) == greedy  # only the most likely token survives the nucleus
    assert sampled(1) != greedy


def test_prompt_past_the_context_window_is_refused_and_the_next_call_works(tiny: LoadedModel) -> None:
    decoder = Decoder.build(tiny, compile_mode=None)
    with pytest.raises(PromptTooLong, match="context window is 256"):
        decoder.generate(ask("x", ("word " * 300,), 4))
    with pytest.raises(PromptTooLong):
        decoder.generate(ask("x", PROMPTS[:1], 256))  # the prompt fits, the tokens asked for do not
    assert token_ids(decoder.generate(ask("x", PROMPTS[:1], 8, stop_at_eos=False))) == token_ids(
        generate(ask("x", PROMPTS[:1], 8, stop_at_eos=False), model=tiny)
    )


def test_cache_lengths_come_in_buckets_capped_by_the_context() -> None:
    assert cache_length(1, 4096) == CACHE_BUCKET
    assert cache_length(CACHE_BUCKET + 1, 4096) == 2 * CACHE_BUCKET
    assert cache_length(300, 300) == 300


def test_int8_weights_are_a_quarter_of_fp32_and_give_close_logits(tiny: LoadedModel) -> None:
    native = Decoder.build(tiny, compile_mode=None)
    int8 = Decoder.build(tiny, compile_mode=None, weights="int8")
    assert 0.2 < step_bytes(int8.model) / step_bytes(native.model) < 0.3  # int8 + per-channel scales vs fp32
    ids = tiny.tokenizer.encode(read_corpus()[:400], add_special_tokens=False)[:64]
    tokens = torch.tensor([ids])
    logits = {}
    for name, decoder in (("native", native), ("int8", int8)):
        decoder.model.setup_cache(1, CACHE_BUCKET)
        decoder.model.valid.fill_(True)
        slots = torch.arange(len(ids))
        with torch.no_grad():
            logits[name] = decoder.model(tokens, slots[None], slots, every_position=True)
    error = (logits["int8"] - logits["native"]).norm() / logits["native"].norm()
    assert error < 0.05, float(error)
    result = int8.generate(ask("x", PROMPTS, 6, stop_at_eos=False))
    assert result.backend == "fast-int8" and result.generated_tokens == 18
    # The HF model under it is untouched: eager generate still gives its own tokens.
    assert token_ids(generate(ask("x", PROMPTS[:1], 8, stop_at_eos=False), model=tiny)) == token_ids(
        native.generate(ask("x", PROMPTS[:1], 8, stop_at_eos=False))
    )


def test_other_architectures_are_refused_in_one_line(tiny: LoadedModel) -> None:
    biased = copy.deepcopy(tiny.model)
    biased.config.mlp_bias = True
    with pytest.raises(UnsupportedModel, match="biases"):
        Decoder.build(dataclasses.replace(tiny, model=biased), compile_mode=None)
    with pytest.raises(UnsupportedModel, match="int8 weights run on --backend fast"):
        generate(ask("x", PROMPTS[:1], 2, weights="int8"), model=tiny)


def test_entry_point_reuses_one_decoder_per_model(tiny_dir: Path, tiny: LoadedModel) -> None:
    first = generate_fast(ask(tiny_dir, PROMPTS[:1], 4, stop_at_eos=False), model=tiny)
    assert decoder_for(tiny) is decoder_for(tiny)
    assert decoder_for(tiny, weights="int8") is not decoder_for(tiny)
    assert first.backend == "fast" and first.device == "cpu"  # CPU: eager loop, no CUDA graphs


def test_guest_cli_runs_each_backend_and_says_which_ran(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from guest.workloads import __main__ as cli

    args = ["run", "llm", "--model", str(tiny_dir), "--prompt", "The keeper", "--max-new-tokens", "6", "--ignore-eos"]
    ran = {}
    for backend in ("eager", "fast"):
        assert cli.main([*args, "--backend", backend, "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        ran[backend] = (result["backend"], result["device"], result["completions"][0]["token_ids"])
    assert ran["eager"][:2] == ("torch", "cpu") and ran["fast"][:2] == ("fast", "cpu")
    assert ran["eager"][2] == ran["fast"][2]
    assert cli.main([*args, "--backend", "fast", "--weights", "int8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == "fast-int8"
    assert cli.main([*args, "--backend", "eager", "--weights", "int8"]) != 0
    assert capsys.readouterr().err.splitlines() == [
        "error: the eager backend runs native weights only; int8 weights run on --backend fast"
    ]
