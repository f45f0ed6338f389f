"""Training checkpoints at step boundaries: everything a resumed run needs to repeat the uninterrupted one exactly.

A checkpoint holds the model, optimizer and scheduler states, every RNG state (python, numpy's global, torch CPU and
all CUDA devices), the task's own state (data position / environment RNG), the step, and a fingerprint of the model
and run. Files are written atomically and loaded with ``weights_only=True`` (plain containers and tensors only), so
a checkpoint can never run code on load.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from .errors import CheckpointMismatch

FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"ckpt-{step:08d}.pt"


def checkpoint_step(path: Path) -> int | None:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else None


def latest_checkpoint(directory: str | Path) -> Path | None:
    folder = Path(directory)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return max(found)[1] if found else None


def capture_rng() -> dict[str, Any]:
    legacy = cast(tuple[Any, ...], np.random.get_state(legacy=True))
    return {
        "python": random.getstate(),
        # numpy's legacy state tuple holds an ndarray, which weights_only loading refuses: store it as a tensor.
        "numpy": {
            "name": legacy[0],
            "keys": torch.from_numpy(np.asarray(legacy[1]).astype(np.int64)),
            "pos": int(legacy[2]),
            "has_gauss": int(legacy[3]),
            "gauss": float(legacy[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    legacy = state["numpy"]
    keys = legacy["keys"].numpy().astype(np.uint32)
    np.random.set_state((legacy["name"], keys, legacy["pos"], legacy["has_gauss"], legacy["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def isolated_global_rng() -> Iterator[None]:
    """Training seeds and advances the global RNGs; put the caller's streams back afterwards."""
    saved = capture_rng()
    try:
        yield
    finally:
        restore_rng(saved)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # the ranks of a job on one machine share a folder
    torch.save({"format": FORMAT_VERSION, **payload}, staging)
    os.replace(staging, path)  # atomic: a crash mid-write never leaves a truncated "latest" checkpoint
    return path


def load_checkpoint(path: Path, fingerprint: dict[str, Any], data: bytes | None = None) -> dict[str, Any]:
    """Load and check that the checkpoint belongs to this model and run; CheckpointMismatch otherwise. ``data``: the
    file's bytes, when they came from another rank of a distributed job rather than from ``path`` here."""
    try:
        source: Any = io.BytesIO(data) if data is not None else path
        payload: dict[str, Any] = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, not a torch file, or holds objects weights_only refuses
        raise CheckpointMismatch(f"cannot read checkpoint {path}: {type(error).__name__}: {error}") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise CheckpointMismatch(f"{path} is not an hvctl training checkpoint (format {FORMAT_VERSION})")
    differences = describe_differences(payload.get("fingerprint", {}), fingerprint)
    if differences:
        raise CheckpointMismatch(f"checkpoint {path} is from a different model or run: {'; '.join(differences[:3])}")
    return payload


def describe_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    differences: list[str] = []
    # This run's key order first (run settings before model shapes: an objective mismatch explains a shape one).
    for key in [*current, *(k for k in saved if k not in current)]:
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            differences += describe_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            differences.append(f"{prefix}{key}: checkpoint has {a!r}, this run has {b!r}")
    return differences


def model_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """Parameter names and shapes: two models are interchangeable for load_state_dict iff these agree."""
    return {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
