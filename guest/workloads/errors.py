"""Typed workload errors.

Every error a caller can act on is a WorkloadError subclass with a one-line message (the agent RPC and the CLI print
it as is), a stable ``code`` (what the RPC puts on the wire, so the controller can map it back to a class without
parsing prose) and the workload CLI's ``exit_code``, one per class. Anything else escaping a workload is a bug, not
a user error.
"""

from __future__ import annotations

from typing import ClassVar


class WorkloadError(Exception):
    """Base class: a workload refused or failed for a reason the caller can fix or report."""

    code: ClassVar[str] = "workload_error"
    # The workload CLI's exit status for it (``python -m guest.workloads``); 2 is a bad request (pydantic's refusal).
    exit_code: ClassVar[int] = 1

    def __init__(self, message: str) -> None:
        # One line, always: RPC frames and CLI error lines are line-oriented.
        self.message = " ".join(message.split())
        super().__init__(self.message)

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "type": type(self).__name__, "message": self.message}


class ModelDirError(WorkloadError):
    """The model directory is missing, incomplete or unreadable (config, weights or tokenizer)."""

    code = "model_dir"
    exit_code = 3


class PromptTooLong(WorkloadError):
    """The prompt, plus the tokens asked for, does not fit the model's context window."""

    code = "prompt_too_long"
    exit_code = 4

    def __init__(self, prompt_tokens: int, max_new_tokens: int, context_window: int, prompt_index: int = 0) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.context_window = context_window
        self.prompt_index = prompt_index
        super().__init__(
            f"prompt {prompt_index} is {prompt_tokens} tokens; with max_new_tokens={max_new_tokens} it needs "
            f"{prompt_tokens + max_new_tokens} positions but the model's context window is {context_window}"
        )


class BadMediaFormat(WorkloadError):
    """An image or audio input is not in a format the workload decodes (PNG/.npy images, PCM WAV/.npy audio)."""

    code = "bad_media_format"
    exit_code = 5


class CheckpointMismatch(WorkloadError):
    """A checkpoint does not belong to this model/objective, or cannot be read."""

    code = "checkpoint_mismatch"
    exit_code = 6


class UnsupportedModel(WorkloadError):
    """The model is not one a backend knows how to run (the fast decode loop runs plain Llama-family decoders)."""

    code = "unsupported_model"


class OutOfMemory(WorkloadError):
    """Not enough host or device memory: refused up front by an estimate, or caught from an allocation failure."""

    code = "out_of_memory"
    exit_code = 7


ERRORS_BY_CODE: dict[str, type[WorkloadError]] = {
    cls.code: cls
    for cls in (WorkloadError, ModelDirError, PromptTooLong, BadMediaFormat, CheckpointMismatch, OutOfMemory,
                UnsupportedModel)
}


def error_from_dict(data: dict[str, str]) -> WorkloadError:
    """Rebuild the typed error on the controller side from ``WorkloadError.to_dict()`` (the message is kept verbatim;
    subclass-specific numbers such as PromptTooLong's are only in the message)."""
    cls = ERRORS_BY_CODE.get(data.get("code", ""), WorkloadError)
    error = cls.__new__(cls)
    WorkloadError.__init__(error, data.get("message", "workload failed"))
    return error
