"""Device choice, peak-memory measurement and the out-of-memory boundary shared by all workloads."""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from .errors import OutOfMemory, WorkloadError
from .schema import Device

_GIB = float(1 << 30)


def resolve_device(requested: Device) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise WorkloadError("device 'cuda' was requested but torch sees no CUDA device")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def inference_dtype(device: torch.device) -> torch.dtype:
    # bf16 halves weight traffic on GPU without fp16's overflow risk; CPU bf16 matmuls are slow on most hosts.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def available_memory_bytes(device: torch.device) -> int:
    """Memory a new allocation can still get: free device memory on CUDA, MemAvailable (or free pages) on the host."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))


def require_memory(needed_bytes: int, what: str, device: torch.device) -> None:
    """Refuse before allocating when an estimate already exceeds what is available.

    The estimate is the caller's; it is deliberately coarse (weights, optimizer state, activations) and only catches
    requests that cannot possibly fit. Allocations that fail anyway are caught by ``oom_guard``.
    """
    available = available_memory_bytes(device)
    if needed_bytes > available:
        raise OutOfMemory(
            f"{what} needs about {needed_bytes / _GIB:.2f} GiB but only {available / _GIB:.2f} GiB is available on "
            f"{device.type}; reduce the batch or sequence size"
        )


def _is_cpu_allocation_failure(error: RuntimeError) -> bool:
    # torch's CPU allocator raises a plain RuntimeError (not MemoryError) when malloc fails.
    text = str(error)
    return "DefaultCPUAllocator" in text and "allocate" in text


@contextlib.contextmanager
def oom_guard(what: str) -> Iterator[None]:
    """Turn allocation failures inside the block into OutOfMemory with a one-line message."""
    try:
        yield
    except torch.OutOfMemoryError as error:  # CUDA (and other accelerators') allocator
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else "allocation failed"
        raise OutOfMemory(f"{what} ran out of device memory: {first_line}") from error
    except MemoryError as error:
        raise OutOfMemory(f"{what} ran out of host memory (MemoryError)") from error
    except RuntimeError as error:
        if not _is_cpu_allocation_failure(error):
            raise
        detail = str(error).split("DefaultCPUAllocator:", 1)[-1].strip().splitlines()[0]
        raise OutOfMemory(f"{what} ran out of host memory: {detail}") from error


@dataclass
class PeakMemory:
    source: Literal["cuda_max_memory_allocated", "rss_peak"]
    bytes: int


class PeakMemoryMeter:
    """CUDA: peak bytes allocated during the block. CPU: the process's peak RSS so far (Linux reports it in KiB;
    it cannot be reset, so it covers the whole process lifetime, not only this request)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def read(self) -> PeakMemory:
        if self.device.type == "cuda":
            return PeakMemory("cuda_max_memory_allocated", int(torch.cuda.max_memory_allocated(self.device)))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
        return PeakMemory("rss_peak", int(peak) * scale)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
