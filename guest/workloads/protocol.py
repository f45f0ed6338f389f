"""What a workload prints that its controller reads, one JSON object per line on stdout, written and parsed here with
the same models on both sides (hvctl reads logs through the agent; the workload writes them):

- ``{"progress": TrainProgress}`` after each training step (every rank of a distributed job prints its own);
- ``{"ready": Ready}`` from a distributed job's launcher in a VM, once torch is imported and it waits for the go.

Other lines (a launcher's warnings, a traceback, the final result) are not envelopes and are skipped. Imports no torch.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import ValidationError

from .schema import Frozen, TrainProgress

ModelT = TypeVar("ModelT", bound=Frozen)


class Ready(Frozen):
    interface: str  # the guest's NIC that holds ``address``: the job's collectives go there
    address: str


def progress_line(progress: TrainProgress) -> str:
    return json.dumps({"progress": progress.model_dump(mode="json")})


def ready_line(ready: Ready) -> str:
    return json.dumps({"ready": ready.model_dump(mode="json")})


def parse_progress(text: str) -> list[TrainProgress]:
    """Every progress envelope in ``text`` (whole lines), in order."""
    return [p for body in _bodies(text, "progress") if (p := _parsed(TrainProgress, body)) is not None]


def parse_ready(text: str) -> Ready | None:
    """The ready envelope in ``text``, if there is one."""
    return next((r for body in _bodies(text, "ready") if (r := _parsed(Ready, body)) is not None), None)


def _bodies(text: str, key: str) -> list[Any]:
    found = []
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            envelope = json.loads(line)
        except ValueError:
            continue
        if isinstance(envelope, dict) and list(envelope) == [key]:
            found.append(envelope[key])
    return found


def _parsed(model: type[ModelT], body: Any) -> ModelT | None:
    try:
        return model.model_validate(body)
    except ValidationError:
        return None
