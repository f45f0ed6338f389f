"""Model workloads run by the in-guest agent: LLM inference (torch, ONNX Runtime, GPU fast path), multimodal
perception, and training (self-supervised LM, REINFORCE, the vision's "seed-rl" loss).

Schema and errors import without torch, so the controller can share them; the workload functions are loaded on
first attribute access. This package imports nothing from ``hvctl`` (it ships into guests on its own).
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import (
    BadMediaFormat,
    CheckpointMismatch,
    ModelDirError,
    OutOfMemory,
    PromptTooLong,
    WorkloadError,
    error_from_dict,
)
from .schema import (
    Completion,
    FusionWeights,
    LLMRequest,
    LLMResult,
    PerceptionEpoch,
    PerceptionRequest,
    PerceptionResult,
    PerceptionTrainRequest,
    PerceptionTrainResult,
    Sampling,
    TokenEvent,
    TrainProgress,
    TrainRequest,
    TrainResult,
)

_LAZY = {
    "make_tiny_llm": "assets",
    "generate": "llm",
    "load_model": "llm",
    "generate_onnx": "llm_onnx",
    "export_onnx": "llm_onnx",
    "generate_fast": "llm_fast",
    "llama_1b_config": "llm_fast",
    "train_perception": "perception",
    "classify": "perception",
    "train": "train",
    "run_workload": "api",
    "WORKLOADS": "api",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BadMediaFormat",
    "CheckpointMismatch",
    "Completion",
    "FusionWeights",
    "LLMRequest",
    "LLMResult",
    "ModelDirError",
    "OutOfMemory",
    "PerceptionEpoch",
    "PerceptionRequest",
    "PerceptionResult",
    "PerceptionTrainRequest",
    "PerceptionTrainResult",
    "PromptTooLong",
    "Sampling",
    "TokenEvent",
    "TrainProgress",
    "TrainRequest",
    "TrainResult",
    "WorkloadError",
    "error_from_dict",
    *_LAZY,
]
