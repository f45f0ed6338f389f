"""The serving engine's batching core (guest/serving/engine.py) on the host's CPU with a tiny seeded Llama: greedy
tokens under continuous batching equal one-at-a-time generation; admission is bounded; bad requests are refused
before anything is queued; a cancelled request frees its slot and the engine goes on serving."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch
from transformers import GenerationConfig

from guest.serving.engine import BadRequest, Engine, Overloaded
from guest.workloads.assets import build_random_llama, tiny_llama_config


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.set_num_threads(1)
    return build_random_llama(tiny_llama_config(vocab_size=512), seed=0)


@pytest.fixture
def engine(model: torch.nn.Module) -> Iterator[Engine]:
    served = Engine(model, max_queue=16)
    yield served
    served.stop()


def one_at_a_time(model: torch.nn.Module, prompt: list[int], new: int) -> list[int]:
    greedy = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
    with torch.inference_mode():
        return model.generate(torch.tensor([prompt]), generation_config=greedy)[0, len(prompt):].tolist()


def prompts(n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, 512, (4 + (i * 11) % 40,), generator=gen).tolist() for i in range(n)]


def test_sixteen_concurrent_requests_get_exactly_the_one_at_a_time_greedy_tokens(model: torch.nn.Module,
                                                                                 engine: Engine) -> None:
    asked = prompts(16)
    lengths = [6 + i % 7 for i in range(16)]  # they finish at different steps: the batch changes as it runs
    engine.start()
    got: dict[int, list[int]] = {}

    def client(i: int) -> None:
        got[i] = list(engine.submit(asked[i], lengths[i]))  # streamed token by token

    clients = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for c in clients:
        c.start()
    for c in clients:
        c.join(120)
    assert sorted(got) == list(range(16))
    for i in range(16):
        assert got[i] == one_at_a_time(model, asked[i], lengths[i]), i
    assert engine.in_flight == 0


def test_admission_is_bounded_and_bad_requests_are_refused_before_anything_is_queued(model: torch.nn.Module) -> None:
    """Requests are submitted before the engine starts decoding, so none can finish early: the third of a
    two-slot server is refused whatever the machine's speed."""
    engine = Engine(model, max_queue=2)
    try:
        first, second = engine.submit([5, 6, 7], 4), engine.submit([8, 9], 4)
        with pytest.raises(Overloaded, match="2 requests in flight") as full:
            engine.submit([10], 4)
        assert full.value.status == 429 and full.value.retry_after_s >= 1
        for bad, why in (([], "prompt is empty"), ([1, 2], "max_tokens must be at least 1"),
                         ([1] * 250, "exceed the model's context of 256"), ([1, 600], "outside the vocabulary")):
            with pytest.raises(BadRequest, match=why):
                engine.submit(bad, 0 if why.startswith("max_tokens") else 8)
        assert engine.in_flight == 2
        engine.start()
        assert first.result() == one_at_a_time(model, [5, 6, 7], 4)
        assert second.result() == one_at_a_time(model, [8, 9], 4)
        assert engine.in_flight == 0
        assert engine.submit([10], 4).result() == one_at_a_time(model, [10], 4)  # room again
    finally:
        engine.stop()


def test_a_cancelled_request_frees_its_slot_and_the_engine_serves_on(model: torch.nn.Module, engine: Engine) -> None:
    engine.start()
    long = engine.submit([3, 4, 5], 200)
    first = next(iter(long))
    long.close()
    assert engine.in_flight == 0 and long.finished
    assert list(long) == [] and long.tokens == [first]  # nothing more arrives after the close
    assert engine.submit([7, 8], 5).result() == one_at_a_time(model, [7, 8], 5)
