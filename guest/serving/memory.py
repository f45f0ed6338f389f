"""What a model costs the VM's memory, read from its directory without importing torch.

The server is one process: its Python runtime (torch and transformers imported: 240 MiB resident, measured on the
host with torch 2.13 and transformers 5.25; ``RUNTIME_MIB`` keeps a margin) is paid once, and each loaded model adds
its weights (the safetensors files' size: they load in the dtype they are stored in) and the paged KV cache the
engine allocates up front for ``max_seqs`` sequences of ``max_tokens`` tokens each. The agent checks a start against
the VM's available memory before it spawns the server, and the server checks each load and reload again, so a model
that would not fit is refused with these numbers instead of being killed by the OOM killer half way through.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from guest.serving.engine import PAGE_SIZE, pages_for

MIB = 1 << 20
RUNTIME_MIB = 320
# Left to the guest itself (its init, sshd, the agent, page cache for the model files) whatever the models take.
GUEST_RESERVE_MIB = 96
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1}


class DoesNotFit(Exception):
    """A load refused for memory; the message has the numbers."""


class BadModelDir(Exception):
    """Not a model directory the server can load."""


@dataclass(frozen=True)
class Footprint:
    weights_bytes: int
    kv_bytes: int
    context: int

    @property
    def mib(self) -> int:
        return -(-(self.weights_bytes + self.kv_bytes) // MIB)

    def describe(self) -> str:
        return f"{self.mib} MiB (weights {self.weights_bytes / MIB:.1f} MiB, KV cache {self.kv_bytes / MIB:.1f} MiB)"


def read_config(model_dir: Path) -> dict[str, object]:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except FileNotFoundError:
        raise BadModelDir(f"{model_dir} has no config.json: not a transformers model directory") from None
    except (OSError, ValueError) as exc:
        raise BadModelDir(f"cannot read {model_dir / 'config.json'}: {exc}") from None
    if not isinstance(config, dict):
        raise BadModelDir(f"{model_dir / 'config.json'} is not a JSON object")
    return config


def footprint(model_dir: Path, max_seqs: int, max_tokens: int | None) -> Footprint:
    """The memory ``model_dir`` takes once loaded and served to ``max_seqs`` sequences of at most ``max_tokens``
    tokens (the model's context when None, and never more than it)."""
    if not model_dir.is_dir():
        raise BadModelDir(f"no model directory {model_dir}")
    config = read_config(model_dir)
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise BadModelDir(f"{model_dir} holds no *.safetensors weights")
    try:
        layers, heads = _int(config, "num_hidden_layers"), _int(config, "num_attention_heads")
        kv_heads = _int(config, "num_key_value_heads", heads)
        head_dim = _int(config, "head_dim", _int(config, "hidden_size") // heads)
        model_context = _int(config, "max_position_embeddings")
    except (KeyError, TypeError, ValueError) as exc:
        raise BadModelDir(f"{model_dir / 'config.json'} lacks the decoder shape the server needs: {exc}") from None
    context = min(model_context, max_tokens) if max_tokens else model_context
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    kv = pages_for(max_seqs, context) * PAGE_SIZE * layers * 2 * kv_heads * head_dim * _DTYPE_BYTES.get(dtype, 4)
    return Footprint(sum(p.stat().st_size for p in weights), kv, context)


def _int(config: dict[str, object], key: str, default: int | None = None) -> int:
    value = config.get(key)
    if value is None:
        if default is None:
            raise KeyError(key)
        return default
    if not isinstance(value, int | float | str):
        raise TypeError(f"{key} is {value!r}")
    return int(value)


def available_mib(meminfo: Path = Path("/proc/meminfo")) -> tuple[int, int]:
    """(MemAvailable, MemTotal) of this machine, in MiB."""
    fields = {}
    for line in meminfo.read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            fields[key] = int(value.split()[0]) // 1024
    return fields.get("MemAvailable", 0), fields.get("MemTotal", 0)


def check_fits(name: str, needed: Footprint, *, runtime: bool, meminfo: Path = Path("/proc/meminfo"),
               reserved_mib: int = 0) -> None:
    """Refuse, with the numbers, a load that would leave less than ``GUEST_RESERVE_MIB`` of the VM's memory.
    ``runtime``: the server process is not running yet, so its Python runtime is paid too; ``reserved_mib``: what
    loads already under way will take, not yet visible as used."""
    free, total = available_mib(meminfo)
    free -= reserved_mib
    want = needed.mib + (RUNTIME_MIB if runtime else 0)
    if want + GUEST_RESERVE_MIB > free:
        runtime_part = f" + the server's runtime {RUNTIME_MIB} MiB" if runtime else ""
        raise DoesNotFit(f"model {name} needs {needed.describe()}{runtime_part} for a {needed.context}-token "
                         f"context, and the VM has {free} MiB available of {total} MiB (keeping "
                         f"{GUEST_RESERVE_MIB} MiB for the guest); lower --max-seqs or --max-tokens, stop another "
                         f"model, or give the VM more memory")
