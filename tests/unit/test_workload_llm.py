"""LLM workload: determinism, batching, streaming, ONNX parity and typed errors, on the tiny model built locally."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import onnxruntime as ort
import pytest
import torch

from guest.workloads.assets import make_tiny_llm
from guest.workloads.errors import ModelDirError, OutOfMemory, PromptTooLong, error_from_dict
from guest.workloads.llm import LoadedModel, generate
from guest.workloads.llm_onnx import PARITY_ATOL_FP32, ensure_onnx, generate_onnx, logits_parity, open_session
from guest.workloads.schema import LLMRequest, Sampling, TokenEvent

torch.set_num_threads(1)  # two cores shared with the VM tests

PROMPTS = ("The keeper", "A river does not argue with the hill in front of it.", "Rain")


@pytest.fixture(scope="session")
def onnx_session(tiny_dir: Path) -> ort.InferenceSession:
    return open_session(ensure_onnx(tiny_dir))


def request(tiny_dir: Path, prompts: tuple[str, ...] = PROMPTS[:1], **kwargs: object) -> LLMRequest:
    return LLMRequest(model_dir=str(tiny_dir), prompts=prompts, **kwargs)  # type: ignore[arg-type]


def tokens(result: object) -> list[tuple[int, ...]]:
    return [c.token_ids for c in result.completions]  # type: ignore[attr-defined]


def test_tiny_model_is_deterministic_and_has_the_asked_shape(tiny_dir: Path, tmp_path: Path) -> None:
    again = make_tiny_llm(tmp_path / "again", seed=0)
    other = make_tiny_llm(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()
    config = json.loads((tiny_dir / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (64, 2, 4)
    assert (config["vocab_size"], config["max_position_embeddings"]) == (512, 256)


def test_greedy_is_deterministic(tiny_dir: Path, tiny: LoadedModel) -> None:
    first = generate(request(tiny_dir, max_new_tokens=16, stop_at_eos=False), model=tiny)
    second = generate(request(tiny_dir, max_new_tokens=16, stop_at_eos=False), model=tiny)
    assert tokens(first) == tokens(second)
    assert len(first.completions[0].token_ids) == 16


def test_sampling_is_reproducible_per_seed_and_seeds_differ(tiny_dir: Path, tiny: LoadedModel) -> None:
    def sample(seed: int) -> list[tuple[int, ...]]:
        sampling = Sampling(temperature=1.0, top_p=0.95, seed=seed)
        return tokens(
            generate(request(tiny_dir, PROMPTS, max_new_tokens=12, sampling=sampling, stop_at_eos=False), model=tiny)
        )

    torch.manual_seed(123)
    outside_before = torch.rand(1)
    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    greedy = tokens(generate(request(tiny_dir, PROMPTS, max_new_tokens=12, stop_at_eos=False), model=tiny))
    assert sample(7) != greedy
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), outside_before)  # a seeded request leaves the global RNG stream alone


def test_batch_greedy_equals_one_prompt_at_a_time(tiny_dir: Path, tiny: LoadedModel) -> None:
    batch = generate(request(tiny_dir, PROMPTS, max_new_tokens=12, stop_at_eos=False), model=tiny)
    singles = [
        tokens(generate(request(tiny_dir, (p,), max_new_tokens=12, stop_at_eos=False), model=tiny))[0] for p in PROMPTS
    ]
    assert tokens(batch) == singles
    assert [c.prompt_tokens for c in batch.completions] == [len(tiny.tokenizer.encode(p)) + 1 for p in PROMPTS]  # + BOS


def test_stream_delivers_exactly_the_generated_tokens(tiny_dir: Path, tiny: LoadedModel) -> None:
    events: list[TokenEvent] = []
    result = generate(
        request(tiny_dir, PROMPTS, max_new_tokens=10, stop_at_eos=False), on_token=events.append, model=tiny
    )
    for sequence, completion in enumerate(result.completions):
        mine = [e for e in events if e.sequence == sequence]
        assert [e.token_id for e in mine] == list(completion.token_ids)
        assert [e.index for e in mine] == list(range(len(completion.token_ids)))
        assert completion.text.startswith("".join(e.text for e in mine))  # an unfinished UTF-8 tail may be held back
    assert len(events) == result.generated_tokens == 30


def test_eos_ends_a_sequence_and_is_neither_returned_nor_streamed(tiny_dir: Path, tiny: LoadedModel) -> None:
    free = tokens(generate(request(tiny_dir, max_new_tokens=12, stop_at_eos=False), model=tiny))[0]
    cut = next(i for i in range(2, len(free)) if free[i] not in free[:i])
    # Make the 'cut'-th greedy token the EOS token, so the stop point is known in advance.
    tokenizer = copy.deepcopy(tiny.tokenizer)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(free[cut])
    model = LoadedModel(tiny.model, tokenizer, tiny.device, tiny.dtype, tiny.context_window, tiny.model_dir)
    events: list[TokenEvent] = []
    result = generate(request(tiny_dir, max_new_tokens=12), on_token=events.append, model=model)
    assert result.completions[0].token_ids == free[:cut]
    assert result.completions[0].finish_reason == "eos"
    assert [e.token_id for e in events] == list(free[:cut])


def test_result_reports_timings_and_memory(tiny_dir: Path, tiny: LoadedModel) -> None:
    result = generate(request(tiny_dir, PROMPTS, max_new_tokens=8, stop_at_eos=False), model=tiny)
    assert (result.backend, result.device, result.dtype) == ("torch", "cpu", "float32")
    assert 0 < result.ttft_s <= result.total_s
    assert result.prompt_tokens_per_s > 0 and result.decode_tokens_per_s > 0
    assert result.prompt_tokens == sum(c.prompt_tokens for c in result.completions)
    assert result.peak_memory_source == "rss_peak" and result.peak_memory_bytes > 50 * 2**20


def test_prompt_longer_than_the_context_is_refused_with_numbers(tiny_dir: Path, tiny: LoadedModel) -> None:
    long_prompt = " ".join(["lighthouse"] * 300)
    with pytest.raises(PromptTooLong) as caught:
        generate(request(tiny_dir, ("short", long_prompt), max_new_tokens=4), model=tiny)
    error = caught.value
    assert error.prompt_index == 1 and error.context_window == 256 and error.prompt_tokens > 256
    assert f"{error.prompt_tokens} tokens" in str(error) and "256" in str(error) and "\n" not in str(error)
    rebuilt = error_from_dict(error.to_dict())  # what the controller does with the RPC's error frame
    assert type(rebuilt) is PromptTooLong and str(rebuilt) == str(error)
    # Fits alone, but not with the tokens asked for.
    medium = " ".join(["river"] * 200)
    with pytest.raises(PromptTooLong, match="max_new_tokens=100"):
        generate(request(tiny_dir, (medium,), max_new_tokens=100), model=tiny)


def _copy(tiny_dir: Path, target: Path) -> Path:
    shutil.copytree(tiny_dir, target, ignore=shutil.ignore_patterns("onnx"))
    return target


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("missing", "does not exist"),
        ("no-config", "no config.json"),
        ("bad-config", "not valid JSON"),
        ("no-weights", "no weights"),
        ("truncated-weights", "cannot load model"),
        ("missing-tensor", "incomplete"),
        ("no-tokenizer", "no tokenizer.json"),
    ],
)
def test_missing_or_corrupt_model_dir_is_model_dir_error(
    tiny_dir: Path, tmp_path: Path, damage: str, message: str
) -> None:
    target = tmp_path / "model"
    if damage != "missing":
        _copy(tiny_dir, target)
    if damage == "no-config":
        (target / "config.json").unlink()
    elif damage == "bad-config":
        (target / "config.json").write_text("{not json")
    elif damage == "no-weights":
        (target / "model.safetensors").unlink()
    elif damage == "truncated-weights":
        data = (target / "model.safetensors").read_bytes()
        (target / "model.safetensors").write_bytes(data[: len(data) // 3])
    elif damage == "missing-tensor":
        from safetensors.torch import load_file, save_file

        tensors = load_file(target / "model.safetensors")
        tensors.pop("model.layers.1.mlp.down_proj.weight")
        save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    elif damage == "no-tokenizer":
        (target / "tokenizer.json").unlink()
    with pytest.raises(ModelDirError, match=message):
        generate(request(target, max_new_tokens=2))


def test_allocation_failure_during_generation_is_out_of_memory(
    tiny_dir: Path, tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # CPU cannot produce a real CUDA OOM: inject the exception torch raises, to test the conversion boundary.
    def exhausted(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(tiny.model, "generate", exhausted)
    with pytest.raises(OutOfMemory, match="Tried to allocate 80.00 GiB"):
        generate(request(tiny_dir, max_new_tokens=2), model=tiny)


def test_onnx_logits_match_torch_within_tolerance(tiny_dir: Path, onnx_session: ort.InferenceSession) -> None:
    # Left-padded batch of uneven lengths, plus a one-token prompt: the exported graph must not bake in shapes.
    diff = logits_parity(tiny_dir, onnx_session, PROMPTS)
    assert diff <= PARITY_ATOL_FP32
    assert logits_parity(tiny_dir, onnx_session, ("",)) <= PARITY_ATOL_FP32


def test_onnx_reports_the_provider_that_ran_and_decodes_like_torch(
    tiny_dir: Path, tiny: LoadedModel, onnx_session: ort.InferenceSession
) -> None:
    provider = onnx_session.get_providers()[0]
    assert provider in ("CUDAExecutionProvider", "CPUExecutionProvider")
    if not torch.cuda.is_available():
        # onnxruntime-gpu lists CUDA here but cannot load it: the fallback has to be visible, not hidden.
        assert provider == "CPUExecutionProvider"
    events: list[TokenEvent] = []
    ort_result = generate_onnx(
        request(tiny_dir, PROMPTS, max_new_tokens=12, stop_at_eos=False), on_token=events.append, session=onnx_session
    )
    torch_result = generate(request(tiny_dir, PROMPTS, max_new_tokens=12, stop_at_eos=False), model=tiny)
    assert ort_result.provider == provider and ort_result.backend == "onnxruntime"
    assert tokens(ort_result) == tokens(torch_result)  # KV-cache decode on ORT = HF generate, greedy
    assert sorted((e.sequence, e.index) for e in events) == sorted(
        (s, i) for s, c in enumerate(ort_result.completions) for i in range(len(c.token_ids))
    )


def test_onnx_sampling_is_seeded(tiny_dir: Path, onnx_session: ort.InferenceSession) -> None:
    def sample(seed: int) -> list[tuple[int, ...]]:
        sampling = Sampling(temperature=0.9, top_p=0.9, seed=seed)
        req = request(tiny_dir, PROMPTS[:2], max_new_tokens=8, sampling=sampling, stop_at_eos=False)
        return tokens(generate_onnx(req, session=onnx_session))

    assert sample(1) == sample(1) and sample(1) != sample(2)
    assert all(0 <= t < 512 for row in sample(3) for t in row)


def test_cli_streams_json_lines_and_maps_errors_to_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from guest.workloads import __main__ as cli

    model = tmp_path / "cli-model"
    assert cli.main(["make-tiny-llm", str(model)]) == 0
    capsys.readouterr()
    args = ["run", "llm", "--model", str(model), "--prompt", "The keeper", "--max-new-tokens", "5", "--ignore-eos"]
    assert cli.main([*args, "--stream", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    streamed, final = lines[:-1], lines[-1]
    assert [e["token_id"] for e in streamed] == final["completions"][0]["token_ids"] and len(streamed) == 5
    assert cli.main([*args, "--backend", "onnx", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert cli.main(["run", "llm", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 3
    assert cli.main(["run", "llm", "--model", str(model), "--prompt", "x " * 400]) == 4
    assert cli.main(["run", "llm", "--model", str(model), "--prompt", "x", "--max-new-tokens", "0"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors[0].startswith("error: model directory") and errors[1].startswith("error: prompt 0 is")
    assert errors[2].startswith("error: bad request: max_new_tokens")
