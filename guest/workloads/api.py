"""One entry point for the agent RPC: a workload name, a JSON-able payload, an optional event sink.

``run_workload("llm", {"model_dir": ..., "prompts": [...]}, on_event)`` validates the payload into the request model,
runs the workload, forwards progress/stream events as plain dicts and returns the result as a plain dict. Typed
errors propagate (WorkloadError subclasses; pydantic.ValidationError for a bad payload) so the RPC layer can map them
with ``WorkloadError.to_dict``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from .schema import LLMRequest, PerceptionRequest, PerceptionTrainRequest, TrainRequest

EventSink = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class WorkloadSpec:
    request: type[BaseModel]
    module: str  # imported on first use: torch and transformers cost seconds to import
    function: str
    event: str  # the callback keyword the function takes


WORKLOADS: dict[str, WorkloadSpec] = {
    "llm": WorkloadSpec(LLMRequest, "llm", "generate", "on_token"),
    "llm-onnx": WorkloadSpec(LLMRequest, "llm_onnx", "generate_onnx", "on_token"),
    "llm-fast": WorkloadSpec(LLMRequest, "llm_fast", "generate_fast", "on_token"),
    "perception": WorkloadSpec(PerceptionRequest, "perception", "classify", ""),
    "perception-train": WorkloadSpec(PerceptionTrainRequest, "perception", "train_perception", "on_epoch"),
    "train": WorkloadSpec(TrainRequest, "train", "train", "on_progress"),
}


def run_workload(name: str, payload: dict[str, Any] | BaseModel, on_event: EventSink | None = None) -> dict[str, Any]:
    if name not in WORKLOADS:
        raise KeyError(f"unknown workload {name!r}; known: {', '.join(sorted(WORKLOADS))}")
    spec = WORKLOADS[name]
    request = payload if isinstance(payload, spec.request) else spec.request.model_validate(payload)
    function = getattr(importlib.import_module(f"{__package__}.{spec.module}"), spec.function)
    kwargs: dict[str, Any] = {}
    if on_event is not None and spec.event:
        sink = on_event

        def forward(event: BaseModel) -> None:
            sink({"event": type(event).__name__, **event.model_dump(mode="json")})

        kwargs[spec.event] = forward
    result: BaseModel = function(request, **kwargs)
    return result.model_dump(mode="json")
