"""The batching core of the resident model server: one loaded model, many concurrent requests.

transformers' own continuous batching does the scheduling (ContinuousBatchingManager: a paged KV cache, requests
joining and leaving the running batch at every decode step); ``benchmarks/bench_batching.py`` measured it against
one-at-a-time generation (3.7x on the `small` CPU shape, identical greedy tokens). What this module adds is what a
server needs around it:

- bounded admission: at most ``max_queue`` requests in flight; one more is refused at once (``Overloaded``, which
  the HTTP layer turns into 429 with Retry-After), so a burst never grows memory without bound;
- per-request limits checked before anything is queued (``BadRequest``, HTTP 400): an empty prompt, ``max_tokens``
  below 1, a prompt and its ``max_tokens`` longer than the model's context;
- one router thread that drains the manager's single output queue and hands each request its own tokens as they
  are made (the manager's per-request reader re-queues everyone else's results, which does not scale);
- cancellation: a stream closed early frees its sequence at the manager's next step and its admission slot now;
- retirement: a reload retires the old weights' engine, which admits nothing more and finishes what it admitted.

``guest/serving/api.py`` puts the OpenAI-compatible HTTP API over it, ``guest/serving/server.py`` runs both as the
resident server process, and the agent starts and drives that (``guest/serving/control.py``).
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

_DONE = object()
PAGE_SIZE = 16  # tokens per KV-cache page


def pages_for(max_seqs: int, context: int, page_size: int = PAGE_SIZE) -> int:
    """KV-cache pages for ``max_seqs`` sequences of up to ``context`` tokens each (and a few spare): allocated up
    front, so admission can never run the cache out (``guest.serving.memory`` counts them against the VM)."""
    return max_seqs * -(-context // page_size) + 16


class ServingError(Exception):
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ServingError):
    status = 400


class Retired(ServingError):
    """This engine's weights were replaced: look the model up again (its new engine takes the request)."""

    status = 503


class Overloaded(ServingError):
    status = 429

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class Stream:
    """One request's tokens, in order, as the engine makes them. Iterate it; ``close()`` cancels the request."""

    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    _engine: Engine
    _queue: queue.Queue[Any] = field(default_factory=queue.Queue)
    tokens: list[int] = field(default_factory=list)
    error: str | None = None
    finished: bool = False
    _seen: int = 0  # tokens of the manager's (cumulative) output already passed on

    def __iter__(self) -> Iterator[int]:
        while not self.finished:
            item = self._queue.get()
            if item is _DONE:
                self.finished = True
                break
            self.tokens.append(item)
            yield item
        if self.error:
            raise ServingError(self.error)

    def batches(self) -> Iterator[list[int]]:
        """The tokens in order, as lists: each one every token made since the last, so a reader that falls behind
        (many streams, one GIL) catches up in one step instead of one step per token."""
        while not self.finished:
            item = self._queue.get()
            batch: list[int] = []
            while True:
                if item is _DONE:
                    self.finished = True
                    break
                batch.append(item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self.tokens.extend(batch)
                yield batch
        if self.error:
            raise ServingError(self.error)

    def result(self) -> list[int]:
        """Every token of the completion (waits for the end)."""
        for _ in self:
            pass
        return self.tokens

    def close(self) -> None:
        """Cancel: the sequence is freed at the next step, the admission slot at once."""
        if not self.finished:
            self._engine._cancel(self)
            self.finished = True  # tokens the router passed on before the cancel are dropped with it


class Engine:
    """A loaded causal LM served with continuous batching. Greedy decoding (the model's sampling settings are
    the HTTP layer's to add)."""

    def __init__(self, model: Any, *, max_queue: int = 64, page_size: int = PAGE_SIZE, max_batch_tokens: int = 2048,
                 eos_token_id: int | None = None, max_context: int | None = None) -> None:
        # transformers loads with the first model, not with the agent that imports this module (the guest's boot).
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        self.model = model
        model_context = int(model.config.max_position_embeddings)
        # A server may admit shorter sequences than the model can take, to keep the KV cache it allocates small.
        self.context = min(model_context, max_context) if max_context else model_context
        self.max_queue = max_queue
        self._eos = eos_token_id
        pages = pages_for(max_queue, self.context, page_size)
        config = ContinuousBatchingConfig(page_size=page_size, num_blocks=pages, max_batch_tokens=max_batch_tokens,
                                          use_cuda_graph=False, use_async_batching=False)
        greedy = GenerationConfig(do_sample=False, max_new_tokens=16, eos_token_id=eos_token_id,  # type: ignore[no-untyped-call]
                                  pad_token_id=eos_token_id or 0)
        self._manager = model.init_continuous_batching(generation_config=greedy, continuous_batching_config=config)
        self._streams: dict[str, Stream] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._router: threading.Thread | None = None
        self._stopping = threading.Event()
        self._retired = False

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> Engine:
        self._manager.start()
        self._router = threading.Thread(target=self._route, name="serving-router", daemon=True)
        self._router.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._manager.stop(block=True, timeout=30)
        if self._router is not None:
            self._router.join(30)
        with self._lock:
            left, self._streams = list(self._streams.values()), {}
        for stream in left:
            stream.error = "the server stopped before this request finished"
            stream._queue.put(_DONE)

    def retire(self) -> None:
        """Admit nothing more: ``submit`` raises ``Retired`` from now on, while the requests already admitted run to
        their end. A reload retires the old weights' engine this way, and stops it once ``in_flight`` is 0."""
        with self._lock:
            self._retired = True

    def scheduled(self) -> tuple[int, int]:
        """(running, waiting): sequences in the running batch, and admitted ones not yet in it (the queue)."""
        processor = getattr(self._manager, "batch_processor", None)
        scheduler = getattr(processor, "scheduler", None)
        if scheduler is None:
            return 0, self.in_flight
        return len(scheduler.active_requests), len(scheduler.waiting_requests)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._streams)

    # -- requests ----------------------------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], max_tokens: int) -> Stream:
        if not prompt_ids:
            raise BadRequest("the prompt is empty")
        if max_tokens < 1:
            raise BadRequest(f"max_tokens must be at least 1, not {max_tokens}")
        if len(prompt_ids) + max_tokens > self.context:
            raise BadRequest(f"the prompt ({len(prompt_ids)} tokens) and max_tokens ({max_tokens}) exceed the "
                             f"model's context of {self.context} tokens")
        vocab = int(self.model.config.vocab_size)
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise BadRequest(f"the prompt holds token ids outside the vocabulary (0..{vocab - 1})")
        with self._lock:
            if self._retired:
                raise Retired("these weights were replaced")
            if len(self._streams) >= self.max_queue:
                raise Overloaded(f"{len(self._streams)} requests in flight, the most this server admits")
            stream = Stream(f"r{next(self._ids)}", list(prompt_ids), max_tokens, self)
            self._streams[stream.request_id] = stream
        self._manager.add_request(list(prompt_ids), request_id=stream.request_id, max_new_tokens=max_tokens,
                                  streaming=True, eos_token_id=self._eos)
        return stream

    def _cancel(self, stream: Stream) -> None:
        with self._lock:
            mine = self._streams.pop(stream.request_id, None)
        if mine is not None:
            self._manager.cancel_request(stream.request_id)
            stream._queue.put(_DONE)

    def _route(self) -> None:
        """The one reader of the manager's outputs: each result goes to its request's stream."""
        while not self._stopping.is_set():
            result = self._manager.get_result(timeout=0.1)
            if result is None:
                continue
            with self._lock:
                stream = self._streams.get(result.request_id)
            if stream is None:
                continue  # cancelled: what it made after that is dropped
            for token in result.generated_tokens[stream._seen:]:
                stream._queue.put(int(token))
            stream._seen = len(result.generated_tokens)
            if result.is_finished():
                if result.error:
                    stream.error = str(result.error)
                with self._lock:
                    self._streams.pop(result.request_id, None)
                stream._queue.put(_DONE)
